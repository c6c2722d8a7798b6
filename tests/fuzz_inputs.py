"""Hypothesis building blocks for tests/test_fuzz.py: tensors of drawn dtype, device, memory layout
and values, each possibly made invalid on purpose, with a record of which arguments were.

A ``Draft`` draws the tensors of one call. Every argument it makes invalid (a dtype or device
other than the call's, a wrong shape, a sparse tensor, something that is not a tensor) is added
to ``draft.defects``; a call without defects must succeed, a call with one must raise an error
that names one of them. Gaps in the storage of strided layouts are filled with NaN, so a kernel
that reads outside a view yields NaN where the float64 oracle has none.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NOT_FLOATING = (torch.int64, torch.int32, torch.bool, torch.complex64)

# memory layouts of a tensor with the same logical shape (see laid_out)
LAYOUTS = ("contiguous", "reversed", "strided", "unit-gap", "offset", "expanded")


def weighted(*pairs):
    """``sampled_from`` with repetition as weights: ``weighted((3, "a"), (1, "b"))``; the first
    value is the one hypothesis shrinks towards."""
    return st.sampled_from([value for count, value in pairs for _ in range(count)])


def values(shape, dtype: torch.dtype, generator: torch.Generator, magnitude: float) -> torch.Tensor:
    """Random contiguous CPU values of ``dtype``: normal for floats, small integers, random bools."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-3, 4, shape, generator=generator, dtype=dtype)
    real = torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude
    if dtype.is_complex:
        return torch.complex(real, real.flip(-1) if real.dim() else real).to(dtype)
    return real.to(dtype)


def _gap_fill(dtype: torch.dtype):
    return math.nan if dtype.is_floating_point else 0


