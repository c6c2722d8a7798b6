"""Property-based fuzz suite over the public entries: each call either matches the float64 oracle
or raises a clear error, never a result that differs, another exception type, or a hang.

The entries: ``functional.attention_jvp``, ``layer_norm_jvp``, ``linear_jvp``, ``gelu_jvp`` and
``mlp_jvp`` on every backend (Triton under the interpreter, on tiny shapes); the modules
``TangentLinear``, ``TangentLayerNorm`` and ``TangentAttention`` built from torch/timm modules;
the raw ops under ``torch.ops.tangent_kernels``. Inputs are drawn with ``fuzz_inputs.Draft``:
shapes with 0 and 1 in every dimension, every floating dtype and invalid ones, the CPU and meta
devices and mixes of them, strided, transposed, offset and expanded layouts, masks of every
dtype and of wrong shapes, NaN and inf values, absent tangents, odd scales.

The oracle is ``torch.func.jvp`` of the plain PyTorch layer (math SDPA with the equivalent
``attn_mask``, ``F.layer_norm``, ``F.linear``, ``F.gelu``) in float64. A result matches it when
it has torch's shape, dtype and device, NaN exactly where the oracle has NaN, the oracle's
infinities, and elsewhere an error of at most 2 × that of torch in the same dtype + ATOL (the
flash-attention rule, tests/helpers.py). On a subset (inputs drawn with ``requires_grad``), the
gradients of ⟨y, g⟩ + ⟨y_t, g_t⟩ are checked against the oracle's (``GRADIENT_RULE``). A call
with an argument made invalid on purpose must raise TypeError, ValueError, NotImplementedError or
BackendUnavailableError naming it; a call without one must succeed (an explicitly requested
backend that cannot serve the device or dtype counts as an invalid ``backend``). The oracle
differs from torch where torch's own answer is an artifact, each said where it is done: an absent
tangent is a structural zero (no NaN · 0), a row whose scores are all -inf gives zeros as torch's
SDPA does (its jvp gives NaN), no keys give zeros, and gradients of layer norms use elementary ops
(torch's layer-norm forward-AD rule has a wrong second derivative, pytorch/pytorch#196700).

CI runs a bounded number of examples (``derandomize=True``); ``TANGENT_KERNELS_FUZZ_EXAMPLES=N``
runs N examples per test (Triton: N / 4) with fresh randomness, for a local bug hunt. Draws that
hit a bug reported to the owner of its code are skipped (``known_bug``) unless
``TANGENT_KERNELS_FUZZ_KNOWN=1``. The regression tests at the end are the smallest calls that
showed each bug this suite found and that was fixed.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import pytest
import timm.layers
import torch
import torch.nn.functional as torch_F
from fuzz_inputs import FLOATING, Draft, laid_out, values, weighted
from helpers import ATOL, max_relative_error, walk_norm_rows
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from tangent_kernels import functional as F

HUNT = int(os.environ.get("TANGENT_KERNELS_FUZZ_EXAMPLES", "0"))
SHOW_KNOWN = os.environ.get("TANGENT_KERNELS_FUZZ_KNOWN") == "1"


def known_bug(found: bool, what: str) -> None:
    """Skip a draw that hits a bug reported to the owner of its code (``what``), unless
    ``TANGENT_KERNELS_FUZZ_KNOWN=1``; remove the call once it is fixed."""
    assume(SHOW_KNOWN or not found)


def fuzz_settings(examples: int, per_example_s: float, hunt_share: int = 1):
    """Hypothesis settings and a pytest-timeout for ``examples`` examples (in a hunt: HUNT //
    ``hunt_share``); the timeout fails a hang."""
    examples = max(1, HUNT // hunt_share) if HUNT else examples
    timeout = pytest.mark.timeout(60 + int(examples * per_example_s * 20))

    def decorate(test):
        return timeout(
            settings(
                max_examples=examples,
                deadline=None,
                derandomize=not HUNT,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(test)
        )

    return decorate


needs_cpp = pytest.mark.skipif(not tk.cpp.AVAILABLE, reason=tk.cpp.UNAVAILABLE_REASON)
needs_triton = pytest.mark.skipif(not tk.backends.triton_backend.AVAILABLE, reason="triton is not importable")
ALLOWED = (TypeError, ValueError, NotImplementedError, tk.BackendUnavailableError)


# ----------------------------------------------------------------------------------------------
# one call and its check


@dataclass
class Call:
    """One drawn call of an entry: ``run()`` calls it and returns ``(y, y_t)``; ``layer(dtype,
    **primals)`` is the plain PyTorch layer the oracle differentiates; ``tangents`` maps each
    primal name to its tangent (``None``: zero), ``tangent_names`` to that tangent's argument name
    (default ``<name>_t``); ``names`` are the entry's argument names, ``defects`` those made
    invalid on purpose ("*": all of them)."""

    run: Callable[[], tuple]
    layer: Callable[..., Tensor]
    primals: dict[str, Tensor | None]
    tangents: dict[str, Tensor | None]
    names: set[str]
    defects: set[str] = field(default_factory=set)
    options: dict = field(default_factory=dict)  # the other arguments (shown when a case fails)
    tangent_names: dict[str, str] = field(default_factory=dict)  # primal name -> its tangent's argument name
    grad_layer: Callable[..., Tensor] | None = None  # the layer of the gradient oracle, if not ``layer``
    allowed: tuple = ALLOWED  # the exception types a refusal may have
    may_refuse: set[str] = field(default_factory=set)  # arguments that may be refused without being invalid
    after: Callable[[], None] | None = None  # further checks once the result matched (raw ops' statistics)
    unnamed_ok: str = "^$"  # a refusal whose message matches this may name no argument
    factor: float = 2.0  # × torch's error in the bound (a composite of several ops compounds theirs)


def names_one_of(message: str, names) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) for name in names)


def check(call: Call, grad_seed: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time fallback warnings of "auto"
            out = call.run()
    except call.allowed as error:
        event(f"raised {type(error).__name__}")
        refusable = call.defects | call.may_refuse
        assert refusable, f"valid input refused: {type(error).__name__}: {error}"
        named = call.names if "*" in call.defects else refusable
        assert names_one_of(str(error), named) or re.search(call.unnamed_ok, str(error)), (
            f"the error names none of {sorted(named)}: {error!r}"
        )
        return
    assert not call.defects, f"invalid {sorted(call.defects)} accepted, returned {describe(out)}"
    y, y_t = out
    event(f"returned on {y.device.type}")
    has_tangent = any(t is not None for t in call.tangents.values())
    assert (y_t is not None) == has_tangent, f"y_t is {describe(y_t)} with tangents given: {has_tangent}"
    expected, expected_t, _ = oracle(call, torch.float64)
    baseline, baseline_t, _ = oracle(call, y.dtype if y.dtype in FLOATING else torch.float64)
    assert_matches("y", y, expected, baseline, factor=call.factor)
    # torch itself failing on y (an overflow: 0 for rows of 1e20 in float32) can make its y_t
    # right by accident: then y_t gets the wider bound of a failed baseline
    torch_failed = y.device.type == "cpu" and not torch_close(baseline, expected)
    finite_primals, finite_tangents = (
        all(finite(t) for t in group.values()) for group in (call.primals, call.tangents)
    )
    if y_t is not None:
        # a NaN (a primal's, or 0/0 in y) times an absent (zero) tangent: torch's formulas often
        # materialize the zero (NaN · 0), the library's skip the term; both are right where y_t
        # does not depend on that NaN. With an inf in a tangent (and finite primals), inf or NaN in
        # y_t depends on the formula's order: either passes
        clean = finite_primals and finite(expected)
        if not finite_primals:  # (an inf primal: a tangent term inf · 0 may be NaN where torch skips it)
            y_t = torch.where(y_t.isnan() & expected_t.isfinite(), expected_t.to(y_t.dtype), y_t)
        assert_matches(
            "y_t",
            y_t,
            expected_t,
            baseline_t,
            nan_exact=clean and finite_tangents,
            finite_exact=clean and not finite_tangents,
            factor=call.factor,
            torch_failed=torch_failed,
        )
    if (
        y.device.type == "cpu"
        and finite_primals
        and finite_tangents
        and any(t.requires_grad for t in tensors(call))
    ):
        check_gradients(call, y, y_t, grad_seed)
    if call.after is not None and y.device.type == "cpu":
        call.after()


def torch_close(baseline: Tensor, expected: Tensor) -> bool:
    """Torch's result in the input dtype is within 1% of the float64 oracle where that is finite."""
    ok = expected.isfinite()
    b, e = baseline.detach().double()[ok], expected.detach().double()[ok]
    return not b.numel() or bool(b.isfinite().all() and (b - e).abs().max() <= 1e-2 * max(1.0, e.abs().max()))


def finite(t) -> bool:
    """``t`` holds no inf or NaN (anything but a dense CPU tensor counts as finite)."""
    dense = isinstance(t, Tensor) and t.layout == torch.strided and t.device.type != "meta"
    return not dense or bool(t.detach().isfinite().all())


def tensors(call: Call) -> list[Tensor]:
    return [t for t in (*call.primals.values(), *call.tangents.values()) if isinstance(t, Tensor)]


def describe(t) -> str:
    if isinstance(t, tuple):
        return "(" + ", ".join(map(describe, t)) + ")"
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)


