"""Drop-in tangent modules: each is built from the timm / PyTorch module it linearizes.

A tangent module maps ``(x, x_t) -> (y, y_t)`` (``x_t=None`` is a zero tangent). It keeps the
frozen weights ``w0`` of the module it was built from as non-persistent buffers named
``<name>0`` (``weight0``, ``bias0``, ...), sharing their storage, and has one trainable offset
``dw`` per weight under the original parameter name (``weight``, ``bias``, ``gamma``, ...),
initialised to zero. So ``parameters()`` are exactly the offsets and ``state_dict()`` keys line up
with the original module's. Parts without a fused op (norms other than LayerNorm and RMSNorm,
activations, gated MLPs) are
``TangentForwardAD``: forward-mode AD of the module's own code, exact but unfused.

``backend`` names the backend for every op that has one of that name (the others run on
``"auto"``; ``tangent_kernels.last_backend(op)`` tells what ran). Dropout and DropPath apply the
same mask to both streams (the linearization of the network with that mask). Under
``torch.autocast`` the ops run in the dtype autocast would pick for torch's own layers
(``functional`` casts: the autocast dtype for linear layers and attention; for norms, torch's rule
on that device, float32 on CUDA).
"""

from __future__ import annotations

import copy
from operator import attrgetter

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import backends, validation
from . import functional as F
from .patching import fused_jvp, has_fused_attn_flag
from .reference import add_tangents

Pair = tuple[Tensor, "Tensor | None"]


class UnsupportedModuleError(TypeError):
    """A module (or a setting of it) that the tangent modules cannot linearize."""


