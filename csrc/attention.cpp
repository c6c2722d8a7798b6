// Attention primal + tangent on the CPU, flash style (DESIGN.md §1, §2).
//
// Forward: one task per (batch, query head, query tile), spread with at::parallel_for. A task
// walks the key tiles with online softmax and keeps acc = Σ p V, acc_t = Σ (p ⊙ (S_t − c)) V + p V_t
// with c the running softmax-weighted mean of S_t (acc_t −= δ · acc when c moves by δ), so that
// O_t = acc_t / l, rescaled together; the tile products are BLAS calls (ATen's CPU
// mm/addmm on tile views), the row updates ATen's vectorized exp. Scratch is O(tile), never N×N.
//
// Backward: the attention VJP at (q, k, v) for one upstream gradient dO (grad o for q, k, v;
// grad o_t for q_t, k_t, v_t). One task per (batch, key/value head) accumulates dK and dV over
// its whole query-head group (no races), and writes dQ tile by tile.
//
// Conventions as the Triton kernel: (B, H, N, D) tensors with any strides, key/value heads
// dividing query heads, causal aligned top-left, key-padding mask (B, Lk) that is boolean
// (true = padding) or additive, fully masked query rows give zeros, lse is natural-log.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "vec.h"

namespace tangent_kernels {
namespace {

constexpr int64_t kQueryTile = 128;
constexpr int64_t kKeyTile = 512;

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The key mask of one batch row: padding flags or additive scores (at most one is non-null).
template <typename acc_t>
struct KeyMask {
  const bool* padding = nullptr;
  const acc_t* additive = nullptr;
};

// The key-padding mask as contiguous (B, Lk) bool or acc_t; undefined when absent.
at::Tensor prepared_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k,
                         at::ScalarType acc_type) {
  if (!present(mask)) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool || at::isFloatingType(mask->scalar_type()),
              "key_padding_mask: expected dtype bool (true = padding) or a floating dtype (added to the scores), got ",
              mask->scalar_type());
  TORCH_CHECK(mask->device() == q.device(), "key_padding_mask: expected device ", q.device(), ", got ", mask->device());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
              "key_padding_mask: expected shape (", q.size(0), ", ", k.size(2), "), got ", mask->sizes());
  return mask->scalar_type() == at::kBool ? mask->contiguous() : mask->to(acc_type).contiguous();
}

template <typename acc_t>
KeyMask<acc_t> mask_row(const at::Tensor& mask, int64_t b) {
  KeyMask<acc_t> row;
  if (!mask.defined()) return row;
  if (mask.scalar_type() == at::kBool) {
    row.padding = mask.const_data_ptr<bool>() + b * mask.size(1);
  } else {
    row.additive = mask.const_data_ptr<acc_t>() + b * mask.size(1);
  }
  return row;
}

// rows [row0, row0 + rows) of head (b, h) of a (B, H, N, D) tensor -> contiguous [rows, D] acc_t.
template <typename scalar_t, typename acc_t>
void load_tile(const at::Tensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows, acc_t* dst) {
  const int64_t d = t.size(3), stride = t.stride(2);
  const scalar_t* src = t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1) + row0 * stride;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < d; ++j) dst[i * d + j] = static_cast<acc_t>(src[i * stride + j]);
  }
}

// contiguous [rows, D] acc_t (times factor) -> rows [row0, row0 + rows) of head (b, h) of t.
template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, acc_t factor, at::Tensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows) {
  const int64_t d = t.size(3), stride = t.stride(2);
  scalar_t* dst = t.mutable_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1) + row0 * stride;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < d; ++j) dst[i * stride + j] = static_cast<scalar_t>(src[i * d + j] * factor);
  }
}

// Scores of query q_index against keys [n0, n0 + cols): scaled, masked entries at -inf.
template <typename acc_t>
void scale_and_mask(acc_t* s, int64_t cols, int64_t q_index, int64_t n0, acc_t scale, bool causal,
                    const KeyMask<acc_t>& mask) {
  using Vec = at::vec::Vectorized<acc_t>;
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, s, s, cols);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (mask.additive) {
    for (int64_t j = 0; j < cols; ++j) s[j] += mask.additive[n0 + j];
  }
  if (mask.padding) {
    for (int64_t j = 0; j < cols; ++j) {
      if (mask.padding[n0 + j]) s[j] = neg_inf;
    }
  }
  if (causal) {
    for (int64_t j = std::max<int64_t>(0, q_index + 1 - n0); j < cols; ++j) s[j] = neg_inf;
  }
}

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, cols);
}