def plain(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A detached CPU copy in ``dtype`` (zeros for a meta tensor: only its shape counts)."""
    return (
        torch.zeros(t.shape, dtype=dtype)
        if t.device.type == "meta"
        else torch.empty(t.shape, dtype=dtype).copy_(t)
    )


def copy(t: Tensor | None, dtype: torch.dtype, like: Tensor | None = None) -> Tensor | None:
    """``plain(t)``, a leaf requiring grad as ``t`` does (zeros shaped as ``like`` for ``None``)."""
    if t is None:
        return None if like is None else torch.zeros(like.shape, dtype=dtype)
    return plain(t, dtype).requires_grad_(t.requires_grad)


def oracle(call: Call, dtype: torch.dtype, for_grad: bool = False):
    """``(y, y_t, copies)``: torch.func.jvp of the plain layer on copies of the inputs in
    ``dtype``; ``copies`` maps each input name (primal or tangent argument) to its copy.

    Only the primals with a tangent are dual: an absent tangent is a structural zero, as in the
    library (a NaN primal times an absent tangent is no term, not NaN · 0); ``y_t`` is ``None``
    when no tangent is given."""
    given = {
        n: copy(p, dtype, call.tangents.get(n))
        for n, p in call.primals.items()
        if p is not None or call.tangents.get(n) is not None
    }
    dual = [n for n in given if call.tangents.get(n) is not None]
    tangents = [copy(call.tangents[n], dtype) for n in dual]
    copies = {**given, **{call.tangent_names.get(n, n + "_t"): t for n, t in zip(dual, tangents)}}

    def layer(*args):
        plain_layer = call.grad_layer if for_grad and call.grad_layer else call.layer
        return plain_layer(dtype, **{**given, **dict(zip(dual, args))})

    with sdpa_kernel(SDPBackend.MATH):
        if not dual:
            return layer(), None, copies
        y, y_t = torch.func.jvp(layer, tuple(given[n] for n in dual), tuple(tangents))
    return y, y_t, copies


def assert_matches(
    name: str,
    actual,
    expected: Tensor,
    baseline: Tensor,
    nan_exact: bool = True,
    finite_exact: bool = False,
    atol_factor: float = 1.0,
    scale: float = 1.0,
    factor: float = 2.0,
    torch_failed: bool = False,
) -> None:
    """``actual`` has torch's shape, dtype and device, NaN where the float64 ``expected`` has NaN,
    its infinities, and elsewhere an error within 2 × ``baseline``'s (torch in ``actual``'s dtype)
    + ``atol_factor`` · ATOL · max(``scale``, |expected|) (``factor`` for the 2). Without
    ``nan_exact``, any value may stand where ``expected`` is not finite (with ``finite_exact``: any
    non-finite value)."""
    assert isinstance(actual, Tensor), f"{name}: got {describe(actual)}"
    assert actual.shape == baseline.shape and actual.dtype == baseline.dtype, (
        f"{name}: got {describe(actual)}, torch gives {describe(baseline)}"
    )
    if actual.device.type == "meta":
        return
    assert actual.device.type == "cpu", f"{name}: on {actual.device}"
    a, e, b = actual.detach().double(), expected.detach().double(), baseline.detach().double()
    nan = e.isnan()
    if finite_exact:
        assert torch.equal(a.isfinite(), e.isfinite()), (
            f"{name}: non-finite where the oracle is finite, or not"
        )
    if not nan_exact:
        a = torch.where(e.isfinite(), a, e)
    # where the oracle is ±inf, torch in the output's dtype may give NaN (F.gelu(inf) in float32):
    # that answer passes too
    a = torch.where(e.isinf() & a.isnan() & b.isnan(), e, a)
    assert torch.equal(a.isnan(), nan), (
        f"{name}: NaN at {(a.isnan() != nan).nonzero()[:4].tolist()}: got {a[a.isnan() != nan][:4].tolist()}, "
        f"oracle {e[a.isnan() != nan][:4].tolist()}"
    )
    overflow = e.abs() > torch.finfo(actual.dtype).max  # rounds to inf in the output's dtype
    inf = e.isinf()
    assert torch.equal(a[inf], e[inf]), f"{name}: got {a[inf][:4].tolist()} where the oracle has inf"
    finite = ~nan & ~overflow
    if not finite.any():
        return
    err = (a - e)[finite].abs().max().item()
    trusted = finite & b.isfinite()
    base = (b - e)[trusted].abs().max().item() if trusted.any() else 0.0
    if torch_failed or actual.dtype in (torch.float16, torch.bfloat16) and not torch.equal(trusted, finite):
        atol_factor *= 16  # torch itself fails (inf, NaN, y off): no baseline, a wider bound
    bound = factor * base + atol_factor * ATOL[actual.dtype] * max(scale, e[finite].abs().max().item())
    assert err <= bound, (
        f"{name} ({actual.dtype}): max error {err:.3e} > bound {bound:.3e} (torch: {base:.3e})"
    )


# Gradients: finite where the oracle is finite (which non-finite value stands for an inf weight
# depends on the formula), and 8 × ATOL: the fused backwards start from the 16-bit O and round P
# and dS to 16 bits before their products (as flash attention does), which torch on the CPU, the
# baseline, does not.
GRADIENT_RULE = dict(nan_exact=False, finite_exact=True, atol_factor=8.0)


def check_gradients(call: Call, y: Tensor, y_t: Tensor | None, seed: int) -> None:
    """Gradients of ⟨y, g⟩ + ⟨y_t, g_t⟩ w.r.t. every input that requires grad vs the oracle's
    (``GRADIENT_RULE``)."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    g_t = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    named = {n: t for n, t in call.primals.items() if isinstance(t, Tensor)}
    named.update(
        {call.tangent_names.get(n, n + "_t"): t for n, t in call.tangents.items() if isinstance(t, Tensor)}
    )
    wanted = {n: t for n, t in named.items() if t.requires_grad}
    loss = (y * g.to(y.dtype)).sum() + (0 if y_t is None else (y_t * g_t.to(y.dtype)).sum())
    try:
        ours = (
            torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
            if loss.requires_grad
            else [None] * len(wanted)
        )
    except call.allowed as error:  # second-order terms: an explicit fused backend refuses them
        assert "second-order" in str(error) or names_one_of(str(error), call.may_refuse), repr(error)
        return
    results = {}
    for dtype in (torch.float64, y.dtype):
        o, o_t, copies = oracle(call, dtype, for_grad=True)
        leaves = [copies[n] for n in wanted]
        loss = (o * g.to(dtype)).sum() + (0 if o_t is None else (o_t * g_t.to(dtype)).sum())
        results[dtype] = (
            torch.autograd.grad(loss, leaves, allow_unused=True)
            if loss.requires_grad
            else [None] * len(leaves)
        )
    # a gradient that is 0 by cancellation (a key bias under softmax) is as accurate as the
    # gradients it cancels: each is compared at the scale of the call's largest one
    largest = max(
        [1.0]
        + [
            e.detach().abs().nan_to_num(0, 0, 0).max().item()
            for e in results[torch.float64]
            if e is not None and e.numel()
        ]
    )
    # an attention scale above 1 multiplies the rounding of the softmax terms that cancel in dS
    # (a saturated row: p = 1 − ε where torch's float32 softmax rounds to exactly 1 and 0)
    scale = call.options.get("scale")
    if isinstance(scale, float) and math.isfinite(scale):
        largest *= max(1.0, abs(scale))
    for (name, t), a, e, b in zip(wanted.items(), ours, results[torch.float64], results[y.dtype]):
        zeros = torch.zeros(t.shape, dtype=t.dtype)
        assert_matches(
            f"grad {name}",
            zeros if a is None else a,
            zeros.double() if e is None else e,
            zeros if b is None else b,
            scale=largest,
            **GRADIENT_RULE,
        )


# ----------------------------------------------------------------------------------------------
# shared draws


def finish(draft: Draft, backend: str) -> set[str]:
    """The call's defects: its arguments', and an explicit fused ``backend`` that cannot serve the
    call's dtype or device."""
    note(f"made invalid: {draft.corruptions}")
    first = draft.finish()
    if (
        backend in ("cpp", "triton")
        and first
        and first[0] in FLOATING
        and tk.available_backends(*first[::-1])[backend]
    ):
        draft.defect("backend")
    return draft.defects


def drawn_backend(draw, backend: str, draft: Draft) -> str:
    """``backend``, or now and then a name that is not one (only with the reference, to save time)."""
    if backend == "reference" and draft.corrupt("backend"):
        return draw(st.sampled_from(["refernce", None, "cuda", 3]))
    return backend


def draft_for(draw, backend: str, **kwargs) -> Draft:
    devices = ("cpu",) * 7 + ("meta",)
    return Draft(draw, devices=devices, **kwargs)


SIZES = (1, 2, 3, 5, 0, 7, 16, 17, 33, 64, 65)
TINY_SIZES = (1, 2, 3, 0, 5, 9)  # Triton under the interpreter is slow
EPS = (1e-6, 1e-5, 0.1, 0.0, 1, -1e-3, math.nan, math.inf)


def size(draw, tiny: bool, small: bool = False) -> int:
    return draw(st.sampled_from(TINY_SIZES if tiny or small else SIZES))


