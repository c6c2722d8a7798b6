// GELU primal + tangent fused with the bias add, element-wise on the CPU (DESIGN.md §1).
//
// For u = h + bias and u_t = h_t + d_bias (biases broadcast over the last dimension):
// a = gelu(u), a_t = gelu'(u) · u_t, and gelu'(u) itself, which the MLP's backward needs for both
// streams (grad u = grad a · gelu'(u), grad u_t = grad a_t · gelu'(u)). Erf and tanh forms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "vec.h"

namespace tangent_kernels {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCubic = 0.044715;

// gelu(u) and gelu'(u), generic over scalars and ATen vectors.
template <typename T, typename S>
void gelu_and_derivative(const T& u, bool tanh_form, T& value, T& derivative) {
  const T half(S(0.5)), one(S(1));
  if (tanh_form) {
    const T u2 = u * u;
    const T t = (T(S(kSqrt2OverPi)) * (u + T(S(kTanhCubic)) * u2 * u)).tanh();
    value = half * u * (one + t);
    derivative = half * (one + t) + half * u * (one - t * t) * T(S(kSqrt2OverPi)) * (one + T(S(3 * kTanhCubic)) * u2);
  } else {
    const T cdf = half * (one + (u * T(S(kSqrtHalf))).erf());
    const T pdf = (T(S(-0.5)) * u * u).exp() * T(S(kInvSqrt2Pi));
    value = u * cdf;
    derivative = cdf + u * pdf;
  }
}

// A scalar with the .tanh()/.erf()/.exp() members of at::vec::Vectorized, for the tails and
// for dtypes computed in a wider type.
template <typename S>
struct Scalar {
  S x;
  Scalar(S value) : x(value) {}  // NOLINT: implicit, like Vectorized's broadcast
  Scalar operator+(const Scalar& o) const { return x + o.x; }
  Scalar operator-(const Scalar& o) const { return x - o.x; }
  Scalar operator*(const Scalar& o) const { return x * o.x; }
  Scalar tanh() const { return std::tanh(x); }
  Scalar erf() const { return std::erf(x); }
  Scalar exp() const { return std::exp(x); }
};

template <typename scalar_t>
void gelu_rows(const at::Tensor& h, const at::Tensor& h_t, const at::Tensor& bias, const at::Tensor& d_bias,
               bool tanh_form, at::Tensor& a, at::Tensor& a_t, at::Tensor& derivative) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t n = h.size(-1), rows = h.numel() / std::max<int64_t>(n, 1);
  const scalar_t* h_data = h.const_data_ptr<scalar_t>();
  const scalar_t* h_t_data = h_t.defined() ? h_t.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b_data = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* db_data = d_bias.defined() ? d_bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* a_data = a.mutable_data_ptr<scalar_t>();
  scalar_t* a_t_data = a_t.defined() ? a_t.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* g_data = derivative.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * n;
      int64_t j = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {  // fp32/fp64: ATen's vectors
        for (; j + Vec::size() <= n; j += Vec::size()) {
          Vec u = Vec::loadu(h_data + offset + j);
          if (b_data) u = u + Vec::loadu(b_data + j);
          Vec value, slope;
          gelu_and_derivative<Vec, acc_t>(u, tanh_form, value, slope);
          value.store(a_data + offset + j);
          slope.store(g_data + offset + j);
          if (a_t_data) {
            Vec u_t(acc_t(0));
            if (h_t_data) u_t = Vec::loadu(h_t_data + offset + j);
            if (db_data) u_t = u_t + Vec::loadu(db_data + j);
            (slope * u_t).store(a_t_data + offset + j);
          }
        }
      }
      for (; j < n; ++j) {
        Scalar<acc_t> u = static_cast<acc_t>(h_data[offset + j]) + (b_data ? static_cast<acc_t>(b_data[j]) : acc_t(0));
        Scalar<acc_t> value(0), slope(0);
        gelu_and_derivative<Scalar<acc_t>, acc_t>(u, tanh_form, value, slope);
        a_data[offset + j] = static_cast<scalar_t>(value.x);
        g_data[offset + j] = static_cast<scalar_t>(slope.x);
        if (a_t_data) {
          const acc_t u_t = (h_t_data ? static_cast<acc_t>(h_t_data[offset + j]) : acc_t(0)) +
                            (db_data ? static_cast<acc_t>(db_data[j]) : acc_t(0));
          a_t_data[offset + j] = static_cast<scalar_t>(slope.x * u_t);
        }
      }
    }
  });
}

at::Tensor optional_like(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name,
                         at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, ": expected shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->device() == like.device(), name, ": expected device ", like.device(), ", got ", t->device());
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_jvp_forward(const at::Tensor& h_in,
                                                                const std::optional<at::Tensor>& h_t_in,
                                                                const std::optional<at::Tensor>& bias_in,
                                                                const std::optional<at::Tensor>& d_bias_in,
                                                                c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate: expected 'none' or 'tanh', got '",
              approximate, "'");
  TORCH_CHECK(h_in.dim() >= 1, "h: expected at least one dimension");
  TORCH_CHECK(at::isFloatingType(h_in.scalar_type()), "h: expected a floating-point tensor, got ",
              h_in.scalar_type());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor h_t = optional_like(h_t_in, h, "h_t", h.sizes());
  const at::Tensor bias = optional_like(bias_in, h, "bias", {h.size(-1)});
  const at::Tensor d_bias = optional_like(d_bias_in, h, "d_bias", {h.size(-1)});
  at::Tensor a = at::empty_like(h), derivative = at::empty_like(h);
  at::Tensor a_t = (h_t.defined() || d_bias.defined()) ? at::empty_like(h) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gelu_jvp_forward", [&] {
    gelu_rows<scalar_t>(h, h_t, bias, d_bias, approximate == "tanh", a, a_t, derivative);
  });
  return {a, a_t.defined() ? a_t : at::empty({0}, h.options()), derivative};
}

}  // namespace

TORCH_LIBRARY_IMPL(tangent_kernels, CPU, m) {
  m.impl("gelu_jvp_forward", &gelu_jvp_forward);
}

}  // namespace tangent_kernels
