// Operator schemas of the tangent_kernels library and the Python module stub.
//
// Each op is declared once here; its CPU kernel registers with TORCH_LIBRARY_IMPL in its own file.
// Importing tangent_kernels._C loads this library, which fills torch.ops.tangent_kernels.*.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tangent_kernels, m) {
  // (y, y_t, mean, rstd); y_t is an empty tensor when every tangent input and offset is absent.
  // centered = false: RMSNorm (the mean is zero).
  m.def(
      "layer_norm_jvp_forward(Tensor x, Tensor? x_t, Tensor? weight, Tensor? bias, "
      "Tensor? d_weight, Tensor? d_bias, float eps, bool centered) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad input, grad weight, grad bias) for one upstream stream; results not asked for are empty.
  m.def(
      "layer_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
      "bool centered, bool input_grad, bool param_grads) -> (Tensor, Tensor, Tensor)");
  // (o, o_t, lse); o_t is empty when every tangent is absent; lse is natural-log, +inf for fully
  // masked rows. key_padding_mask is (B, Lk): bool (true = padding) or additive.
  m.def(
      "attention_jvp_forward(Tensor q, Tensor k, Tensor v, Tensor? q_t, Tensor? k_t, Tensor? v_t, "
      "Tensor? key_padding_mask, float scale, bool causal) -> (Tensor, Tensor, Tensor)");
  // (dq, dk, dv): the attention VJP at (q, k, v) for upstream grad_out; results not asked for are empty.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
      "Tensor? key_padding_mask, float scale, bool causal, bool need_dq, bool need_dkv) -> (Tensor, Tensor, Tensor)");
  // (a, a_t, gelu'(u)) for u = h + bias, u_t = h_t + d_bias; a_t is empty when h_t and d_bias are absent.
  m.def(
      "gelu_jvp_forward(Tensor h, Tensor? h_t, Tensor? bias, Tensor? d_bias, str approximate) "
      "-> (Tensor, Tensor, Tensor)");
}

extern "C" {
// A module with no Python functions: importing it only runs the static registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