MAX_NUMEL = 20_000  # per tensor: keeps every example fast (and the machine's memory safe)


def shape_with(draw, last: tuple[int, ...], tiny: bool, max_dims: int = 2) -> tuple[int, ...]:
    """Up to ``max_dims`` leading dimensions (0 and 1 included) before ``last``, at most
    ``MAX_NUMEL`` elements (a tenth of it for Triton)."""
    limit = MAX_NUMEL // (10 if tiny else 1)
    lead = st.lists(st.sampled_from((1, 2, 3, 0, 5) if tiny else (1, 2, 3, 0, 5, 7, 65)), max_size=max_dims)
    return tuple(draw(lead.filter(lambda dims: math.prod((*dims, *last)) <= limit))) + last


# ----------------------------------------------------------------------------------------------
# attention


def key_padding_mask(draw, draft: Draft, batch: int, k_len: int, special: bool) -> Tensor | None:
    """None, or a (B, Lk) / (1, Lk) mask: bool (True = padding) or floating of any dtype (added),
    sometimes of an invalid dtype, shape or device."""
    kind = draft.option(
        "key_padding_mask",
        weighted((2, None), (1, "bool"), (1, "float")),
        st.sampled_from(["bad dtype", "bad shape", "bad device"]),
    )
    if kind is None:
        return None
    shape = draw(st.sampled_from([(batch, k_len), (1, k_len)]))
    dtype = (
        draw(st.sampled_from([torch.bool] + list(FLOATING)))
        if kind != "float"
        else draw(st.sampled_from(FLOATING))
    )
    dtype = torch.bool if kind == "bool" else dtype
    if kind == "bad dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.uint8, torch.int32, torch.complex64]))
    if kind == "bad shape":
        shape = draw(
            st.sampled_from([(batch, k_len + 1), (k_len,), (batch, 1, 1, k_len), (batch + 2, k_len)])
        )
    if dtype == torch.bool:
        mask = torch.rand(shape, generator=draft.generator) < draw(st.sampled_from([0.3, 0.0, 1.0]))
    else:
        mask = values(shape, dtype if dtype in FLOATING else torch.float64, draft.generator, 3.0)
        padding = torch.rand(shape, generator=draft.generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        mask = mask.masked_fill(padding, -math.inf).to(dtype)
        if special and dtype.is_floating_point and mask.numel() and draw(weighted((10, False), (1, True))):
            mask.view(-1)[draw(st.integers(0, mask.numel() - 1))] = draw(
                st.sampled_from([math.nan, math.inf])
            )
    mask = laid_out(
        mask,
        draw(st.sampled_from(["contiguous", "strided", "expanded", "reversed"])),
        draw(st.integers(0, 1)),
    )
    return mask.to(draft.other_device() if kind == "bad device" else draft.device)


SCALES = (
    (8, None),
    (1, 0.0),
    (2, 0.37),
    (1, -0.6),
    (1, 2),
    (1, 30.0),
    (1, math.inf),
    (1, -math.inf),
    (1, math.nan),
    (1, np.float32(0.5)),
)


def large_16bit_scale(q, scale) -> bool:
    """16-bit inputs at a scale above twice the default: the fused backwards start from the 16-bit
    O (as flash attention does), whose rounding the scale amplifies in dS; torch on the CPU, the
    baseline, computes in float32, so its error does not show it. Gradients are not compared."""
    low = isinstance(q, Tensor) and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] > 0
    return low and isinstance(scale, (int, float)) and abs(scale) > 2 * q.shape[-1] ** -0.5


def no_gradients(*tensors) -> None:
    for t in tensors:
        if isinstance(t, Tensor) and t.layout == torch.strided:
            t.requires_grad_(False)


def sdpa_layer(scale, causal, mask, mask_dtype):
    """The plain-PyTorch attention: math SDPA with ``mask`` (bool True = padding; floating, cast
    to ``mask_dtype`` as the library adds it) and ``causal`` as one ``attn_mask``. A row whose
    scores are all -inf (every key masked, or a scale of ±inf) gives zeros: torch's SDPA answer,
    which torch.func.jvp of SDPA does not give (NaN); such rows are computed unmasked and
    replaced, so that no NaN reaches the tangent or the gradient."""

    def layer(dtype, q, k, v):
        if k.shape[-2] == 0:  # no keys: zeros (torch's SDPA gives NaN everywhere if q holds a NaN)
            return q.new_zeros((*q.shape[:-1], v.shape[-1]))
        allowed = bias = None
        if mask is not None:
            m = plain(mask, torch.bool if mask.dtype == torch.bool else mask_dtype)[:, None, None, :]
            allowed, bias = (~m, None) if m.dtype == torch.bool else (None, m.to(dtype))
        if causal:
            tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            allowed = tril if allowed is None else allowed & tril
        attn_mask = (
            allowed if bias is None else bias if allowed is None else bias.masked_fill(~allowed, -math.inf)
        )
        gqa = q.shape[1] != k.shape[1]
        with torch.no_grad():
            keys = k.detach().repeat_interleave(q.shape[1] // k.shape[1], dim=1) if gqa else k.detach()
            scores = (
                q.detach() @ keys.transpose(-2, -1) * ((q.shape[-1] or 1) ** -0.5 if scale is None else scale)
            )
            if attn_mask is not None:  # added, as torch adds a boolean mask (inf + -inf is NaN there)
                scores = scores + (torch.where(attn_mask, 0.0, -math.inf) if bias is None else attn_mask)
            dead = (scores == -math.inf).all(dim=-1, keepdim=True)
        if attn_mask is not None:
            attn_mask = attn_mask | dead if bias is None else torch.where(dead, 0.0, attn_mask)
        o = torch_F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        values = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if gqa else v
        return torch.where(dead, values.new_zeros(scores.shape) @ values, o)  # (0 · V: a NaN in V shows)

    return layer


@st.composite
def attention_calls(draw, backend: str, tiny: bool = False) -> Call:
    draft = draft_for(draw, backend, magnitudes=(1.0, 1.0, 3.0))
    backend = drawn_backend(draw, backend, draft)
    batch, kv_heads = draw(st.sampled_from([1, 2, 0])), draw(st.sampled_from([1, 2, 0]))
    q_heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    q_len, k_len = size(draw, tiny), size(draw, tiny)
    head_dim = draw(st.sampled_from((1, 2, 3, 5, 8, 9) if tiny else (1, 2, 3, 5, 8, 16, 17, 33, 64, 0)))
    qs, kvs = (batch, q_heads, q_len, head_dim), (batch, kv_heads, k_len, head_dim)
    q_wrong = [(batch + 1, *qs[1:]), (*qs[:3], head_dim + 1), qs[1:], (1, *qs)]
    if kv_heads > 1:
        q_wrong.append((batch, q_heads + 1, q_len, head_dim))  # heads that kv heads do not divide
    causal = draft.option("causal", st.booleans(), st.sampled_from([1, "yes", None]))
    mask = key_padding_mask(draw, draft, batch, k_len, special=causal is False)
    # NaN and inf only where no key is masked: the kernels skip masked keys (and the tiles that
    # causal masking skips), where torch adds -inf to a NaN score or multiplies a NaN value by 0
    special = mask is None and causal is False
    q = draft.tensor("q", qs, wrong=q_wrong, related=("k", "q_t"), special=special)
    k = draft.tensor(
        "k",
        kvs,
        wrong=[(batch + 1, *kvs[1:]), (*kvs[:3], head_dim + 1), kvs[1:]],
        related=("q", "k_t"),
        special=special,
    )
    v = draft.tensor("v", kvs, related=("k", "v_t"), special=special)
    q_t, k_t, v_t = (
        draft.optional(name, shape, special=special)
        for name, shape in (("q_t", qs), ("k_t", kvs), ("v_t", kvs))
    )
    scale = draft.option("scale", weighted(*SCALES), st.sampled_from([True, "0.5", 1j, torch.tensor(0.5)]))
    known_bug(
        scale == 0 and backend in ("cpp", "auto") and not all(finite(t) for t in (q, k, q_t, k_t)),
        "C++ attention: BLAS skips q·kᵀ when alpha = scale = 0, so a NaN in q or k vanishes",
    )
    if isinstance(scale, float) and not math.isfinite(scale):  # no gradients to compare: NaN or 0 everywhere
        no_gradients(q, k, v, q_t, k_t, v_t)
        if backend in ("cpp", "triton"):
            draft.defect("scale")  # the kernels need a finite scale ("auto" runs the reference)
    if large_16bit_scale(q, scale):
        no_gradients(q, k, v, q_t, k_t, v_t)

    def run():
        return F.attention_jvp(
            q, k, v, q_t, k_t, v_t, scale=scale, causal=causal, key_padding_mask=mask, backend=backend
        )

    mask_dtype = q.dtype if isinstance(q, Tensor) else torch.float64
    oracle_scale = None if "scale" in draft.defects or scale is None else float(scale)
    defects = finish(draft, backend)
    if isinstance(mask, Tensor) and isinstance(q, Tensor) and mask.device != q.device:
        defects.add("key_padding_mask")  # (on the call's device, while q was moved off it)
    return Call(
        run,
        sdpa_layer(oracle_scale, causal, mask, mask_dtype),
        dict(q=q, k=k, v=v),
        dict(q=q_t, k=k_t, v=v_t),
        {"q", "k", "v", "q_t", "k_t", "v_t", "scale", "causal", "key_padding_mask", "backend"},
        defects,
        dict(scale=scale, causal=causal, key_padding_mask=mask, backend=backend),
    )


# ----------------------------------------------------------------------------------------------
# layer norm, linear, GELU, MLP


@st.composite
def layer_norm_calls(draw, backend: str, tiny: bool = False) -> Call:
    draft = draft_for(draw, backend, magnitudes=(1.0, 1.0, 3.0, 1e-3, 1e20))
    backend = drawn_backend(draw, backend, draft)
    n = draw(st.sampled_from((1, 2, 3, 0, 7, 16) if tiny else (1, 2, 3, 0, 7, 16, 33, 100, 1000)))
    shape = shape_with(draw, (n,), tiny)
    x = draft.tensor("x", shape, wrong=[()], related=("x_t", "weight", "bias", "d_weight", "d_bias"))
    x_t = draft.optional("x_t", shape)
    params = {
        name: draft.optional(name, (n,), magnitude=1.0) for name in ("weight", "bias", "d_weight", "d_bias")
    }
    for offset, frozen in (("d_weight", "weight"), ("d_bias", "bias")):
        if params[offset] is not None and params[frozen] is None:
            draft.defect(offset)
    eps = draft.option(
        "eps",
        weighted(*((3 if i < 2 else 1, e) for i, e in enumerate(EPS))),
        st.sampled_from([True, "1e-5", None]),
    )

    def run():
        return F.layer_norm_jvp(
            x,
            x_t,
            params["weight"],
            params["bias"],
            params["d_weight"],
            params["d_bias"],
            eps=eps,
            backend=backend,
        )

    def layer(dtype, x, weight=None, bias=None):
        return torch_F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    def decomposed(dtype, x, weight=None, bias=None):
        """Layer norm in elementary ops: torch 2.14's gradient w.r.t. x of the forward-mode
        tangent of F.layer_norm is wrong (found by this suite), so the gradients use this."""
        centered = x - x.mean(dim=-1, keepdim=True)
        y = centered * torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + eps)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias

    return Call(
        run,
        layer,
        dict(x=x, weight=params["weight"], bias=params["bias"]),
        dict(x=x_t, weight=params["d_weight"], bias=params["d_bias"]),
        {"x", "x_t", "weight", "bias", "d_weight", "d_bias", "eps", "backend"},
        finish(draft, backend),
        dict(eps=eps, backend=backend),
        tangent_names=dict(x="x_t", weight="d_weight", bias="d_bias"),
        grad_layer=decomposed,
    )