template <typename acc_t>
acc_t row_sum(const acc_t* s, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, s, cols);
}

// A [rows, cols] acc_t matrix over a scratch buffer, for ATen's BLAS-backed mm/addmm.
at::Tensor matrix(void* data, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return at::from_blob(data, {rows, cols}, options);
}

// Copies rows [row0, row0 + rows) of head (b, h) into columns [col0, col0 + D) of a row-major
// acc_t buffer with row stride ld (so two operands can sit side by side for one wider product).
template <typename scalar_t, typename acc_t>
void load_tile_into(const at::Tensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows, acc_t* dst, int64_t ld) {
  const int64_t d = t.size(3), stride = t.stride(2);
  const scalar_t* src = t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1) + row0 * stride;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < d; ++j) dst[i * ld + j] = static_cast<acc_t>(src[i * stride + j]);
  }
}

// The forward of one (batch, head, query tile). Products per key tile, each one BLAS call:
//   [S | Q K_tᵀ] = s · Q [K; K_t]ᵀ,  S_t += s · Q_t Kᵀ,  [acc | acc_t] += P [V | V_t],  acc_t += (P ⊙ S_t) V
// so the six N×N×D products of DESIGN.md §1 run as four wider GEMMs.
template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_t,
                  const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& mask, double scale_in,
                  bool causal, at::Tensor& o, at::Tensor& o_t, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2), group = q_heads / kv_heads;
  const int64_t q_tiles = (q_len + kQueryTile - 1) / kQueryTile;
  const bool has_q_t = q_t.defined(), has_k_t = k_t.defined(), has_v_t = v_t.defined();
  const bool has_s_t = has_q_t || has_k_t, has_tangent = has_s_t || has_v_t;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
  const int64_t ld_s = 2 * kKeyTile, ld_acc = 2 * d;  // [S | S_t] and [acc | acc_t] side by side

  at::parallel_for(0, batch * q_heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({2 * kQueryTile * d + 2 * kQueryTile * ld_acc + 2 * kKeyTile * d
                                    + kKeyTile * ld_acc + kQueryTile * ld_s + 3 * kQueryTile}, options);  // fmt: skip
    acc_t* next = scratch.mutable_data_ptr<acc_t>();
    auto take = [&next](int64_t n) { acc_t* p = next; next += n; return p; };
    acc_t *qf = take(kQueryTile * d), *q_tf = take(kQueryTile * d);
    acc_t *acc = take(kQueryTile * ld_acc), *out = take(kQueryTile * ld_acc);
    acc_t *kk = take(2 * kKeyTile * d), *vv = take(kKeyTile * ld_acc), *s = take(kQueryTile * ld_s);
    acc_t *m = take(kQueryTile), *l = take(kQueryTile), *c = take(kQueryTile);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % q_tiles, bh = task / q_tiles, b = bh / q_heads, h = bh % q_heads;
      const int64_t kv_h = h / group, row0 = tile * kQueryTile, rows = std::min(kQueryTile, q_len - row0);
      const KeyMask<acc_t> key_mask = mask_row<acc_t>(mask, b);
      load_tile<scalar_t>(q, b, h, row0, rows, qf);
      if (has_q_t) load_tile<scalar_t>(q_t, b, h, row0, rows, q_tf);
      std::fill(acc, acc + rows * ld_acc, acc_t(0));
      std::fill(m, m + rows, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + rows, acc_t(0));
      std::fill(c, c + rows, acc_t(0));
      const at::Tensor Q = matrix(qf, rows, d, options), Q_t = matrix(q_tf, rows, d, options);
      at::Tensor acc_both = at::from_blob(acc, {rows, ld_acc}, options);
      at::Tensor A = acc_both.narrow(1, 0, d), A_t = acc_both.narrow(1, d, d);

      const int64_t key_end = causal ? std::min(k_len, row0 + rows) : k_len;
      for (int64_t n0 = 0; n0 < key_end; n0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, key_end - n0);
        load_tile<scalar_t>(k, b, kv_h, n0, cols, kk);
        if (has_k_t) load_tile<scalar_t>(k_t, b, kv_h, n0, cols, kk + cols * d);
        load_tile_into<scalar_t>(v, b, kv_h, n0, cols, vv, ld_acc);
        if (has_v_t) load_tile_into<scalar_t>(v_t, b, kv_h, n0, cols, vv + d, ld_acc);
        const at::Tensor K_both = matrix(kk, (has_k_t ? 2 : 1) * cols, d, options);
        at::Tensor S_both = at::from_blob(s, {rows, ld_s}, options).narrow(1, 0, (has_k_t ? 2 : 1) * cols);
        at::Tensor S = S_both.narrow(1, 0, cols);
        at::Tensor S_t = at::from_blob(s, {rows, ld_s}, options).narrow(1, cols, cols);
        at::cpu::addmm_(S_both, Q, K_both.t(), 0, scale);
        if (has_q_t) at::cpu::addmm_(S_t, Q_t, K_both.narrow(0, 0, cols).t(), has_k_t ? 1 : 0, scale);
        for (int64_t i = 0; i < rows; ++i) {
          acc_t* si = s + i * ld_s;
          scale_and_mask(si, cols, row0 + i, n0, acc_t(1), causal, key_mask);
          const acc_t tile_max = row_max(si, cols);
          const acc_t m_new = (std::isnan(tile_max) || tile_max > m[i]) ? tile_max : m[i];
          const acc_t shift = m_new == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m_new;
          const acc_t alpha = std::exp(m[i] - shift);
          at::vec::map([shift](Vec x) { return (x - Vec(shift)).exp(); }, si, si, cols);
          const acc_t l_old = l[i] * alpha;
          l[i] = l_old + row_sum(si, cols);
          acc_t* acc_i = acc + i * ld_acc;
          at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, acc_i, acc_i, ld_acc);
          if (has_s_t) {
            // S_t centred on its running softmax-weighted mean c (as the Triton kernel): a large
            // common part then cancels exactly, where acc_t / l - (r / l) O subtracted two large
            // products (float32 O_t was 2e-5 off with one key; torch 0)
            acc_t* sti = si + cols;
            const acc_t tile_r = at::vec::map2_reduce_all<acc_t>(
                [](Vec p, Vec st) { return p * st; }, [](Vec& x, Vec& y) { return x + y; }, si, sti, cols);
            const acc_t c_new = l[i] == acc_t(0) ? acc_t(0) : (c[i] * l_old + tile_r) / l[i];
            const acc_t delta = c_new - c[i];
            if (delta != acc_t(0)) {
              for (int64_t j = 0; j < d; ++j) acc_i[d + j] -= delta * acc_i[j];
            }
            at::vec::map2([c_new](Vec p, Vec st) { return p * (st - Vec(c_new)); }, sti, si, sti, cols);
            c[i] = c_new;
          }
          m[i] = m_new;
        }
        const at::Tensor V_both = at::from_blob(vv, {cols, ld_acc}, options);
        if (has_v_t) {
          at::cpu::addmm_(acc_both, S, V_both);
        } else {
          at::cpu::addmm_(A, S, V_both.narrow(1, 0, d));
        }
        if (has_s_t) at::cpu::addmm_(A_t, S_t, V_both.narrow(1, 0, d));
      }

      // epilogue: O = acc / l, O_t = acc_t / l (S_t centred); a fully masked row (l = 0) gives zeros
      acc_t* o_rows = out;
      acc_t* o_t_rows = out + kQueryTile * d;
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t inv_l = l[i] == acc_t(0) ? acc_t(0) : acc_t(1) / l[i];
        for (int64_t j = 0; j < d; ++j) {
          o_rows[i * d + j] = acc[i * ld_acc + j] * inv_l;
          o_t_rows[i * d + j] = acc[i * ld_acc + d + j] * inv_l;
        }
        lse_data[bh * q_len + row0 + i] =
            l[i] == acc_t(0) ? std::numeric_limits<acc_t>::infinity() : m[i] + std::log(l[i]);
      }
      store_tile<scalar_t>(o_rows, acc_t(1), o, b, h, row0, rows);
      if (has_tangent) store_tile<scalar_t>(o_t_rows, acc_t(1), o_t, b, h, row0, rows);
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& lse, const at::Tensor& mask, double scale_in, bool causal,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2), group = q_heads / kv_heads;
  const bool need_dq = dq.defined(), need_dkv = dk.defined();
  const acc_t scale = static_cast<acc_t>(scale_in);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({4 * kQueryTile * d + 2 * kKeyTile * d + 2 * kQueryTile * kKeyTile
                                    + kQueryTile + 2 * k_len * d}, options);  // fmt: skip
    acc_t* next = scratch.mutable_data_ptr<acc_t>();
    auto take = [&next](int64_t n) { acc_t* p = next; next += n; return p; };
    acc_t *qf = take(kQueryTile * d), *dof = take(kQueryTile * d), *of = take(kQueryTile * d);
    acc_t *dqf = take(kQueryTile * d), *kf = take(kKeyTile * d), *vf = take(kKeyTile * d);
    acc_t *p = take(kQueryTile * kKeyTile), *dp = take(kQueryTile * kKeyTile), *delta = take(kQueryTile);
    acc_t *dkf = take(k_len * d), *dvf = take(k_len * d);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kv_h = task % kv_heads;
      const KeyMask<acc_t> key_mask = mask_row<acc_t>(mask, b);
      std::fill(dkf, dkf + k_len * d, acc_t(0));
      std::fill(dvf, dvf + k_len * d, acc_t(0));
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv_h * group + g, bh = b * q_heads + h;
        for (int64_t row0 = 0; row0 < q_len; row0 += kQueryTile) {
          const int64_t rows = std::min(kQueryTile, q_len - row0);
          load_tile<scalar_t>(q, b, h, row0, rows, qf);
          load_tile<scalar_t>(grad_out, b, h, row0, rows, dof);
          load_tile<scalar_t>(o, b, h, row0, rows, of);
          for (int64_t i = 0; i < rows; ++i) {
            delta[i] = at::vec::map2_reduce_all<acc_t>(
                [](Vec a, Vec c) { return a * c; }, [](Vec a, Vec c) { return a + c; }, dof + i * d, of + i * d, d);
          }
          std::fill(dqf, dqf + rows * d, acc_t(0));
          at::Tensor Q = matrix(qf, rows, d, options), dO = matrix(dof, rows, d, options);
          at::Tensor dQ = matrix(dqf, rows, d, options);
          const int64_t key_end = causal ? std::min(k_len, row0 + rows) : k_len;
          for (int64_t n0 = 0; n0 < key_end; n0 += kKeyTile) {
            const int64_t cols = std::min(kKeyTile, key_end - n0);
            load_tile<scalar_t>(k, b, kv_h, n0, cols, kf);
            load_tile<scalar_t>(v, b, kv_h, n0, cols, vf);
            at::Tensor K = matrix(kf, cols, d, options), V = matrix(vf, cols, d, options);
            at::Tensor P = matrix(p, rows, cols, options), dP = matrix(dp, rows, cols, options);
            at::cpu::mm_out(P, Q, K.t());
            at::cpu::mm_out(dP, dO, V.t());
            for (int64_t i = 0; i < rows; ++i) {
              acc_t* pi = p + i * cols;
              scale_and_mask(pi, cols, row0 + i, n0, scale, causal, key_mask);
              const acc_t row_lse = lse_data[bh * q_len + row0 + i];  // +inf for a fully masked row: p = 0
              at::vec::map([row_lse](Vec x) { return (x - Vec(row_lse)).exp(); }, pi, pi, cols);
              const acc_t delta_i = delta[i];
              at::vec::map2([delta_i](Vec pv, Vec dpv) { return pv * (dpv - Vec(delta_i)); }, dp + i * cols, pi,
                            dp + i * cols, cols);
            }
            if (need_dkv) {
              at::Tensor dV = matrix(dvf + n0 * d, cols, d, options), dK = matrix(dkf + n0 * d, cols, d, options);
              at::cpu::addmm_(dV, P.t(), dO);
              at::cpu::addmm_(dK, dP.t(), Q);
            }
            if (need_dq) at::cpu::addmm_(dQ, dP, K);
          }
          if (need_dq) store_tile<scalar_t>(dqf, scale, dq, b, h, row0, rows);
        }
      }
      if (need_dkv) {
        store_tile<scalar_t>(dkf, scale, dk, b, kv_h, 0, k_len);
        store_tile<scalar_t>(dvf, acc_t(1), dv, b, kv_h, 0, k_len);
      }
    }
  });
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: expected 4-D (B, H, N, D) tensors");
  TORCH_CHECK(q.device().is_cpu() && k.device() == q.device() && v.device() == q.device(),
              "q, k, v: expected CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "k, v: expected shape (", q.size(0), ", heads, tokens, ", q.size(3), "), got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k: its ", k.size(1), " heads must divide the ",
              q.size(1), " heads of q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q: expected a floating-point tensor, got ",
              q.scalar_type());
}

