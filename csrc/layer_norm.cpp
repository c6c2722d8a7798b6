// Layer norm primal + tangent on the CPU, parallel over rows (DESIGN.md §1, §2).
//
// Forward, per row: y = g0 * x_hat + b0 and
//   y_t = g0 * (x_t - mean(x_t) - x_hat * mean(x_hat * x_t)) * rstd + dg * x_hat + db.
// Backward, for one upstream stream g: the layer-norm input gradient with g0 * g as upstream,
// and the column sums of g * x_hat and g (per-thread partial sums, added at the end).
// Accumulation is in at::opmath_type (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

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

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void forward_rows(const at::Tensor& x, const at::Tensor& x_t, const at::Tensor& w, const at::Tensor& b,
                  const at::Tensor& dw, const at::Tensor& db, double eps, at::Tensor& y, at::Tensor& y_t,
                  at::Tensor& mean_out, at::Tensor& rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* x_t_data = data_or_null<scalar_t>(x_t);
  const scalar_t* w_data = data_or_null<scalar_t>(w);
  const scalar_t* b_data = data_or_null<scalar_t>(b);
  const scalar_t* dw_data = data_or_null<scalar_t>(dw);
  const scalar_t* db_data = data_or_null<scalar_t>(db);
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  scalar_t* y_t_data = y_t.defined() ? y_t.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* mean_data = mean_out.mutable_data_ptr<acc_t>();
  acc_t* rstd_data = rstd_out.mutable_data_ptr<acc_t>();

  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x_data + row * n;
      acc_t sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += static_cast<acc_t>(xr[j]);
      const acc_t mean = sum / n;
      acc_t squares = 0;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t centered = static_cast<acc_t>(xr[j]) - mean;
        squares += centered * centered;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(squares / n + static_cast<acc_t>(eps));
      mean_data[row] = mean;
      rstd_data[row] = rstd;

      acc_t x_t_mean = 0, x_hat_x_t_mean = 0;
      const scalar_t* x_t_row = x_t_data ? x_t_data + row * n : nullptr;
      if (x_t_row) {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t x_t_j = static_cast<acc_t>(x_t_row[j]);
          x_t_mean += x_t_j;
          x_hat_x_t_mean += (static_cast<acc_t>(xr[j]) - mean) * rstd * x_t_j;
        }
        x_t_mean /= n;
        x_hat_x_t_mean /= n;
      }

      scalar_t* yr = y_data + row * n;
      scalar_t* y_t_row = y_t_data ? y_t_data + row * n : nullptr;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t x_hat = (static_cast<acc_t>(xr[j]) - mean) * rstd;
        const acc_t w_j = w_data ? static_cast<acc_t>(w_data[j]) : acc_t(1);
        yr[j] = static_cast<scalar_t>(x_hat * w_j + (b_data ? static_cast<acc_t>(b_data[j]) : acc_t(0)));
        if (y_t_row) {
          acc_t tangent = 0;
          if (x_t_row) tangent = (static_cast<acc_t>(x_t_row[j]) - x_t_mean - x_hat * x_hat_x_t_mean) * rstd * w_j;
          if (dw_data) tangent += static_cast<acc_t>(dw_data[j]) * x_hat;
          if (db_data) tangent += static_cast<acc_t>(db_data[j]);
          y_t_row[j] = static_cast<scalar_t>(tangent);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mean,
                   const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& partial_w, at::Tensor& partial_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const int64_t chunks = partial_w.defined() ? partial_w.size(0) : std::max<int64_t>(1, rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const scalar_t* g_data = grad.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* w_data = data_or_null<scalar_t>(w);
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
  scalar_t* g_x_data = grad_x.defined() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* partial_w_data = partial_w.defined() ? partial_w.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* partial_b_data = partial_b.defined() ? partial_b.mutable_data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const scalar_t* gr = g_data + row * n;
        const scalar_t* xr = x_data + row * n;
        const acc_t row_mean = mean_data[row], row_rstd = rstd_data[row];
        if (partial_w_data) {
          acc_t* pw = partial_w_data + chunk * n;
          acc_t* pb = partial_b_data + chunk * n;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t g = static_cast<acc_t>(gr[j]);
            pw[j] += g * (static_cast<acc_t>(xr[j]) - row_mean) * row_rstd;
            pb[j] += g;
          }
        }
        if (g_x_data) {
          acc_t u_mean = 0, u_x_hat_mean = 0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t u = static_cast<acc_t>(gr[j]) * (w_data ? static_cast<acc_t>(w_data[j]) : acc_t(1));
            u_mean += u;
            u_x_hat_mean += u * (static_cast<acc_t>(xr[j]) - row_mean) * row_rstd;
          }
          u_mean /= n;
          u_x_hat_mean /= n;
          scalar_t* gxr = g_x_data + row * n;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t u = static_cast<acc_t>(gr[j]) * (w_data ? static_cast<acc_t>(w_data[j]) : acc_t(1));
            const acc_t x_hat = (static_cast<acc_t>(xr[j]) - row_mean) * row_rstd;
            gxr[j] = static_cast<scalar_t>((u - u_mean - x_hat * u_x_hat_mean) * row_rstd);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_jvp_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_t_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& d_weight,
    const std::optional<at::Tensor>& d_bias, double eps) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "x: expected at least one feature in the last dimension, got shape ",
              x_in.sizes());
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
    forward_rows<scalar_t>(x, x_t, w, b, dw, db, eps, y, y_t, mean, rstd);
  });
  if (!y_t.defined()) y_t = at::empty({0}, x.options());
  return {y, y_t, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                                   bool input_grad, bool param_grads) {
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
    backward_rows<scalar_t>(grad, x, w, mean, rstd, grad_x, partial_w, partial_b);
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