ACTIVATIONS, BAD_ACTIVATIONS = ((2, None), (1, "gelu"), (1, "gelu_tanh")), ("relu", "none", 3)
APPROXIMATIONS, BAD_APPROXIMATIONS = ("none", "tanh"), ("erf", None, 1)
GELU_OF = {None: None, "gelu": "none", "gelu_tanh": "tanh"}


def linear_params(draw, draft: Draft, prefix: str, in_features: int, out_features: int, related=()) -> dict:
    """A linear layer's weight ``(out, in)``, optional bias, and optional offsets of both."""
    weight = draft.tensor(
        f"{prefix}weight",
        (out_features, in_features),
        related=related,
        wrong=[(out_features, in_features + 1), (out_features,), (1, out_features, in_features)],
    )
    return {
        f"{prefix}weight": weight,
        f"{prefix}bias": draft.optional(f"{prefix}bias", (out_features,)),
        f"d_{prefix}weight": draft.optional(f"d_{prefix}weight", (out_features, in_features)),
        f"d_{prefix}bias": draft.optional(f"d_{prefix}bias", (out_features,)),
    }


@st.composite
def linear_calls(draw, backend: str, tiny: bool = False) -> Call:
    draft = draft_for(draw, backend, magnitudes=(1.0, 1.0, 3.0, 1e-3))
    backend = drawn_backend(draw, backend, draft)
    k, n = size(draw, tiny), size(draw, tiny)
    lead = shape_with(draw, (max(k, n, 1),), tiny)[:-1]
    x = draft.tensor("x", (*lead, k), wrong=[(), (*lead, k + 1)], related=("weight", "x_t"))
    x_t = draft.optional("x_t", (*lead, k))
    p = linear_params(draw, draft, "", k, n, related=("x",))
    activation = draft.option("activation", weighted(*ACTIVATIONS), st.sampled_from(BAD_ACTIVATIONS))
    fused = backend == "triton" and draw(st.booleans())  # the fused Triton GEMM, or ATen GEMMs + GELU op

    def run():
        with mock.patch.dict(os.environ, {"TANGENT_KERNELS_LINEAR_PATH": "fused" if fused else "measured"}):
            return F.linear_jvp(
                x,
                x_t,
                p["weight"],
                p["bias"],
                p["d_weight"],
                p["d_bias"],
                activation=activation,
                backend=backend,
            )

    def layer(dtype, x, weight, bias=None):
        h = torch_F.linear(x, weight, bias)
        return h if GELU_OF.get(activation) is None else torch_F.gelu(h, approximate=GELU_OF[activation])

    return Call(
        run,
        layer,
        dict(x=x, weight=p["weight"], bias=p["bias"]),
        dict(x=x_t, weight=p["d_weight"], bias=p["d_bias"]),
        {"x", "x_t", "weight", "bias", "d_weight", "d_bias", "activation", "backend"},
        finish(draft, backend),
        dict(activation=activation, backend=backend, fused=fused),
        tangent_names=dict(x="x_t", weight="d_weight", bias="d_bias"),
    )


@st.composite
def gelu_calls(draw, backend: str, tiny: bool = False) -> Call:
    draft = draft_for(draw, backend, magnitudes=(1.0, 3.0, 30.0))
    backend = drawn_backend(draw, backend, draft)
    shape = shape_with(draw, tuple(draw(st.lists(st.sampled_from((1, 3, 0, 1025)), max_size=1))), tiny)
    x = draft.tensor("x", shape, wrong=[])
    x_t = draft.optional("x_t", shape)
    approximate = draft.option(
        "approximate", st.sampled_from(APPROXIMATIONS), st.sampled_from(BAD_APPROXIMATIONS)
    )

    def run():
        return F.gelu_jvp(x, x_t, approximate=approximate, backend=backend)

    def layer(dtype, x):
        return torch_F.gelu(x, approximate=approximate)

    return Call(
        run,
        layer,
        dict(x=x),
        dict(x=x_t),
        {"x", "x_t", "approximate", "backend"},
        finish(draft, backend),
        dict(approximate=approximate, backend=backend),
    )


@st.composite
def mlp_calls(draw, backend: str, tiny: bool = False) -> Call:
    draft = draft_for(draw, backend, magnitudes=(1.0, 1.0, 0.3))
    backend = drawn_backend(draw, backend, draft)
    k, hidden, n = size(draw, tiny, small=True), size(draw, tiny), size(draw, tiny, small=True)
    lead = shape_with(draw, (max(k, hidden, n, 1),), tiny)[:-1]
    x = draft.tensor("x", (*lead, k), wrong=[(), (*lead, k + 1)], related=("fc1_weight", "x_t"))
    x_t = draft.optional("x_t", (*lead, k))
    p = {
        **linear_params(draw, draft, "fc1_", k, hidden, related=("x", "fc2_weight")),
        **linear_params(draw, draft, "fc2_", hidden, n, related=("fc1_weight",)),
    }
    approximate = draft.option(
        "approximate", st.sampled_from(APPROXIMATIONS), st.sampled_from(BAD_APPROXIMATIONS)
    )
    order = [
        "fc1_weight",
        "fc1_bias",
        "fc2_weight",
        "fc2_bias",
        "d_fc1_weight",
        "d_fc1_bias",
        "d_fc2_weight",
        "d_fc2_bias",
    ]

    def run():
        return F.mlp_jvp(x, x_t, *(p[name] for name in order), approximate=approximate, backend=backend)

    def layer(dtype, x, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None):
        h = torch_F.gelu(torch_F.linear(x, fc1_weight, fc1_bias), approximate=approximate)
        return torch_F.linear(h, fc2_weight, fc2_bias)

    frozen = ("fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias")
    tangent_names = {"x": "x_t", **{name: "d_" + name for name in frozen}}
    tangents = {"x": x_t, **{name: p["d_" + name] for name in frozen}}
    return Call(
        run,
        layer,
        {"x": x, **{name: p[name] for name in frozen}},
        tangents,
        {"x", "x_t", "approximate", "backend", *order},
        finish(draft, backend),
        dict(approximate=approximate, backend=backend),
        tangent_names=tangent_names,
    )


# ----------------------------------------------------------------------------------------------
# the modules, built from torch / timm modules

MODULE_NAMES = {
    "x",
    "x_t",
    "weight",
    "bias",
    "d_weight",
    "d_bias",
    "q",
    "k",
    "v",
    "q_t",
    "k_t",
    "v_t",
    "causal",
    "attn_mask",
    "is_causal",
    "eps",
    "backend",
}


