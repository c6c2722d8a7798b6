// Layer norm (and RMSNorm) primal + tangent on the CPU, parallel over rows (DESIGN.md §1, §2).
//
// Forward, per row: y = g0 * x_hat + b0 and
//   y_t = g0 * (x_t - mean(x_t) - x_hat * mean(x_hat * x_t)) * rstd + dg * x_hat + db.
// Backward, for one upstream stream g: the layer-norm input gradient with g0 * g as upstream,
// and the column sums of g * x_hat and g (per-thread partial sums, added at the end).
// With centered = false (RMSNorm) the row mean is taken as zero: x_hat = x * rstd with
// rstd = (mean(x^2) + eps)^-1/2, and the mean(x_t) and mean(g0 * g) terms drop out.
// Accumulation is in at::opmath_type (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64); rows are
// processed with ATen's vectors (bf16/fp16 rows converted to fp32 in a per-thread buffer).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace tangent_kernels {
namespace {

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

void check_like_input(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

// A contiguous 1-D parameter of length x.size(-1), or an undefined tensor when absent.
at::Tensor parameter(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!present(t)) return at::Tensor();
  check_like_input(*t, x, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), name, ": expected shape (", x.size(-1),
              ",) (the last dimension of x), got ", t->sizes());
  return t->contiguous();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// One row of the forward, vectorized over features; null pointers are absent inputs/outputs.
template <typename acc_t>
void forward_row(const acc_t* x, const acc_t* x_t, const acc_t* w, const acc_t* b, const acc_t* dw, const acc_t* db,
                 int64_t n, acc_t eps, bool centered, acc_t* y, acc_t* y_t, acc_t& mean_out, acc_t& rstd_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  const auto sum = [](Vec& p, Vec& q) { return p + q; };
  acc_t mean = 0;
  if (centered) {
    mean = at::vec::reduce_all<acc_t>(sum, x, n) / n;
    // one refinement: the rounding of the mean no longer shows as variance (a constant row of
    // 12345.678 gave x_hat = +-0.7; torch's Welford gives 0)
    mean += at::vec::map_reduce_all<acc_t>([mean](Vec v) { return v - Vec(mean); }, sum, x, n) / n;
  }
  const acc_t squares = at::vec::map_reduce_all<acc_t>(
      [mean](Vec v) { const Vec c = v - Vec(mean); return c * c; }, sum, x, n);
  acc_t rstd = acc_t(1) / std::sqrt(squares / n + eps);
  if (!std::isfinite(mean) || !std::isfinite(squares)) {
    // The sum or the sum of squares overflowed (|x| ~ 1e19 in float32): unless x itself holds
    // inf or NaN, normalize the row divided by its largest magnitude (x_hat does not depend on it).
    const acc_t peak = at::vec::map_reduce_all<acc_t>(
        [](Vec v) { return v.abs(); }, [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, x, n);
    if (std::isfinite(peak) && peak > 0) {
      const acc_t inv = acc_t(1) / peak;
      acc_t mean_scaled = 0;
      if (centered) {
        mean_scaled = at::vec::map_reduce_all<acc_t>([inv](Vec v) { return v * Vec(inv); }, sum, x, n) / n;
        mean_scaled += at::vec::map_reduce_all<acc_t>(
            [inv, mean_scaled](Vec v) { return v * Vec(inv) - Vec(mean_scaled); }, sum, x, n) / n;
      }
      const acc_t squares_scaled = at::vec::map_reduce_all<acc_t>(
          [inv, mean_scaled](Vec v) { const Vec c = v * Vec(inv) - Vec(mean_scaled); return c * c; }, sum, x, n);
      mean = mean_scaled * peak;
      // a constant row: rstd = eps^-1/2 (eps * inv * inv underflows for a huge row)
      rstd = squares_scaled == 0 ? acc_t(1) / std::sqrt(eps)
                                 : inv / std::sqrt(squares_scaled / n + eps * inv * inv);
    }
  }
  mean_out = mean;
  rstd_out = rstd;
  acc_t x_t_mean = 0, x_hat_x_t_mean = 0;
  if (x_t) {
    // Σ x_hat is zero only up to rounding, so x_hat · x_t is summed over the centered x_t: a
    // large mean of x_t times that rounding would swamp y_t. (RMSNorm: no centering.)
    if (centered) x_t_mean = at::vec::reduce_all<acc_t>(sum, x_t, n) / n;
    x_hat_x_t_mean = at::vec::map2_reduce_all<acc_t>(
        [mean, rstd, x_t_mean](Vec v, Vec t) { return (v - Vec(mean)) * Vec(rstd) * (t - Vec(x_t_mean)); },
        sum, x, x_t, n) / n;
  }
  const Vec vmean(mean), vrstd(rstd), vone(1), vzero(0), vx_t_mean(x_t_mean), vdot(x_hat_x_t_mean);
  const auto load = [](const acc_t* p, int64_t j, int64_t count, const Vec& absent) {
    return p ? Vec::loadu(p + j, count) : absent;
  };
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec x_hat = (Vec::loadu(x + j, count) - vmean) * vrstd;
    const Vec w_j = load(w, j, count, vone);
    (x_hat * w_j + load(b, j, count, vzero)).store(y + j, count);
    if (y_t) {
      Vec tangent = vzero;
      if (x_t) tangent = (Vec::loadu(x_t + j, count) - vx_t_mean - x_hat * vdot) * vrstd * w_j;
      if (dw) tangent = tangent + Vec::loadu(dw + j, count) * x_hat;
      if (db) tangent = tangent + Vec::loadu(db + j, count);
      tangent.store(y_t + j, count);
    }
  }
}

// One row of the backward for upstream g: the input gradient (if g_x) and the partial column
// sums of g · x_hat and g (if pw, pb).
template <typename acc_t>
void backward_row(const acc_t* g, const acc_t* x, const acc_t* w, int64_t n, acc_t mean, acc_t rstd, bool centered,
                  acc_t* g_x, acc_t* pw, acc_t* pb) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vmean(mean), vrstd(rstd), vone(1);
  acc_t u_sum = 0, u_x_hat_sum = 0;
  Vec u_acc(0), u_x_hat_acc(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec g_j = Vec::loadu(g + j, count);
    const Vec x_hat = (Vec::loadu(x + j, count) - vmean) * vrstd;
    if (pw) {
      (Vec::loadu(pw + j, count) + g_j * x_hat).store(pw + j, count);
      (Vec::loadu(pb + j, count) + g_j).store(pb + j, count);
    }
    if (g_x) {  // lanes past count load as zero, so they add nothing
      const Vec u = g_j * (w ? Vec::loadu(w + j, count) : vone);
      u_acc = u_acc + u;
      u_x_hat_acc = u_x_hat_acc + u * x_hat;
    }
  }
  if (!g_x) return;
  const auto sum = [](Vec& p, Vec& q) { return p + q; };
  u_sum = at::vec::vec_reduce_all<acc_t>(sum, u_acc);
  u_x_hat_sum = at::vec::vec_reduce_all<acc_t>(sum, u_x_hat_acc);
  const Vec u_mean(centered ? u_sum / n : acc_t(0)), u_x_hat_mean(u_x_hat_sum / n);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec x_hat = (Vec::loadu(x + j, count) - vmean) * vrstd;
    const Vec u = Vec::loadu(g + j, count) * (w ? Vec::loadu(w + j, count) : vone);
    ((u - u_mean - x_hat * u_x_hat_mean) * vrstd).store(g_x + j, count);
  }
}

