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