def torch_module(draw, kind: str, draft: Draft) -> tuple[nn.Module, tuple[int, ...], dict]:
    """A torch/timm module of ``kind`` in the call's dtype with drawn weights, the shape of its
    input, and the keyword arguments of its forward."""
    if kind == "linear":
        in_features, out_features = draw(st.sampled_from(SIZES[:6])), draw(st.sampled_from(SIZES[:6]))
        module, width, kwargs = (
            nn.Linear(in_features, out_features, bias=draw(st.booleans())),
            in_features,
            {},
        )
    elif kind in ("layer_norm", "timm_layer_norm"):
        width, eps = draw(st.sampled_from((1, 2, 3, 7, 16, 33))), draw(st.sampled_from((1e-5, 1e-6, 0.1)))
        affine = draw(st.booleans())
        module = (
            nn.LayerNorm(width, eps, elementwise_affine=affine, bias=draw(st.booleans()))
            if kind == "layer_norm"
            else timm.layers.LayerNorm(width, eps, affine=affine)
        )
        kwargs = {}
    else:
        heads, head_dim = draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((1, 3, 4, 5, 8)))
        width = heads * head_dim
        module = timm.layers.Attention(
            width,
            num_heads=heads,
            qkv_bias=draw(st.booleans()),
            qk_norm=draw(st.booleans()),
            scale_norm=draw(st.booleans()),
            proj_bias=draw(st.booleans()),
            gated=draw(st.booleans()),
            norm_layer=nn.LayerNorm,
        )
        module.fused_attn = draw(st.booleans())
        kwargs = {"is_causal": draft.option("is_causal", st.booleans(), st.sampled_from([1, "yes"]))}
        if not isinstance(kwargs["is_causal"], bool):
            draft.defect("causal")  # (functional's name for it)
        if draft.corrupt("attn_mask"):
            kwargs["attn_mask"] = torch.zeros(1, 1, 1, 1)
    module = module.to(draft.dtype if draft.dtype in FLOATING else torch.float32).eval()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(values(param.shape, param.dtype, draft.generator, draft.magnitude))
    return module, width, kwargs


@st.composite
def module_calls(draw, backend: str, tiny: bool = False) -> Call:
    """``TangentLinear``/``TangentLayerNorm``/``TangentAttention`` built from a torch/timm module
    with drawn weights and offsets, called on ``(x, x_t)``; the oracle is torch.func.jvp of the
    module's own forward at its weights along the offsets."""
    kind = draw(st.sampled_from(["linear", "layer_norm", "timm_layer_norm", "attention"]))
    draft = Draft(draw, magnitudes=(1.0, 0.3))  # on the CPU, or with its module on the meta device
    module, width, kwargs = torch_module(draw, kind, draft)
    tangent = tk.modules.tangent_module(module, backend)
    offsets = dict(tangent.named_parameters())
    with torch.no_grad():
        for offset in offsets.values():
            if draw(st.booleans()):
                offset.copy_(values(offset.shape, offset.dtype, draft.generator, draft.magnitude))
            offset.requires_grad_(draw(weighted((3, False), (1, True))))
    if draw(weighted((9, False), (1, True))):  # the whole call on the meta device
        draft.device = "meta"
        module, tangent = module.to("meta"), tangent.to("meta")
    lead = (
        (draw(st.sampled_from((1, 2, 0, 3))), draw(st.sampled_from((1, 2, 0, 5))))
        if kind == "attention"
        else (shape_with(draw, (width,), tiny)[:-1])
    )
    shape = (*lead, width)
    wrong = [(*lead, width + 1)] + ([lead[1:] + (width,), (1, *shape)] if kind == "attention" else [])
    x = draft.tensor(
        "x", shape, wrong=wrong, related=("x_t", "weight", "bias", "q", "k", "v"), dtype=draft.dtype
    )
    if isinstance(x, Tensor):  # torch's gradient w.r.t. x through a layer norm's tangent is wrong
        x.requires_grad_(False)
    x_t = draft.optional("x_t", shape)
    known_bug(
        not isinstance(x, Tensor), "the tangent modules raise AttributeError for an x that is not a tensor"
    )
    known_bug(
        kind != "attention"
        and isinstance(x, Tensor)
        and x.dim() > 0
        and x.shape[-1] != width
        and getattr(module, "weight", None) is None,
        "TangentLayerNorm without affine normalizes any last dim",
    )
    known_bug(
        kind == "attention" and isinstance(x, Tensor) and x.dim() != 3,
        "TangentAttention: an x that is not 3-D raises an unpacking ValueError that names nothing",
    )
    frozen = {name: module.get_parameter(name).detach() for name in offsets}
    weights = next(module.parameters(), None)
    if (
        weights is not None
        and isinstance(x, Tensor)
        and (x.dtype != weights.dtype or x.device != weights.device)
    ):
        draft.defect("x")  # the module's dtype and device are the call's (a module without weights has none)

    def run():
        return tangent(x, x_t, **kwargs)

    def layer(dtype, x, **params):
        return torch.func.functional_call(module, params, (x,), kwargs)

    names = {"x": "x_t", **{name: f"offset {name}" for name in offsets}}
    return Call(
        run,
        layer,
        {"x": x, **frozen},
        {"x": x_t, **offsets},
        MODULE_NAMES,
        finish(draft, backend),
        dict(kind=kind, module=module, backend=backend, **kwargs),
        tangent_names=names,
        factor=4.0 if kind == "attention" else 2.0,  # (qkv, norms, attention, gate, proj in a row)
    )


# ----------------------------------------------------------------------------------------------
# the raw ops under torch.ops.tangent_kernels: the torch.library ops (backend "triton" or "cpp",
# with autograd) and the C++ extension's own ops (no autograd, TORCH_CHECK errors: RuntimeError)

RAW = torch.ops.tangent_kernels
RAW_NAMES = {"grad", "grad_out", "o", "lse", "mean", "rstd", "h", "h_t"}


RAW_ALLOWED = ALLOWED + (RuntimeError,)  # TORCH_CHECK, and torch's own check of an op's schema


def raw_call(call: Call, primals: dict, tangents: dict, run, after=None, cpp_op: bool = False) -> Call:
    """``call`` (a functional entry's draw) made a call of a raw op on ``primals`` and ``tangents``
    (its own, or detached for a C++ op): ``run`` replaces its run. The dispatcher refuses a sparse
    tensor for a C++ op (it has CPU and Meta kernels only) without naming the argument."""
    known_bug(
        cpp_op
        and bool(call.defects)
        and any(
            isinstance(t, Tensor) and t.device.type == "meta" for t in (*primals.values(), *tangents.values())
        ),
        "cpp.py: the C++ ops' fake (meta) implementations check devices only",
    )
    return Call(
        run,
        call.layer,
        primals,
        tangents,
        call.names | RAW_NAMES,
        call.defects,
        call.options,
        call.tangent_names,
        call.grad_layer,
        RAW_ALLOWED,
        call.may_refuse,
        after,
        r"Could not run .* 'Sparse\w*' backend" if cpp_op else "^$",
    )


def detached(mapping: dict) -> dict:
    """The C++ ops have no autograd: their inputs without ``requires_grad``."""
    return {n: t.detach() if isinstance(t, Tensor) else t for n, t in mapping.items()}


def raw_refusals(call: Call) -> None:
    """What an explicit backend could not serve is refused by ``functional``, not by the raw ops:
    there it may run or be refused."""
    if "backend" in call.defects:
        call.defects.discard("backend")
        call.may_refuse.add("backend")


def empty(t: Tensor) -> None:
    assert t.numel() == 0, f"an absent result is an empty tensor, got {describe(t)}"


def vjp_oracle(call: Call, dtype: torch.dtype, grad_out: Tensor, names: list[str]) -> list[Tensor]:
    """The gradient of ⟨layer(primals), grad_out⟩ w.r.t. the primals ``names`` (torch, in ``dtype``)."""
    primals = {
        n: plain(p, dtype).requires_grad_(n in names) for n, p in call.primals.items() if p is not None
    }
    with sdpa_kernel(SDPBackend.MATH):
        out = (call.grad_layer or call.layer)(dtype, **primals)
    if not out.requires_grad:  # (no keys: zeros that depend on nothing)
        return [torch.zeros_like(primals[n]) for n in names]
    grads = torch.autograd.grad(out, [primals[n] for n in names], plain(grad_out, dtype), allow_unused=True)
    return [torch.zeros_like(primals[n]) if g is None else g for n, g in zip(names, grads)]


def check_vjp(call: Call, got: list[Tensor], grad_out: Tensor, names: list[str], wanted: list[bool]) -> None:
    dtype = grad_out.dtype
    expected, baseline = (
        vjp_oracle(call, torch.float64, grad_out, names),
        vjp_oracle(call, dtype, grad_out, names),
    )
    for name, a, e, b, want in zip(names, got, expected, baseline, wanted):
        if want:
            assert_matches(f"vjp {name}", a, e, b, **GRADIENT_RULE)
        else:
            empty(a)


