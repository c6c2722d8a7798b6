"""Pure ``@triton.jit`` helpers shared by the kernels: no loads, no stores."""

import triton
import triton.language as tl

from . import INTERPRETING

if INTERPRETING:

    @triton.jit
    def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
        """``acc + a @ b``. Triton's interpreter multiplies bf16 tiles as their raw uint16 bits
        (Triton 3.8), so here the tiles are widened to fp32 first: the same products and fp32
        accumulation that a GPU's bf16/fp16 MMA gives."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

else:

    @triton.jit
    def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
        """``acc + a @ b`` with fp32 accumulation; ``DOT_PRECISION`` applies to fp32 tiles."""
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def gelu_and_derivative(u, TANH: tl.constexpr):
    """``(gelu(u), gelu'(u))`` in fp32, erf form or (``TANH``) tanh form."""
    if TANH:
        inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        e = tl.exp(-2.0 * tl.abs(inner))  # in (0, 1]: no overflow for any |inner|
        t = tl.where(inner >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)  # tanh(inner)
        value = 0.5 * u * (1.0 + t)
        derivative = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        value = u * cdf
        derivative = cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    return value, derivative