// Unit stride along the head dim (a copy only when it is not so).
at::Tensor rows_of(const at::Tensor& t) {
  return t.stride(3) == 1 ? t : t.contiguous();
}

at::Tensor optional_rows(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!present(t)) return at::Tensor();
  TORCH_CHECK(t->sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == like.device(), name, ": expected device ", like.device(), ", got ", t->device());
  return rows_of(*t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& q_t_in,
    const std::optional<at::Tensor>& k_t_in, const std::optional<at::Tensor>& v_t_in,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool causal) {
  check_attention_inputs(q_in, k_in, v_in);
  const at::Tensor q = rows_of(q_in), k = rows_of(k_in), v = rows_of(v_in);
  const at::Tensor q_t = optional_rows(q_t_in, q, "q_t"), k_t = optional_rows(k_t_in, k, "k_t");
  const at::Tensor v_t = optional_rows(v_t_in, v, "v_t");
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const at::Tensor mask = prepared_mask(key_padding_mask, q, k, acc_type);
  // outputs stored as (B, N, H, D), so merging the heads afterwards is a view, not a copy
  const auto bnhd = [&q]() { return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2); };
  at::Tensor o = bnhd();
  const bool has_tangent = q_t.defined() || k_t.defined() || v_t.defined();
  at::Tensor o_t = has_tangent ? bnhd() : at::empty({0}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_jvp_forward", [&] {
    forward_impl<scalar_t>(q, k, v, q_t, k_t, v_t, mask, scale, causal, o, o_t, lse);
  });
  return {o, o_t, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool causal, bool need_dq, bool need_dkv) {
  check_attention_inputs(q_in, k_in, v_in);
  const at::Tensor q = rows_of(q_in), k = rows_of(k_in), v = rows_of(v_in);
  const at::Tensor o = optional_rows(o_in, q, "o"), grad_out = optional_rows(grad_out_in, q, "grad_out");
  const auto acc_type = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse_in.sizes() == q.sizes().slice(0, 3) && at::isFloatingType(lse_in.scalar_type()) &&
                  lse_in.device() == q.device(),
              "lse: expected a floating (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              ") tensor on the device of q (one value per query row), got ", lse_in.sizes(), " ",
              lse_in.scalar_type(), " on ", lse_in.device());
  const at::Tensor lse = lse_in.to(acc_type).contiguous();
  const at::Tensor mask = prepared_mask(key_padding_mask, q, k, acc_type);
  at::Tensor dq = need_dq ? at::empty(q.sizes(), q.options()) : at::Tensor();
  at::Tensor dk = need_dkv ? at::empty(k.sizes(), k.options()) : at::Tensor();
  at::Tensor dv = need_dkv ? at::empty(v.sizes(), v.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_backward", [&] {
    backward_impl<scalar_t>(grad_out, q, k, v, o, lse, mask, scale, causal, dq, dk, dv);
  });
  const auto empty = at::empty({0}, q.options());
  return {need_dq ? dq : empty, need_dkv ? dk : empty, need_dkv ? dv : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(tangent_kernels, CPU, m) {
  m.impl("attention_jvp_forward", &attention_jvp_forward);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace tangent_kernels