@st.composite
def raw_attention_calls(draw, backend: str, cpp_op: bool = False) -> Call:
    """``attention_jvp`` (torch.library) or ``attention_jvp_forward`` (C++) on the functional
    entry's draws with a finite float scale, then its VJP op on the outputs: ``lse`` is checked
    against the oracle's log-sum-exp (base 2 on Triton)."""
    call = draw(attention_calls("cpp" if cpp_op else backend, tiny=backend == "triton"))
    raw_refusals(call)
    scale, causal, mask = (call.options[n] for n in ("scale", "causal", "key_padding_mask"))
    # the schema types scale and causal; the kernels' answer for an infinite scale differs (see
    # functional.attention_jvp, which runs the reference for it)
    assume(not call.defects & {"scale", "causal"} and (scale is None or math.isfinite(scale)))
    p, t = (detached(m) if cpp_op else m for m in (call.primals, call.tangents))
    q, k, v = p["q"], p["k"], p["v"]
    head_dim = q.shape[-1] if isinstance(q, Tensor) else 1
    scale = float(head_dim**-0.5 if head_dim else 1.0) if scale is None else float(scale)
    for name, x in (("q", q), ("k", k)):
        if isinstance(x, Tensor) and x.numel() == 0:  # the kernels launch one program per tile
            (call.may_refuse if cpp_op else call.defects).add(name)
    if isinstance(mask, Tensor) and isinstance(q, Tensor) and isinstance(k, Tensor) and k.dim() == 4:
        exact = mask.dim() == 2 and tuple(mask.shape) == (q.shape[0], k.shape[2])
        if not exact or not cpp_op and mask.dtype not in (torch.bool, q.dtype):
            call.defects.add("key_padding_mask")  # the raw ops take the mask as functional passes it
    if cpp_op and isinstance(mask, Tensor) and mask.is_floating_point():  # added at its own precision
        call.layer = sdpa_layer(scale, causal, mask, mask.dtype)
    has_tangent = any(x is not None for x in t.values())
    results = {}
    bad = draw(
        st.sampled_from(["ok", "ok", "ok", "lse shape", "grad_out shape"] + ([] if cpp_op else ["lse dtype"]))
    )
    generator, need = call_generator(draw), [draw(st.booleans()), draw(st.booleans())]

    def run():
        args = (q, k, v, t["q"], t["k"], t["v"], mask, scale, causal)
        o, o_t, lse = RAW.attention_jvp_forward(*args) if cpp_op else RAW.attention_jvp(*args, backend)
        results.update(o=o, lse=lse)
        if not has_tangent:
            empty(o_t)
        return o, o_t if has_tangent else None

    def after():
        o, lse = results["o"], results["lse"]
        if not all(finite(x) for x in (q, k, v)) or lse.dtype not in FLOATING:
            return
        mask_dtype = mask.dtype if cpp_op and isinstance(mask, Tensor) else q.dtype
        check_lse(
            lse * (math.log(2) if backend == "triton" and not cpp_op else 1.0),
            q,
            k,
            scale,
            causal,
            mask,
            mask_dtype,
        )
        g = values(o.shape if bad != "grad_out shape" else o.shape[:-1], o.dtype, generator, 1.0)
        lse_in = lse[..., None] if bad == "lse shape" else lse.half() if bad == "lse dtype" else lse
        try:
            args = (g, q.detach(), k.detach(), v.detach(), o.detach(), lse_in, mask, scale, causal, *need)
            dq, dk, dv = RAW.attention_backward(*args) if cpp_op else RAW.attention_vjp(*args, backend)
        except RAW_ALLOWED as error:
            assert bad != "ok" and names_one_of(str(error), {"lse", "grad_out", "grad"}), repr(error)
            return
        assert bad == "ok", f"attention VJP: {bad} accepted"
        if not large_16bit_scale(q, scale):
            check_vjp(call, [dq, dk, dv], g, ["q", "k", "v"], [need[0], need[1], need[1]])

    return raw_call(call, p, t, run, after, cpp_op)


def call_generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def check_lse(
    lse: Tensor, q: Tensor, k: Tensor, scale: float, causal: bool, mask, mask_dtype: torch.dtype
) -> None:
    """``lse`` (natural log) is the log-sum-exp of each query row's masked, scaled scores (rows
    with every key masked are not compared: each backend marks them its own way)."""
    q64, k64 = (
        plain(q, torch.float64),
        plain(k, torch.float64).repeat_interleave(q.shape[1] // max(k.shape[1], 1), 1),
    )
    scores = scale * q64 @ k64.transpose(-2, -1)
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        m = plain(mask, torch.bool if mask.dtype == torch.bool else torch.float64)[:, None, None, :]
        scores = (
            scores.masked_fill(m, -math.inf) if m.dtype == torch.bool else scores + m.to(mask_dtype).double()
        )
    expected = torch.logsumexp(scores, dim=-1)
    live = expected.isfinite()  # (rows with every key masked, or an inf in the mask, are not compared)
    err = (lse.double() - expected)[live].abs()
    bound = 10 * ATOL[lse.dtype] * expected[live].abs().clamp_min(1.0)
    assert (err <= bound).all(), f"lse: max error {err.max().item():.3e}"


@st.composite
def raw_layer_norm_calls(draw, backend: str, cpp_op: bool = False) -> Call:
    """``layer_norm_jvp`` (torch.library) or ``layer_norm_jvp_forward`` (C++), then the backward
    op on its ``mean`` and ``rstd``."""
    call = draw(layer_norm_calls("cpp" if cpp_op else backend, tiny=backend == "triton"))
    raw_refusals(call)
    assume("eps" not in call.defects)
    x_in = call.primals["x"]
    for offset, frozen in (("weight", "weight"), ("bias", "bias")):
        t_offset, shape_ok = call.tangents[offset], isinstance(x_in, Tensor) and x_in.dim() > 0
        shape_ok = shape_ok and isinstance(t_offset, Tensor) and t_offset.shape == x_in.shape[-1:]
        if cpp_op and shape_ok and call.primals[frozen] is None and "d_" + offset in call.defects:
            call.defects.discard("d_" + offset)  # the C++ op adds an offset without its frozen parameter
            call.may_refuse.add("d_" + offset)
    p, t = (detached(m) if cpp_op else m for m in (call.primals, call.tangents))
    x, eps = p["x"], call.options["eps"]
    if isinstance(x, Tensor) and x.dim() and x.shape[-1] == 0:
        call.defects.add("x")  # the kernels need features (functional serves an empty row)
    elif isinstance(x, Tensor) and x.numel() == 0:
        call.may_refuse.add("x")
    has_tangent = any(v is not None for v in t.values())
    results = {}
    stats = draw(st.sampled_from(["ok", "ok", "ok", "mean shape", "rstd dtype"]))
    generator, need = call_generator(draw), [draw(st.booleans()), draw(st.booleans())]

    def run():
        args = (x, t["x"], p["weight"], p["bias"], t["weight"], t["bias"], eps, True)  # centered: layer norm
        y, y_t, mean, rstd = (
            RAW.layer_norm_jvp_forward(*args) if cpp_op else RAW.layer_norm_jvp(*args, backend)
        )
        results.update(mean=mean, rstd=rstd)
        if not has_tangent:
            empty(y_t)
        return y, y_t if has_tangent else None

    def after():
        mean, rstd = results["mean"], results["rstd"]
        if not finite(x) or not x.numel() or not math.isfinite(eps) or eps <= 0:
            return
        x64 = plain(x, torch.float64).reshape(-1, x.shape[-1])
        centered = x64 - x64.mean(-1, keepdim=True)
        var = ((centered - centered.mean(-1, keepdim=True)) ** 2).mean(-1)  # (exactly 0 for a constant row)
        assert_matches("mean", mean.reshape(-1), x64.mean(-1), x64.mean(-1).to(mean.dtype))
        assert_matches(
            "rstd", rstd.reshape(-1), torch.rsqrt(var + eps), torch.rsqrt(var + eps).to(rstd.dtype)
        )
        g = values(x.shape, x.dtype, generator, 1.0)
        mean_in = mean.reshape(-1)[:-1] if stats == "mean shape" else mean
        rstd_in = rstd.half() if stats == "rstd dtype" else rstd
        w = None if p["weight"] is None else p["weight"].detach()
        try:
            args = (g, x.detach(), w, mean_in, rstd_in, True, *need)
            g_x, g_w, g_b = RAW.layer_norm_backward(*args) if cpp_op else RAW.layer_norm_vjp(*args, backend)
        except RAW_ALLOWED as error:
            assert stats != "ok" and names_one_of(str(error), {"mean", "rstd"}), repr(error)
            return
        assert stats == "ok", f"layer norm backward: {stats} accepted"
        norm = Call(call.run, call.layer, {"x": x, "weight": w}, {}, set(), grad_layer=call.grad_layer)
        check_vjp(norm, [g_x], g, ["x"], [need[0]])
        if need[1]:  # Σ g · x̂ and Σ g over the rows, for the weight and bias offsets
            x_hat = (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(var + eps)[:, None]
            g64 = g.double().reshape(x_hat.shape)
            low_x_hat = x_hat.to(x.dtype).double()
            assert_matches("vjp weight", g_w, (g64 * x_hat).sum(0), (g64 * low_x_hat).sum(0).to(g_w.dtype))
            assert_matches("vjp bias", g_b, g64.sum(0), g64.sum(0).to(g_b.dtype))
        else:
            empty(g_w), empty(g_b)

    no_weight = p["weight"] is None and isinstance(x, Tensor) and x.dim()
    ones = (
        {"weight": torch.ones(x.shape[-1:], dtype=x.dtype)} if no_weight and t["weight"] is not None else {}
    )
    return raw_call(
        call, {**p, **ones}, t, run, after, cpp_op
    )  # (an absent weight is 1 where its offset is given)


@st.composite
def raw_gelu_calls(draw, backend: str, cpp_op: bool = False) -> Call:
    """``gelu_jvp`` (torch.library) or ``gelu_jvp_forward`` (C++): GELU of ``h + bias`` with the
    tangent ``h_t + d_bias``; the derivative output is checked too."""
    draft = draft_for(draw, backend, magnitudes=(1.0, 3.0))
    n = size(draw, backend == "triton")
    shape = shape_with(draw, (n,), backend == "triton")
    h = draft.tensor("h", shape, wrong=[()], related=("bias", "h_t"))
    h_t = draft.optional("h_t", shape)
    bias, d_bias = draft.optional("bias", (n,)), draft.optional("d_bias", (n,))
    approximate = draft.option(
        "approximate", st.sampled_from(APPROXIMATIONS), st.sampled_from(["erf", "None"])
    )
    defects = finish(draft, "cpp" if cpp_op else backend)
    call = Call(
        None,
        lambda dtype, h, bias=None: torch_F.gelu(h if bias is None else h + bias, approximate=approximate),
        {"h": h, "bias": bias},
        {"h": h_t, "bias": d_bias},
        {"h", "h_t", "bias", "d_bias", "approximate"},
        defects,
        dict(approximate=approximate),
        tangent_names=dict(h="h_t", bias="d_bias"),
    )
    raw_refusals(call)
    if isinstance(h, Tensor) and h.numel() == 0:
        (call.may_refuse if cpp_op else call.defects).add("h")
    p, t = (detached(m) if cpp_op else m for m in (call.primals, call.tangents))
    has_tangent = h_t is not None or d_bias is not None
    results = {}

    def run():
        args = (p["h"], t["h"], p["bias"], t["bias"], approximate)
        a, a_t, derivative = RAW.gelu_jvp_forward(*args) if cpp_op else RAW.gelu_jvp(*args, backend)
        results["derivative"] = derivative
        if not has_tangent:
            empty(a_t)
        return a, a_t if has_tangent else None

    def after():
        if not finite(p["h"]) or not finite(p["bias"]):
            return
        u = plain(p["h"], torch.float64) + (0 if bias is None else plain(bias, torch.float64))
        derivative = tk.reference.gelu_derivative(u, approximate)
        low = tk.reference.gelu_derivative(u.to(h.dtype).float(), approximate).to(h.dtype)
        assert_matches("derivative", results["derivative"], derivative, low)

    known_bug(
        not cpp_op
        and isinstance(h, Tensor)
        and h.dim() == 1
        and any(isinstance(b, Tensor) and b.requires_grad for b in (bias, d_bias)),
        "ops._gelu_backward: a 1-D h's bias gradients are summed over every dimension (.sum(()))",
    )
    return raw_call(call, p, t, run, after, cpp_op)


@st.composite
def raw_linear_calls(draw, backend: str) -> Call:
    """``linear_jvp`` (torch.library, Triton): both GEMMs in one kernel, optional GELU epilogue."""
    call = draw(linear_calls(backend, tiny=True))
    raw_refusals(call)
    x, activation = call.primals["x"], call.options["activation"]
    if isinstance(x, Tensor) and x.numel() == 0:
        call.defects.add("x")
    weight = call.primals["weight"]
    known_bug(
        isinstance(weight, Tensor) and weight.shape[0] == 0 and any(t.requires_grad for t in tensors(call)),
        "ops._linear_backward: reshape(-1, 0) of an empty gradient (a weight with no rows)",
    )
    if activation == "none":  # (the raw op's name for no activation, which functional spells None)
        call.defects.discard("activation")
    activation = "none" if activation is None else activation
    p, t = call.primals, call.tangents
    has_tangent = any(v is not None for v in t.values())

    def run():
        y, y_t, _ = RAW.linear_jvp(
            x, t["x"], p["weight"], p["bias"], t["weight"], t["bias"], activation, backend
        )
        if not has_tangent:
            empty(y_t)
        return y, y_t if has_tangent else None

    return raw_call(call, p, t, run)


RAW_OPS = {
    "attention": raw_attention_calls,
    "layer_norm": raw_layer_norm_calls,
    "gelu": raw_gelu_calls,
}


# ----------------------------------------------------------------------------------------------
# the functional entries on every backend

ENTRIES = {
    "attention_jvp": attention_calls,
    "layer_norm_jvp": layer_norm_calls,
    "linear_jvp": linear_calls,
    "gelu_jvp": gelu_calls,
    "mlp_jvp": mlp_calls,
}
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=100, per_example_s=0.05)
@given(data=st.data())
def test_functional(entry, backend, data):
    check(data.draw(ENTRIES[entry](backend)), data.draw(st.integers(0, 2**31 - 1)))


@needs_triton
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=25, per_example_s=0.5, hunt_share=4)
@given(data=st.data())
def test_functional_triton(entry, data):
    check(data.draw(ENTRIES[entry]("triton", tiny=True)), data.draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=100, per_example_s=0.05)