// Rows of scalar_t as acc_t: a pointer into the tensor when the types agree, else a converted
// copy in a per-thread buffer.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* row, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<acc_t>(row[j]);
    return buffer.data();
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* values, int64_t n, scalar_t* row) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(values[j]);
  }
}

// A 1-D parameter as contiguous acc_t (converted once per call when the dtypes differ).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc_type) {
  return t.defined() ? t.to(acc_type).contiguous() : t;
}

template <typename scalar_t>
void forward_rows(const at::Tensor& x, const at::Tensor& x_t, const at::Tensor& w_in, const at::Tensor& b_in,
                  const at::Tensor& dw_in, const at::Tensor& db_in, double eps, bool centered, at::Tensor& y,
                  at::Tensor& y_t, at::Tensor& mean_out, at::Tensor& rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const auto acc_type = mean_out.scalar_type();
  const at::Tensor w = as_acc(w_in, acc_type), b = as_acc(b_in, acc_type);
  const at::Tensor dw = as_acc(dw_in, acc_type), db = as_acc(db_in, acc_type);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* x_t_data = data_or_null<scalar_t>(x_t);
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  scalar_t* y_t_data = y_t.defined() ? y_t.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* mean_data = mean_out.mutable_data_ptr<acc_t>();
  acc_t* rstd_data = rstd_out.mutable_data_ptr<acc_t>();

  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_buf(same ? 0 : n), x_t_buf(same ? 0 : n), y_buf(same ? 0 : n), y_t_buf(same ? 0 : n);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* xr = row_as_acc<scalar_t, acc_t>(x_data + row * n, n, x_buf);
      const acc_t* x_t_row = x_t_data ? row_as_acc<scalar_t, acc_t>(x_t_data + row * n, n, x_t_buf) : nullptr;
      acc_t* yr = same ? reinterpret_cast<acc_t*>(y_data + row * n) : y_buf.data();
      acc_t* y_t_row = !y_t_data ? nullptr : same ? reinterpret_cast<acc_t*>(y_t_data + row * n) : y_t_buf.data();
      forward_row<acc_t>(xr, x_t_row, data_or_null<acc_t>(w), data_or_null<acc_t>(b), data_or_null<acc_t>(dw),
                         data_or_null<acc_t>(db), n, static_cast<acc_t>(eps), centered, yr, y_t_row,
                         mean_data[row], rstd_data[row]);
      store_row<scalar_t, acc_t>(yr, n, y_data + row * n);
      if (y_t_row) store_row<scalar_t, acc_t>(y_t_row, n, y_t_data + row * n);
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& mean,
                   const at::Tensor& rstd, bool centered, at::Tensor& grad_x, at::Tensor& partial_w,
                   at::Tensor& partial_b) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const at::Tensor w = as_acc(w_in, mean.scalar_type());
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const int64_t chunks = partial_w.defined() ? partial_w.size(0) : std::max<int64_t>(1, rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const scalar_t* g_data = grad.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
  scalar_t* g_x_data = grad_x.defined() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* partial_w_data = partial_w.defined() ? partial_w.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* partial_b_data = partial_b.defined() ? partial_b.mutable_data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> g_buf(same ? 0 : n), x_buf(same ? 0 : n), g_x_buf(same ? 0 : n);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const acc_t* gr = row_as_acc<scalar_t, acc_t>(g_data + row * n, n, g_buf);
        const acc_t* xr = row_as_acc<scalar_t, acc_t>(x_data + row * n, n, x_buf);
        acc_t* g_x_row = !g_x_data ? nullptr : same ? reinterpret_cast<acc_t*>(g_x_data + row * n) : g_x_buf.data();
        backward_row<acc_t>(gr, xr, data_or_null<acc_t>(w), n, mean_data[row], rstd_data[row], centered, g_x_row,
                            partial_w_data ? partial_w_data + chunk * n : nullptr,
                            partial_b_data ? partial_b_data + chunk * n : nullptr);
        if (g_x_row) store_row<scalar_t, acc_t>(g_x_row, n, g_x_data + row * n);
      }
    }
  });
}