def laid_out(t: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """``t`` (contiguous) re-laid in memory; ``dim`` picks the dimension a layout acts on.

    ``reversed``: dims stored in reverse order (a (B, N, H, D) buffer seen as (B, H, N, D) for
    4-D). ``strided``: every second element along ``dim`` (NaN between). ``unit-gap``: the last
    dimension at stride 2. ``offset``: a storage offset of one NaN. ``expanded``: ``dim`` at
    stride 0 (its first slice repeated)."""
    if t.dim() == 0 or layout == "contiguous":
        return t
    dim %= t.dim()
    if layout == "reversed":  # both orders are their own inverse
        order = [0, 2, 1, 3] if t.dim() == 4 else list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if layout in ("strided", "unit-gap"):
        dim = t.dim() - 1 if layout == "unit-gap" else dim
        wide = list(t.shape)
        wide[dim] *= 2
        storage = torch.full(wide, _gap_fill(t.dtype), dtype=t.dtype)
        view = storage[(slice(None),) * dim + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    if layout == "offset":
        storage = torch.full((t.numel() + 1,), _gap_fill(t.dtype), dtype=t.dtype)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view
    if layout == "expanded":
        return t.narrow(dim, 0, min(1, t.shape[dim])).expand(t.shape)
    raise ValueError(layout)


class Draft:
    """The tensors of one call, drawn with ``draw``: a common dtype and device, values from one
    seeded generator, and the set of arguments made invalid on purpose (``defects``)."""

    def __init__(self, draw, *, dtypes=FLOATING, devices=("cpu",), magnitudes=(1.0,)):
        self.draw = draw
        # arguments made invalid: none in about half the calls, one, or (now and then) many
        self.corruptions_left = draw(weighted((8, 0), (6, 1), (1, 99)))
        invalid_dtype = self.corruptions_left and draw(weighted((12, False), (1, True)))
        self.dtype = draw(st.sampled_from(NOT_FLOATING if invalid_dtype else dtypes))
        self.device = draw(st.sampled_from(devices))
        self.magnitude = draw(st.sampled_from(magnitudes))
        self.generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        self.defects: set[str] = set()
        self.shape_corrupted = False
        self.corruptions: list[str] = []  # (shown when a case fails)
        self.drawn: dict[str, torch.Tensor] = {}  # the tensors whose dtype and device must agree

    def defect(self, *names: str) -> None:
        self.defects.update(names)

    def other_device(self) -> str:
        return "meta" if self.device == "cpu" else "cpu"

    def _corruption(self) -> str:
        if not self.corruptions_left:
            return "none"
        kind = self.draw(
            weighted((12, "none"), (2, "dtype"), (2, "device"), (2, "shape"), (1, "sparse"), (1, "type"))
        )
        if kind == "shape" and self.shape_corrupted:
            return "none"  # two wrong shapes could agree with each other
        self.shape_corrupted |= kind == "shape"
        self.corruptions_left -= kind != "none"
        return kind

    def corrupt(self, name: str) -> bool:
        """Whether to make the non-tensor argument ``name`` invalid (then it counts as a defect)."""
        if not self.corruptions_left or not self.draw(weighted((6, False), (1, True))):
            return False
        self.corruptions_left -= 1
        self.defect(name)
        return True

    def option(self, name: str, valid, invalid):
        """A value of ``valid`` (a strategy), or of ``invalid`` when ``corrupt(name)``."""
        return self.draw(invalid if self.corrupt(name) else valid)

    def tensor(
        self,
        name: str,
        shape,
        *,
        wrong=None,
        related=(),
        layouts=LAYOUTS,
        special=True,
        dtype=None,
        magnitude=None,
        corruptible: bool = True,
    ) -> torch.Tensor:
        """A tensor argument of ``shape``. ``wrong`` lists shapes that make it invalid (default:
        any other shape, for an argument whose shape is fixed by the others); ``related`` are the
        arguments an error may name instead when its shape is wrong."""
        shape = tuple(shape)
        dtype = dtype or self.dtype
        device = self.device
        corruption = self._corruption() if corruptible else "none"
        if corruption != "none":
            self.corruptions.append(f"{name}: {corruption}")
        if corruption == "shape" and wrong == []:
            corruption = "none"
        if corruption == "dtype":
            dtype = self.draw(st.sampled_from([d for d in FLOATING + NOT_FLOATING if d != dtype]))
        elif corruption == "device":
            device = self.other_device()
        elif corruption == "shape":
            shape = self.wrong_shape(shape) if wrong is None else self.draw(st.sampled_from(wrong))
        if corruption in ("shape", "sparse", "type"):
            self.defect(name, *related)
        t = values(shape, dtype, self.generator, self.magnitude if magnitude is None else magnitude)
        if special and dtype.is_floating_point and t.numel():
            kind = self.draw(weighted((14, None), (1, math.nan), (1, math.inf), (1, -math.inf)))
            if kind is not None:
                t.view(-1)[self.draw(st.integers(0, t.numel() - 1))] = kind
        layout = self.draw(st.sampled_from(layouts))
        t = laid_out(t, layout, self.draw(st.integers(0, 3)))
        if corruption == "sparse":
            return t.to_sparse()
        if corruption == "type":
            return self.draw(st.sampled_from([t.tolist(), 1.5, "tensor"]))
        t = t.to(device)
        if dtype.is_floating_point and self.draw(weighted((5, False), (1, True))):
            t.requires_grad_()
        self.drawn[name] = t
        return t

    def finish(self) -> tuple[torch.dtype, str] | None:
        """Add the dtype and device defects, relative to the first tensor drawn (a lone tensor
        of another dtype is valid: it sets the call's dtype). Returns that first tensor's dtype
        and device type (``None`` without tensors)."""
        if not self.drawn:
            return None
        first_name, first = next(iter(self.drawn.items()))
        if not first.dtype.is_floating_point:
            self.defect(first_name)
        for name, t in self.drawn.items():
            if t.dtype != first.dtype or t.device != first.device or not t.dtype.is_floating_point:
                self.defect(name)
        return first.dtype, first.device.type

    def optional(self, name: str, shape, **kwargs) -> torch.Tensor | None:
        """``tensor``, or ``None`` (an absent tangent, bias, offset) half the time."""
        return self.tensor(name, shape, **kwargs) if self.draw(st.booleans()) else None

    def wrong_shape(self, shape: tuple) -> tuple:
        """``shape`` with one dimension grown by one, or a dimension added or removed."""
        how = self.draw(st.sampled_from(["grow", "add", "drop"] if shape else ["add"]))
        if how == "add":
            return (1, *shape)
        if how == "drop":
            return shape[1:]
        dim = self.draw(st.integers(0, len(shape) - 1))
        return shape[:dim] + (shape[dim] + 1,) + shape[dim + 1 :]