@given(data=st.data())
def test_modules(backend, data):
    check(data.draw(module_calls(backend)), data.draw(st.integers(0, 2**31 - 1)))


@needs_triton
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=25, per_example_s=0.5, hunt_share=4)
@given(data=st.data())
def test_modules_triton(data):
    check(data.draw(module_calls("triton", tiny=True)), data.draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("op", RAW_OPS)
@pytest.mark.parametrize("cpp_op", [pytest.param(False, id="library"), pytest.param(True, id="extension")])
@needs_cpp
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=60, per_example_s=0.05)
@given(data=st.data())
def test_raw_ops_cpp(op, cpp_op, data):
    check(data.draw(RAW_OPS[op]("cpp", cpp_op)), data.draw(st.integers(0, 2**31 - 1)))


@needs_triton
@pytest.mark.parametrize("op", [*RAW_OPS, "linear"])
@pytest.mark.usefixtures("poisoned_outputs")
@fuzz_settings(examples=15, per_example_s=0.5, hunt_share=4)
@given(data=st.data())
def test_raw_ops_triton(op, data):
    calls = raw_linear_calls if op == "linear" else RAW_OPS[op]
    check(data.draw(calls("triton")), data.draw(st.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------------------------
# regressions: bugs this suite found, each as the smallest call that showed it


def close_to_float64(ours, op, *args, tolerance=1e-5, **kwargs):
    """Every tensor of ``ours`` within ``tolerance`` (relative) of ``op`` on float64 copies of ``args``."""
    expected = op(*(a.double() if isinstance(a, Tensor) else a for a in args), **kwargs)
    for a, e in zip(ours, expected):
        assert a.isfinite().all() and max_relative_error(a, e) < tolerance, (a, e)


@needs_triton
def test_triton_reads_strided_parameters():
    """A layer-norm weight or a bias that is a strided view was read as if contiguous (errors ~4)."""
    x, x_t, w = torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 5)
    norm_w, bias = torch.randn(10)[::2], torch.randn(8)[::2]
    ours = F.layer_norm_jvp(x, x_t, norm_w, norm_w, norm_w, norm_w, backend="triton")
    close_to_float64(ours, tk.reference.layer_norm_jvp, x, x_t, norm_w, norm_w, norm_w, norm_w)
    ours = F.linear_jvp(x, x_t, w, bias, w, bias, activation="gelu", backend="triton")
    close_to_float64(ours, F.linear_jvp, x, x_t, w, bias, w, bias, activation="gelu", backend="reference")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp), "triton", "auto"])
def test_layer_norm_of_no_features_is_empty(backend):
    """torch gives an empty result for a last dimension of 0; it was refused ("x: expected at least
    one feature")."""
    x = torch.randn(3, 0)
    y, y_t = F.layer_norm_jvp(x, x, torch.ones(0), torch.zeros(0), backend=backend)
    assert y.shape == y_t.shape == torch_F.layer_norm(x, (0,)).shape == (3, 0)


def test_reference_attention_gradient_of_a_fully_masked_row():
    """A query row with every key masked: its softmax denominator was clamped to the smallest
    normal float, and an upstream gradient above ~4 overflowed there to NaN (inf · 0)."""
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4, requires_grad=True)
    v = 100 * torch.randn(1, 1, 2, 4)
    o, _ = F.attention_jvp(q, k, v, key_padding_mask=torch.tensor([[True, True]]), backend="reference")
    assert not o.any() and not torch.autograd.grad(o, k, torch.ones_like(o))[0].any()


@needs_cpp
def test_gelu_of_a_0d_tensor_on_the_fused_backends():
    """torch's GELU takes a 0-d tensor; the fused path refused it naming its internal ``h``."""
    x, x_t = torch.tensor(1.5), torch.tensor(0.5)
    close_to_float64(F.gelu_jvp(x, x_t, backend="cpp"), tk.reference.gelu_jvp, x, x_t)