// x: floating, with at least one feature per row (rows = numel / features).
void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0,
              "x: expected at least one feature in the last dimension, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating-point tensor, got ",
              x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_jvp_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_t_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& d_weight,
    const std::optional<at::Tensor>& d_bias, double eps, bool centered) {
  check_rows(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor x_t;
  if (present(x_t_in)) {
    check_like_input(*x_t_in, x, "x_t");
    TORCH_CHECK(x_t_in->sizes() == x.sizes(), "x_t: expected shape ", x.sizes(), " (as x), got ", x_t_in->sizes());
    x_t = x_t_in->contiguous();
  }
  const at::Tensor w = parameter(weight, x, "weight");
  const at::Tensor b = parameter(bias, x, "bias");
  const at::Tensor dw = parameter(d_weight, x, "d_weight");
  const at::Tensor db = parameter(d_bias, x, "d_bias");

  const int64_t rows = x.numel() / x.size(-1);
  const auto stats_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor y_t = (x_t.defined() || dw.defined() || db.defined()) ? at::empty_like(x) : at::Tensor();
  at::Tensor mean = at::empty({rows}, stats_options);
  at::Tensor rstd = at::empty({rows}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_jvp_forward", [&] {
    forward_rows<scalar_t>(x, x_t, w, b, dw, db, eps, centered, y, y_t, mean, rstd);
  });
  if (!y_t.defined()) y_t = at::empty({0}, x.options());
  return {y, y_t, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                                   bool centered, bool input_grad,
                                                                   bool param_grads) {
  check_rows(x_in);
  const at::Tensor x = x_in.contiguous();
  check_like_input(grad_in, x, "grad");
  TORCH_CHECK(grad_in.sizes() == x.sizes(), "grad: expected shape ", x.sizes(), " (as x), got ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor w = parameter(weight, x, "weight");
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "mean, rstd: expected ", rows, " values, got ",
              mean.numel(), " and ", rstd.numel());
  TORCH_CHECK(mean.scalar_type() == at::toOpMathType(x.scalar_type()) && rstd.scalar_type() == mean.scalar_type(),
              "mean, rstd: expected dtype ", at::toOpMathType(x.scalar_type()), ", got ", mean.scalar_type());

  at::Tensor grad_x = input_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor partial_w, partial_b;
  if (param_grads) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
    partial_w = at::zeros({chunks, n}, mean.options());
    partial_b = at::zeros({chunks, n}, mean.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_backward", [&] {
    backward_rows<scalar_t>(grad, x, w, mean, rstd, centered, grad_x, partial_w, partial_b);
  });
  const auto empty = at::empty({0}, x.options());
  const auto param_dtype = w.defined() ? w.scalar_type() : x.scalar_type();
  return {input_grad ? grad_x : empty, param_grads ? partial_w.sum(0).to(param_dtype) : empty,
          param_grads ? partial_b.sum(0).to(param_dtype) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(tangent_kernels, CPU, m) {
  m.impl("layer_norm_jvp_forward", &layer_norm_jvp_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
}

}  // namespace tangent_kernels