def _frozen(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return None if value is None else value.detach()


def _offset(frozen: Tensor | None) -> nn.Parameter | None:
    return None if frozen is None else nn.Parameter(torch.zeros_like(frozen))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are non-persistent buffers sharing the original storage.

    The original is untouched; the copy has no parameters, so nothing in it trains or appears in
    ``state_dict()``.
    """
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    clone = copy.deepcopy(module, memo)
    for submodule in clone.modules():
        for name, param in list(submodule._parameters.items()):
            del submodule._parameters[name]
            submodule.register_buffer(name, None if param is None else param.detach(), persistent=False)
    return clone


def _register_linearized(module: nn.Module, name: str, frozen: Tensor | None) -> None:
    """``frozen`` as buffer ``<name>0`` and a zero offset as parameter ``<name>``."""
    module.register_buffer(f"{name}0", frozen, persistent=False)
    module.register_parameter(name, _offset(frozen))


def checked_backend(backend: str) -> str:
    """A module's ``backend`` setting, checked when the module is built (not at its first call)."""
    validation.choice("backend", backend, backends.BACKENDS)
    return backend


def _op_backend(op: str, backend: str) -> str:
    """A module's backend applies to every op that has it; ops without it run on ``"auto"``."""
    return backend if backend in backends.IMPLEMENTED[op] else "auto"


def dropout_pair(x: Tensor, x_t: Tensor | None, p: float, training: bool) -> Pair:
    """Dropout with one mask for both streams (``p = 1`` multiplies by zero, as torch does)."""
    if not training or p == 0.0:
        return x, x_t
    mask = torch.zeros_like(x) if p == 1.0 else torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask, None if x_t is None else x_t * mask


def drop_path_pair(x: Tensor, x_t: Tensor | None, p: float, training: bool, scale_by_keep: bool = True) -> Pair:
    """Stochastic depth (one keep/drop draw per sample) with one mask for both streams."""
    if not training or p == 0.0:
        return x, x_t
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask, None if x_t is None else x_t * mask


class TangentIdentity(nn.Module):
    """``(x, x_t) -> (x, x_t)``: stands in for ``nn.Identity`` inside tangent modules."""

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        return x, x_t


class TangentForwardAD(nn.Module):
    """Any module without a fused tangent op, linearized by forward-mode AD of its own code.

    Exact (it is ``torch.func.jvp`` of the module at ``w0`` along ``dw``) but unfused, and it
    saves for backward what ``jvp`` saves. It covers what the fused modules do not: other norms
    (RMSNorm), activations (QuickGELU, SiLU), gated MLPs (SwiGLU), attention pooling, other block
    and attention types. It runs inside ``patching.fused_jvp()``: the module's attention
    (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``; timm's ``fused_attn`` flags are
    turned on in the frozen copy) and layer norms take their fused ``jvp`` rules, so no N×N tensor
    appears where the kernel can serve the call. The offsets are registered under the module's own
    parameter names; the frozen copy keeps ``w0``.
    """

    def __init__(self, module: nn.Module, backend: str = "auto"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        self.backend = checked_backend(backend)
        self.offset_names = [name for name, _ in module.named_parameters()]
        self.frozen = frozen_copy(module)
        for submodule in filter(has_fused_attn_flag, self.frozen.modules()):
            submodule.fused_attn = True
        for name, param in module.named_parameters():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, _offset(param.detach()))

    def forward(self, x: Tensor, x_t: Tensor | None = None, **kwargs) -> Pair:
        with fused_jvp(_op_backend("attention_jvp", self.backend)):
            if x_t is None and not self.offset_names:
                return self.frozen(x, **kwargs), None
            # read by attribute: under torch.func.functional_call the offsets are plain tensors
            w0 = {name: attrgetter(name)(self.frozen) for name in self.offset_names}
            dw = {name: attrgetter(name)(self) for name in self.offset_names}

            def run(x: Tensor, weights: dict[str, Tensor]) -> Tensor:
                return torch.func.functional_call(self.frozen, weights, (x,), kwargs)

            return torch.func.jvp(run, (x, w0), (torch.zeros_like(x) if x_t is None else x_t, dw))


class TangentLinear(nn.Module):
    """``nn.Linear`` linearized: ``y = x W0ᵀ + b0``, ``y_t = x_t W0ᵀ + x dWᵀ + db``."""

    def __init__(self, linear: nn.Linear, backend: str = "auto"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModuleError(f"TangentLinear: expected an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = checked_backend(backend)
        _register_linearized(self, "weight", _frozen(linear, "weight"))
        _register_linearized(self, "bias", _frozen(linear, "bias"))

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        args = x, x_t, self.weight0, self.bias0, self.weight, self.bias
        return F.linear_jvp(*args, backend=_op_backend("linear_jvp", self.backend))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TangentLayerNorm(nn.Module):
    """``nn.LayerNorm`` (over the last dimension) linearized, with offsets of its weight and bias."""

    def __init__(self, norm: nn.LayerNorm, backend: str = "auto"):
        super().__init__()
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise UnsupportedModuleError(
                f"TangentLayerNorm: expected an nn.LayerNorm over the last dimension, got {norm!r}"
            )
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.backend = checked_backend(backend)
        _register_linearized(self, "weight", _frozen(norm, "weight"))
        _register_linearized(self, "bias", _frozen(norm, "bias"))

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        args = x, x_t, self.weight0, self.bias0, self.weight, self.bias
        return F.layer_norm_jvp(*args, eps=self.eps, backend=_op_backend("layer_norm_jvp", self.backend))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class TangentRMSNorm(nn.Module):
    """``nn.RMSNorm`` or timm's ``RmsNorm`` (over the last dimension) linearized, with an offset of
    its weight."""

    def __init__(self, norm: nn.Module, backend: str = "auto"):
        super().__init__()
        if not (_is_rms_norm(norm) and len(norm.normalized_shape) == 1):
            raise UnsupportedModuleError(
                f"TangentRMSNorm: expected an nn.RMSNorm or timm RmsNorm over the last dimension, got {norm!r}"
            )
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.backend = checked_backend(backend)
        _register_linearized(self, "weight", _frozen(norm, "weight"))

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        args = x, x_t, self.weight0, self.weight
        return F.rms_norm_jvp(*args, eps=self.eps, backend=_op_backend("rms_norm_jvp", self.backend))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def _is_rms_norm(module: nn.Module) -> bool:
    from timm.layers import RmsNorm

    return computes_like(module, nn.RMSNorm) or computes_like(module, RmsNorm)


class TangentLayerScale(nn.Module):
    """timm ``LayerScale`` linearized: ``y = γ0 · x``, ``y_t = γ0 · x_t + dγ · x``."""

    def __init__(self, layer_scale: nn.Module):
        super().__init__()
        if not isinstance(getattr(layer_scale, "gamma", None), Tensor):
            raise UnsupportedModuleError(f"TangentLayerScale: expected timm's LayerScale, got {type(layer_scale).__name__}")
        _register_linearized(self, "gamma", _frozen(layer_scale, "gamma"))

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        _check_features(x, self.gamma0.numel())
        return x * self.gamma0, add_tangents(None if x_t is None else x_t * self.gamma0, x * self.gamma)


def _check_features(x, width: int, tokens: bool = False) -> None:
    """``x`` of ``width`` features: ``(..., width)``, or ``(batch, tokens, width)`` as timm's
    attention takes them (``tokens``); its tangent is checked by the ops it meets."""
    validation.tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != width or (tokens and x.dim() != 3):
        expected = f"(batch, tokens, {width})" if tokens else f"(..., {width})"
        raise ValueError(f"x: expected {expected}, got shape {tuple(x.shape)}")


def gelu_approximation(act: nn.Module) -> str | None:
    """``"none"`` or ``"tanh"`` for the GELU modules of torch and timm; ``None`` for others."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name = type(act).__name__
    if name in ("GELU", "GELUTanh") and type(act).__module__.startswith("timm"):
        return "tanh" if name == "GELUTanh" else "none"
    return None


def computes_like(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` running ``cls``'s own forward (a subclass may change only the
    constructor), so a tangent module written for ``cls`` linearizes it exactly."""
    return isinstance(module, cls) and type(module).forward is cls.forward


class TangentMlp(nn.Module):
    """timm ``Mlp`` linearized: ``fc1 → activation → dropout → (norm) → fc2 → dropout``.

    With GELU (erf or tanh form) and no hidden norm it is one fused ``mlp_jvp``; other
    activations run by forward AD between the two fused linear layers.
    """

    def __init__(self, mlp: nn.Module, backend: str = "auto"):
        super().__init__()
        for part in ("fc1", "act", "fc2"):
            if not hasattr(mlp, part):
                raise UnsupportedModuleError(f"TangentMlp: expected timm's Mlp (fc1, act, fc2), {type(mlp).__name__} has no {part}")
        if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise UnsupportedModuleError("TangentMlp: fc1 and fc2 must be nn.Linear (use_conv=True is not supported)")
        self.approximate = gelu_approximation(mlp.act)
        self.act = None if self.approximate is not None else TangentForwardAD(mlp.act, backend)
        self.backend = checked_backend(backend)
        self.fc1 = TangentLinear(mlp.fc1, backend)
        self.norm = tangent_module(getattr(mlp, "norm", nn.Identity()), backend)
        self.fc2 = TangentLinear(mlp.fc2, backend)
        self.drop1_p = getattr(getattr(mlp, "drop1", None), "p", 0.0)
        self.drop2_p = getattr(getattr(mlp, "drop2", None), "p", 0.0)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        plain_gelu = self.act is None and isinstance(self.norm, TangentIdentity)
        if plain_gelu and (not self.training or self.drop1_p == 0.0):  # one op a fused MLP kernel can serve
            fc1, fc2 = self.fc1, self.fc2
            args = (x, x_t, fc1.weight0, fc1.bias0, fc2.weight0, fc2.bias0, fc1.weight, fc1.bias, fc2.weight,
                    fc2.bias)  # fmt: skip
            y, y_t = F.mlp_jvp(*args, approximate=self.approximate, backend=_op_backend("mlp_jvp", self.backend))
        else:
            h, h_t = self.fc1(x, x_t)
            if self.act is None:
                h, h_t = F.gelu_jvp(h, h_t, self.approximate, backend=_op_backend("gelu_jvp", self.backend))
            else:
                h, h_t = self.act(h, h_t)
            h, h_t = dropout_pair(h, h_t, self.drop1_p, self.training)
            h, h_t = self.norm(h, h_t)
            y, y_t = self.fc2(h, h_t)
        return dropout_pair(y, y_t, self.drop2_p, self.training)


class TangentAttention(nn.Module):
    """timm ``Attention`` linearized: fused qkv (bias on/off), optional qk-norm, scale-norm and
    sigmoid output gate, proj."""

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        from timm.layers import Attention

        if not computes_like(attn, Attention):
            raise UnsupportedModuleError(
                f"TangentAttention: expected timm.layers.Attention (fused qkv), got {type(attn).__name__}"
            )
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.backend = checked_backend(backend)
        self.qkv = TangentLinear(attn.qkv, backend)
        self.q_norm = tangent_module(attn.q_norm, backend)
        self.k_norm = tangent_module(attn.k_norm, backend)
        self.norm = tangent_module(getattr(attn, "norm", nn.Identity()), backend)
        gate = getattr(attn, "gate", None)
        self.gate = None if gate is None else TangentLinear(gate, backend)
        self.proj = TangentLinear(attn.proj, backend)
        self.attn_drop_p = attn.attn_drop.p
        self.proj_drop_p = attn.proj_drop.p

    def _heads(self, qkv: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Split ``(B, N, 3·H·D)`` into three ``(B, H, N, D)`` views (no copy)."""
        if qkv is None:
            return None, None, None
        batch, tokens, _ = qkv.shape
        return qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attention_with_dropout(self, q, k, v, q_t, k_t, v_t, is_causal: bool) -> Pair:
        """Attention dropout in training: forward AD of torch's math SDPA, so both streams see one
        dropout mask (the linearization of the network with that mask). It materializes the N×N
        attention, as timm's own math path does."""
        def attend(q, k, v):
            return torch_F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_p, is_causal=is_causal,
                                                        scale=self.scale)  # fmt: skip

        tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in ((q, q_t), (k, k_t), (v, v_t)))
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(attend, (q, k, v), tangents)

    def forward(
        self, x: Tensor, x_t: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Pair:
        if attn_mask is not None:
            raise NotImplementedError("TangentAttention: attn_mask is not supported (is_causal=True is)")
        _check_features(x, self.qkv.in_features, tokens=True)
        batch, tokens, _ = x.shape
        qkv, qkv_t = self.qkv(x, x_t)
        (q, k, v), (q_t, k_t, v_t) = self._heads(qkv), self._heads(qkv_t)
        q, q_t = self.q_norm(q, q_t)
        k, k_t = self.k_norm(k, k_t)
        if self.training and self.attn_drop_p > 0.0:
            o, o_t = self._attention_with_dropout(q, k, v, q_t, k_t, v_t, is_causal)
        else:
            backend = _op_backend("attention_jvp", self.backend)
            o, o_t = F.attention_jvp(q, k, v, q_t, k_t, v_t, scale=self.scale, causal=is_causal, backend=backend)
        width = self.num_heads * self.head_dim  # explicit: a batch of 0 leaves -1 ambiguous
        o, o_t = (None if t is None else t.transpose(1, 2).reshape(batch, tokens, width) for t in (o, o_t))
        o, o_t = self.norm(o, o_t)
        if self.gate is not None:  # o · sigmoid(g): the tangent is o_t · s + o · s (1 - s) g_t
            g, g_t = self.gate(x, x_t)
            s = torch.sigmoid(g)
            s_t = None if g_t is None else s * (1 - s) * g_t
            o, o_t = o * s, add_tangents(None if o_t is None else o_t * s, None if s_t is None else o * s_t)
        y, y_t = self.proj(o, o_t)
        return dropout_pair(y, y_t, self.proj_drop_p, self.training)


class TangentDropPath(nn.Module):
    """timm ``DropPath`` (or ``nn.Identity``) with one per-sample mask for both streams."""

    def __init__(self, drop_path: nn.Module):
        super().__init__()
        self.drop_prob = getattr(drop_path, "drop_prob", 0.0)
        self.scale_by_keep = getattr(drop_path, "scale_by_keep", True)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        return drop_path_pair(x, x_t, self.drop_prob, self.training, self.scale_by_keep)


class TangentBlock(nn.Module):
    """timm ViT ``Block`` linearized: pre-norm attention and MLP with residuals, LayerScale, DropPath."""

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        from timm.models.vision_transformer import Block

        if not computes_like(block, Block):
            raise UnsupportedModuleError(
                f"TangentBlock: expected timm's vision_transformer.Block, got {type(block).__name__}"
            )
        self.norm1 = tangent_module(block.norm1, backend)
        self.attn = tangent_module(block.attn, backend)
        self.ls1 = tangent_module(block.ls1, backend)
        self.norm2 = tangent_module(block.norm2, backend)
        self.mlp = tangent_module(block.mlp, backend)
        self.ls2 = tangent_module(block.ls2, backend)
        self.drop_path1 = TangentDropPath(block.drop_path1)
        self.drop_path2 = TangentDropPath(block.drop_path2)

    def forward(
        self, x: Tensor, x_t: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Pair:
        """timm's ``Block.forward`` arguments after the tangent (an ``attn_mask`` is refused by the
        attention, as there)."""
        h, h_t = self.norm1(x, x_t)
        h, h_t = self.attn(h, h_t, attn_mask=attn_mask, is_causal=is_causal)
        h, h_t = self.ls1(h, h_t)
        h, h_t = self.drop_path1(h, h_t)
        x, x_t = x + h, add_tangents(x_t, h_t)
        h, h_t = self.norm2(x, x_t)
        h, h_t = self.mlp(h, h_t)
        h, h_t = self.ls2(h, h_t)
        h, h_t = self.drop_path2(h, h_t)
        return x + h, add_tangents(x_t, h_t)


class TangentPatchEmbed(nn.Module):
    """timm ``PatchEmbed`` linearized: the patch convolution with weight/bias offsets, then its
    output layout (flattened tokens, or NHWC patches for ``dynamic_img_size``) and norm."""

    def __init__(self, patch_embed: nn.Module, backend: str = "auto"):
        super().__init__()
        proj = getattr(patch_embed, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise UnsupportedModuleError("TangentPatchEmbed: expected timm's PatchEmbed with a Conv2d projection")
        self.img_size, self.patch_size = patch_embed.img_size, patch_embed.patch_size
        self.grid_size = getattr(patch_embed, "grid_size", None)
        self.strict_img_size = getattr(patch_embed, "strict_img_size", True)
        self.dynamic_img_pad = getattr(patch_embed, "dynamic_img_pad", False)
        self.flatten = getattr(patch_embed, "flatten", True)
        self.output_fmt = getattr(patch_embed, "output_fmt", None)
        self.stride, self.padding = proj.stride, proj.padding
        self.proj = nn.Module()
        _register_linearized(self.proj, "weight", _frozen(proj, "weight"))
        _register_linearized(self.proj, "bias", _frozen(proj, "bias"))
        self.norm = tangent_module(patch_embed.norm, backend)

    def _layout(self, y: Tensor) -> Tensor:
        """NCHW conv output in the module's output layout."""
        if self.flatten:
            return y.flatten(2).transpose(1, 2)
        from timm.layers.format import Format, nchw_to

        return y if self.output_fmt in (None, Format.NCHW) else nchw_to(y, self.output_fmt)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> Pair:
        check_image_size(self, x)
        if self.dynamic_img_pad:  # zero-pad to whole patches (bottom and right), both streams
            pad = (0, (-x.shape[-1]) % self.patch_size[1], 0, (-x.shape[-2]) % self.patch_size[0])
            x, x_t = torch_F.pad(x, pad), None if x_t is None else torch_F.pad(x_t, pad)
        p = self.proj
        w0, b0, dw, db = p.weight0, p.bias0, p.weight, p.bias  # (autocast casts the convolutions)
        conv = dict(stride=self.stride, padding=self.padding)
        y = torch_F.conv2d(x, w0, b0, **conv)
        y_t = torch_F.conv2d(x, dw, db, **conv)
        if x_t is not None:
            y_t = y_t + torch_F.conv2d(x_t, w0, None, **conv)
        return self.norm(self._layout(y), self._layout(y_t))


def check_image_size(patch_embed: nn.Module, x: Tensor) -> None:
    """Refuse images a (timm or tangent) patch embedding cannot take, naming ``x`` (timm's own check
    is an ``assert``)."""
    size = tuple(x.shape[-2:])
    if patch_embed.img_size is None:
        return
    if getattr(patch_embed, "strict_img_size", True) and size != tuple(patch_embed.img_size):
        raise ValueError(f"x: expected images of size {tuple(patch_embed.img_size)}, got {size}")
    if not getattr(patch_embed, "dynamic_img_pad", False) and any(n % p for n, p in zip(size, patch_embed.patch_size)):
        raise ValueError(f"x: expected an image size divisible by the patch size {tuple(patch_embed.patch_size)}, "
                         f"got {size}")  # fmt: skip


def tangent_module(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The tangent version of ``module``: the fused tangent module written for its type where
    there is one (a subclass may change only the constructor), ``TangentForwardAD`` otherwise."""
    from timm.layers import Attention, LayerScale, Mlp
    from timm.layers import LayerNorm as TimmLayerNorm
    from timm.models.vision_transformer import Block

    checked_backend(backend)
    if isinstance(module, nn.Identity):
        return TangentIdentity()
    if computes_like(module, nn.Linear):
        return TangentLinear(module, backend)
    layer_norm = computes_like(module, nn.LayerNorm) or computes_like(module, TimmLayerNorm)
    if layer_norm and len(module.normalized_shape) == 1:
        return TangentLayerNorm(module, backend)
    if _is_rms_norm(module) and len(module.normalized_shape) == 1:
        return TangentRMSNorm(module, backend)
    if computes_like(module, LayerScale):
        return TangentLayerScale(module)
    if computes_like(module, Mlp) and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear):
        return TangentMlp(module, backend)
    if computes_like(module, Attention):
        return TangentAttention(module, backend)
    if computes_like(module, Block):
        return TangentBlock(module, backend)
    return TangentForwardAD(module, backend)