@needs_cpp
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_with_no_output_features(activation):
    """A weight with 0 rows (and an MLP of hidden width 0): the GELU op was handed an empty ``h``
    and refused it by that internal name."""
    x, w1, w2 = torch.randn(2, 3), torch.randn(0, 3), torch.randn(4, 0)
    y, y_t = F.linear_jvp(x, x, w1, None, w1, None, activation=activation, backend="cpp")
    assert y.shape == y_t.shape == (2, 0)
    y, y_t = F.mlp_jvp(x, x, w1, None, w2, None, backend="cpp")
    assert not y.any() and y_t is not None and not y_t.any() and y.shape == (2, 4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp), "triton", "triton-walked"])
@pytest.mark.parametrize("features, value", [(7, 12345.678), (1, 1.5e20), (5, 3e19), (100, 1e35), (37, 12345.678)])
def test_layer_norm_of_a_constant_row(backend, features, value, monkeypatch):
    """A constant float32 row: its mean's rounding error showed as variance (x̂ = ±0.7 at
    12345.678 where torch gives 0); beyond the overflow threshold eps · (1 / peak)² underflowed
    (rstd inf: y NaN; or y_t 11% off). ``triton-walked``: rows walked in tiles of 4 features, as
    rows wider than ``ROW_TILE`` are."""
    if backend == "triton-walked":
        walk_norm_rows(monkeypatch, tile=4)
        backend = "triton"
    x, x_t = torch.full((1, features), value), torch.randn(1, features) * value
    ours = F.layer_norm_jvp(x, x_t, None, None, backend=backend)
    expected = torch.func.jvp(
        lambda x: torch_F.layer_norm(x, (features,), eps=1e-6), (x.double(),), (x_t.double(),)
    )
    for a, e in zip(ours, expected):
        assert a.isfinite().all() and max_relative_error(a, e) < 1e-5


def test_reference_gelu_second_order_in_float16():
    """The reference evaluated GELU's derivative in float16: x³ overflows for |x| > 40, and the
    gradient of y_t w.r.t. x came out NaN."""
    x, x_t = torch.tensor([46.2, -8.8, -65.4]), torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for dtype in (torch.float16, torch.float64):
        leaf = x.to(dtype).requires_grad_()
        y, y_t = F.gelu_jvp(leaf, x_t.to(dtype), "tanh", backend="reference")
        grads.append(torch.autograd.grad(0.7 * y.sum() + 1.3 * y_t.sum(), leaf)[0])
    assert grads[0].isfinite().all() and max_relative_error(grads[0], grads[1]) < 1e-2


@needs_triton
def test_raw_triton_attention_reads_any_last_stride():
    """``torch.ops.tangent_kernels.attention_jvp`` (and its VJP) with ``backend="triton"`` read a
    head dim of stride 2 as if it were 1 (functional made it unit stride, the raw op did not)."""
    q, k, v = (torch.randn(1, 2, 5, 8)[..., ::2] for _ in range(3))
    dense = [t.contiguous() for t in (q, k, v)]
    o, o_t, lse = RAW.attention_jvp(q, k, v, q, None, None, None, 0.5, False, "triton")
    expected = RAW.attention_jvp(*dense, dense[0], None, None, None, 0.5, False, "triton")
    assert all(torch.allclose(a, e) for a, e in zip((o, o_t, lse), expected))
    grads = RAW.attention_vjp(o, q, k, v, o, lse, None, 0.5, False, True, True, "triton")
    expected = RAW.attention_vjp(o, *dense, o, lse, None, 0.5, False, True, True, "triton")
    assert all(torch.allclose(a, e) for a, e in zip(grads, expected))


@needs_triton
def test_triton_second_order_attention_reads_any_last_stride():
    """The second-order Triton kernels read a head dim of stride 2 as 1 (NaN here): functional's copy
    to unit stride, which they relied on, moved into the first-order launchers."""
    grads = []
    for layout in (lambda t: t, lambda t: torch.stack([t, torch.full_like(t, math.nan)], -1)[..., 0]):
        q, k, v, q_t = (
            layout(t) for t in torch.randn(4, 1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
        )
        q.requires_grad_()
        o, o_t = F.attention_jvp(q, k, v, q_t, None, None, backend="triton")
        grads.append(torch.autograd.grad(o.sum() + 1.3 * o_t.sum(), q)[0])
    assert grads[1].isfinite().all() and torch.equal(grads[0], grads[1])


@needs_triton
def test_raw_triton_ops_refuse_what_triton_cannot_run():
    """The raw ops with ``backend="triton"`` ran float64 through float32 kernels (errors ~1e-8)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="h: the triton backend cannot run it"):
        RAW.gelu_jvp(x, x, None, None, "none", "triton")
    with pytest.raises(TypeError, match="x: the triton backend cannot run it"):
        RAW.layer_norm_jvp(x, x, None, None, None, None, 1e-5, True, "triton")


@needs_cpp
def test_raw_cpp_ops_refuse_integer_tensors_by_name():
    """The C++ ops failed in their dtype dispatch ("not implemented for 'Long'"), naming nothing."""
    x = torch.ones(2, 2, 2, 2, dtype=torch.int64)
    for call, name in (
        (lambda: RAW.gelu_jvp_forward(x, None, None, None, "none"), "h"),
        (lambda: RAW.layer_norm_jvp_forward(x, None, None, None, None, None, 1e-5, True), "x"),
        (lambda: RAW.attention_jvp_forward(x, x, x, None, None, None, None, 1.0, False), "q"),
    ):
        with pytest.raises(RuntimeError, match=f"{name}: expected a floating-point tensor"):
            call()


@needs_cpp
def test_raw_cpp_layer_norm_backward_of_no_features():
    """A last dimension of 0 divided by zero in C++ (SIGFPE: the process died)."""
    x = torch.randn(3, 0)
    with pytest.raises(RuntimeError, match="x: expected at least one feature"):
        RAW.layer_norm_backward(x, x, None, torch.zeros(3), torch.zeros(3), True, True, True)


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpp", marks=needs_cpp), "triton"])
def test_attention_with_an_infinite_scale_follows_torch(backend):
    """scale = inf: torch adds a masked key's -inf to the ±inf score (NaN); the kernels skip
    masked keys (0). "auto" now runs the reference; an explicit fused backend refuses the scale."""
    q, k, v = torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]]]), torch.randn(1, 1, 2, 2)
    mask = torch.tensor([[True, False]])  # the masked key's score is +inf, the other one's -inf
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch_F.scaled_dot_product_attention(
            q, k, v, attn_mask=~mask[:, None, None, :], scale=math.inf
        )
    if backend != "auto":
        with pytest.raises(tk.BackendUnavailableError, match="scale: the fused kernels need a finite scale"):
            F.attention_jvp(q, k, v, scale=math.inf, key_padding_mask=mask, backend=backend)
        return
    o, _ = F.attention_jvp(q, k, v, scale=math.inf, key_padding_mask=mask, backend=backend)
    assert expected.isnan().all() and o.isnan().all()
    o, o_t = F.attention_jvp(q, -q, v[:, :, :1], q, None, None, scale=math.inf, backend=backend)
    assert not o.any() and not o_t.any()  # every score -inf: zeros, as a fully masked row (o_t was NaN)


def test_reference_layer_norm_gradient_of_huge_rows():
    """A float32 row beyond the overflow threshold is divided by its peak; the gradient through
    that peak (x̂ does not depend on it) overflowed to inf · 0 = NaN with weights of 1e20."""
    x = torch.tensor([1.5e20, -2.9e19, -2.2e20], requires_grad=True)
    w = torch.tensor([5.7e19, -1.1e20, -1.4e20])
    y, _ = F.layer_norm_jvp(x, None, w, None, backend="reference")
    grad = torch.autograd.grad(y.sum(), x)[0]
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(torch_F.layer_norm(x64, (3,), w.double(), eps=1e-6).sum(), x64)[0]
    assert grad.isfinite().all() and max_relative_error(grad, expected) < 1e-4


def test_reference_attention_tangent_of_large_scores():
    """One key at scale 30: O_t = V_t exactly, but (P ⊙ S_t) V − rowsum(P ⊙ S_t) O cancelled two
    large products (6.5e-4 relative error in float32; torch's jvp gives 0)."""
    g = torch.Generator().manual_seed(181)
    q, k, q_t = (3 * torch.randn(1, 1, 1, 17, generator=g) for _ in range(3))
    v, v_t = 3 * torch.randn(1, 1, 1, 17, generator=g), torch.randn(1, 1, 1, 17, generator=g)
    _, o_t = F.attention_jvp(q, k, v, q_t, None, v_t, scale=30.0, backend="reference")
    assert max_relative_error(o_t, v_t) < 1e-6


@needs_cpp
def test_cpp_attention_tangent_of_one_key():
    """One key: O_t = V_t exactly, but the C++ kernel's acc_t / l − (r / l) O cancelled two large
    products (6e-6 relative in float32, 2e-5 absolute in the fuzz case; torch's jvp gives 0)."""
    g = torch.Generator().manual_seed(70)
    q, k, k_t = (3 * torch.randn(1, 1, 1, 17, generator=g) for _ in range(3))
    v, v_t = 3 * torch.randn(1, 1, 1, 17, generator=g), torch.randn(1, 1, 1, 17, generator=g)
    _, o_t = F.attention_jvp(q, k, v, None, k_t, v_t, scale=0.5, backend="cpp")
    assert max_relative_error(o_t, v_t) < 1e-7
