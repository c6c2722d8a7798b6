"""``linearize(model)`` for timm Vision Transformers: ``f(x; w0) + J_w f(x; w0) · dw``.

The linearized part is the last ``k`` blocks plus the final norm, pooling and head (TAFT-k), or
the whole network (``blocks="all"``, embeddings included). The frozen prefix runs timm's own
modules (their fused SDPA included) with no tangent at all; the first linearized block starts
from a zero tangent. The result's ``parameters()`` are exactly the offsets ``dw`` (zero at
first), under the names the original model gives those weights.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

from . import autocasting, validation
from .modules import (
    TangentForwardAD,
    TangentPatchEmbed,
    UnsupportedModuleError,
    _frozen,
    _register_linearized,
    check_image_size,
    checked_backend,
    dropout_pair,
    frozen_copy,
    tangent_module,
)
from .reference import add_tangents


# Tokens prepended to the patches, in timm's order (the distillation token exists in DeiT distilled).
PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")
LINEAR_POOLS = ("", "token", "avg")  # timm's pool types that are linear maps: both streams pooled alike


def _reinitialized(block: nn.Module) -> nn.Module:
    """A fresh copy of ``block`` with timm's ViT initialisation (the original is untouched)."""
    from timm.models.vision_transformer import init_weights_vit_timm

    block = copy.deepcopy(block)
    for name, module in block.named_modules():
        init_weights_vit_timm(module, name)
    return block


# The VisionTransformer methods whose code LinearizedViT re-implements; a subclass that overrides
# one computes something else, unless it is DeiT's distilled model (a distillation token after the
# class token, and a second head on it whose logits are averaged with the first), which is
# re-implemented too.
REIMPLEMENTED = ("forward", "forward_features", "forward_head", "pool", "_pos_embed")


def _check_supported(model: nn.Module) -> None:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModuleError(
            f"linearize: expected a timm VisionTransformer, got {type(model).__name__}"
        )
    base = VisionTransformerDistilled if isinstance(model, VisionTransformerDistilled) else VisionTransformer
    overridden = [m for m in REIMPLEMENTED if getattr(type(model), m) is not getattr(base, m)]
    if overridden:
        raise UnsupportedModuleError(
            f"linearize: {type(model).__name__} overrides {base.__name__}.{', '.join(overridden)}; "
            "only timm's VisionTransformer and VisionTransformerDistilled themselves are supported"
        )
    if getattr(model, "distilled_training", False):
        raise UnsupportedModuleError(
            f"linearize: {type(model).__name__} has distilled_training on, so in training it returns the "
            "class and distillation logits apart; set_distilled_training(False) to linearize their average"
        )


class _FrozenPrefix(nn.Module):
    """Embeddings and the first blocks of a ViT, run by timm's own code with frozen weights."""

    def __init__(self, model: nn.Module, num_blocks: int):
        super().__init__()
        vit = frozen_copy(model)
        vit.blocks = vit.blocks[:num_blocks]
        vit.norm, vit.fc_norm, vit.head = nn.Identity(), nn.Identity(), nn.Identity()  # linearized instead
        self.vit = vit

    def forward(self, images: Tensor) -> Tensor:
        check_image_size(self.vit.patch_embed, images)
        return self.vit.forward_features(images)


def _max_pool_pair(x: Tensor, x_t: Tensor, pool_type: str, skip: int) -> tuple[Tensor, Tensor]:
    """timm's ``max`` / ``avgmax`` pooling over the tokens after the first ``skip`` on both streams,
    the tangent as torch's forward AD of ``amax`` gives it (the mean over tied maxima), written out:
    ``torch.func.jvp`` here cannot run inside a compiled ``forward_ad`` level (not nestable)."""
    x, x_t = x[:, skip:], x_t[:, skip:]
    peak = x.amax(1, keepdim=True)
    at_peak = x == peak
    peak_t = (x_t * at_peak).sum(1) / at_peak.sum(1)
    if pool_type == "max":
        return peak.squeeze(1), peak_t
    return 0.5 * (peak.squeeze(1) + x.mean(1)), 0.5 * (peak_t + x_t.mean(1))


class LinearizedViT(nn.Module):
    """A timm ViT linearized around its weights; see ``linearize``."""

    def __init__(self, model: nn.Module, blocks="all", *, backend="auto", reinit=False, fresh_cls_token=False):
        from timm.models.vision_transformer import global_pool_nlc

        super().__init__()
        _check_supported(model)
        reinit, fresh_cls_token = validation.flag("reinit", reinit), validation.flag("fresh_cls_token", fresh_cls_token)
        hybrid = getattr(model.patch_embed, "backbone", None) is not None  # a CNN stem before the projection
        proj = getattr(model.patch_embed, "proj", None)
        self.in_chans = proj.in_channels if isinstance(proj, nn.Conv2d) and not hybrid else None
        depth = len(model.blocks)
        num_linearized = depth if blocks == "all" else blocks
        if isinstance(num_linearized, bool) or not isinstance(num_linearized, int) or not 1 <= num_linearized <= depth:
            raise ValueError(f"blocks: expected 'all' or an int from 1 to {depth} (the last k blocks), got {blocks!r}")
        first = depth - num_linearized
        self.backend, self.first_linearized = checked_backend(backend), first
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pool_include_prefix = getattr(model, "pool_include_prefix", False)
        self.pool = functools.partial(  # timm's own pooling; its tangent by forward AD
            global_pool_nlc, pool_type=model.global_pool, num_prefix_tokens=self.num_prefix_tokens,
            reduce_include_prefix=self.pool_include_prefix,
        )
        attn_pool = getattr(model, "attn_pool", None)
        self.attn_pool = None if attn_pool is None else tangent_module(attn_pool, backend)
        self.no_embed_class = model.no_embed_class

        if first == 0:
            if fresh_cls_token:
                raise ValueError("fresh_cls_token: with blocks='all' the class token is already linearized")
            self.frozen = None
            self.patch_embed = (TangentForwardAD if hybrid else TangentPatchEmbed)(model.patch_embed, backend)
            self.grid_size = getattr(model.patch_embed, "grid_size", None)
            for name in (*PREFIX_TOKENS, "pos_embed"):
                _register_linearized(self, name, _frozen(model, name))
            self.norm_pre = tangent_module(model.norm_pre, backend)
            self.pos_drop_p = 0.0 if model.pos_embed is None else model.pos_drop.p  # timm drops only after adding it
            self.patch_drop = copy.deepcopy(model.patch_drop)  # no parameters
        else:
            self.frozen = _FrozenPrefix(model, first)
            if fresh_cls_token and model.cls_token is None:
                raise ValueError("fresh_cls_token: the model has no class token (class_token=False)")
            fresh = torch.zeros_like(model.cls_token.detach()) if fresh_cls_token else None
            self.register_parameter("cls_token", None if fresh is None else nn.Parameter(fresh))

        source = (_reinitialized(b) if reinit else b for b in list(model.blocks)[first:])
        self.blocks = nn.ModuleDict({str(first + i): tangent_module(b, backend) for i, b in enumerate(source)})
        self.norm = tangent_module(model.norm, backend)
        self.fc_norm = tangent_module(model.fc_norm, backend)
        self.head_drop_p = model.head_drop.p
        self.head = tangent_module(model.head, backend)
        head_dist = getattr(model, "head_dist", None)  # DeiT distilled
        self.head_dist = None if head_dist is None else tangent_module(head_dist, backend)
        self.train(model.training)

    def _check_images(self, images) -> None:
        """``(batch, channels, height, width)`` images the patch embedding takes: on the weights'
        device, of their dtype (any floating dtype under autocast), with their number of channels."""
        weight = next(b for b in self.buffers() if b.is_floating_point())  # a frozen w0
        validation.tensor("images", images)
        validation.same_device("images", images, weight, "the model's weights")
        if images.dim() != 4:
            raise ValueError(f"images: expected (batch, channels, height, width), got shape {tuple(images.shape)}")
        if self.in_chans is not None and images.shape[1] != self.in_chans:
            raise ValueError(f"images: expected {self.in_chans} channels (dim 1), got shape {tuple(images.shape)}")
        if images.dtype != weight.dtype and not autocasting.autocast_on(images.device):
            raise TypeError(f"images: expected dtype {weight.dtype} (as the model's weights), got {images.dtype}")

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens and their tangent entering the first linearized block."""
        if self.frozen is not None:
            x = self.frozen(images)
            if self.cls_token is None:
                return x, None
            fresh = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
            return x, torch.cat([fresh, torch.zeros_like(x[:, 1:])], dim=1)
        x, x_t = self.patch_embed(images)
        pos = None if self.pos_embed0 is None else (self.pos_embed0, self.pos_embed)
        if x.dim() == 4:  # dynamic_img_size: (B, H, W, C) patches, position embedding resampled to that grid
            batch, height, width, channels = x.shape
            if pos is not None:  # interpolation is linear: resample w0 and dw alike
                from timm.layers import resample_abs_pos_embed

                prefix_rows = 0 if self.no_embed_class else self.num_prefix_tokens
                pos = tuple(resample_abs_pos_embed(p, new_size=(height, width), old_size=self.grid_size,
                                                   num_prefix_tokens=prefix_rows) for p in pos)  # fmt: skip
            rows = (batch, height * width, channels)  # not -1: ambiguous for an empty batch
            x, x_t = x.reshape(rows), None if x_t is None else x_t.reshape(rows)
        batch = x.shape[0]
        tokens = ((getattr(self, f"{name}0"), getattr(self, name)) for name in PREFIX_TOKENS)
        prefix = [(t0.expand(batch, -1, -1), dt.expand(batch, -1, -1)) for t0, dt in tokens if t0 is not None]
        if pos is not None and self.no_embed_class:  # position embedding on patches only, then prepend
            x, x_t = x + pos[0], add_tangents(x_t, pos[1])
        if prefix:
            x = torch.cat([p[0].to(x.dtype) for p in prefix] + [x], dim=1)
            x_t = torch.cat([p[1].to(x_t.dtype) for p in prefix] + [x_t], dim=1)
        if pos is not None and not self.no_embed_class:
            x, x_t = x + pos[0], add_tangents(x_t, pos[1])
        x, x_t = dropout_pair(x, x_t, self.pos_drop_p, self.training)
        x, x_t = self._patch_dropout(x, x_t)
        return self.norm_pre(x, x_t)

    def _patch_dropout(self, x: Tensor, x_t: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """timm's patch dropout with one random token subset for both streams (run side by side)."""
        if x_t is None or not self.training or isinstance(self.patch_drop, nn.Identity):
            return self.patch_drop(x), x_t
        kept, kept_t = self.patch_drop(torch.cat([x, x_t], dim=-1)).chunk(2, dim=-1)
        return (kept if x.requires_grad else kept.detach()), kept_t  # the primal half does not depend on x_t

    def _pool(self, x: Tensor, x_t: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``VisionTransformer.pool`` on both streams."""
        if self.attn_pool is None:
            pool_type = self.pool.keywords["pool_type"]
            if x_t is None or pool_type in LINEAR_POOLS:
                return self.pool(x), None if x_t is None else self.pool(x_t)
            return _max_pool_pair(x, x_t, pool_type, 0 if self.pool_include_prefix else self.num_prefix_tokens)
        if not self.pool_include_prefix:
            x, x_t = x[:, self.num_prefix_tokens:], None if x_t is None else x_t[:, self.num_prefix_tokens:]
        return self.attn_pool(x, x_t)

    def _head(self, x: Tensor, x_t: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``VisionTransformer.forward_head`` (or DeiT distilled's) on both streams."""
        if self.head_dist is None:
            x, x_t = self._pool(x, x_t)
            x, x_t = self.fc_norm(x, x_t)
            x, x_t = dropout_pair(x, x_t, self.head_drop_p, self.training)
            return self.head(x, x_t)
        logits = []
        for token, head in enumerate((self.head, self.head_dist)):  # class token, distillation token
            pair = dropout_pair(x[:, token], None if x_t is None else x_t[:, token], self.head_drop_p, self.training)
            logits.append(head(*pair))
        (y, y_t), (y_dist, y_dist_t) = logits
        y_t = add_tangents(y_t, y_dist_t)
        return (y + y_dist) / 2, None if y_t is None else y_t / 2

    def forward_dual(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Both streams: ``(f(x; w0), J f(x; w0) · dw)``."""
        self._check_images(images)
        x, x_t = self._embed(images)
        for block in self.blocks.values():
            x, x_t = block(x, x_t)
        x, x_t = self.norm(x, x_t)
        y, y_t = self._head(x, x_t)
        return y, (torch.zeros_like(y) if y_t is None else y_t)

    def forward(self, images: Tensor) -> Tensor:
        """``f(x; w0) + J f(x; w0) · dw``, summed in at least float32."""
        y, y_t = self.forward_dual(images)
        dtype = torch.promote_types(y.dtype, torch.float32)
        return y.to(dtype) + y_t.to(dtype)


def linearize(model: nn.Module, blocks="all", *, backend: str = "auto", reinit: bool = False,
              fresh_cls_token: bool = False) -> LinearizedViT:  # fmt: skip
    """Linearize a timm ``VisionTransformer`` around its current weights.

    ``blocks``: ``"all"`` (embeddings, every block, final norm and head) or ``k`` (the last ``k``
    blocks plus the final norm and head, as TAFT-k; the rest runs frozen). ``reinit``: re-initialise
    the linearized blocks' weights ``w0`` (timm's ViT initialisation) before linearizing them.
    ``fresh_cls_token``: with ``k`` blocks, add a trainable tangent (zero at first) at the class
    token's position of the first linearized block's input, under the name ``cls_token``.
    ``backend`` is passed to every op. The original model is not modified; the frozen weights
    share its storage.
    """
    return LinearizedViT(model, blocks, backend=backend, reinit=reinit, fresh_cls_token=fresh_cls_token)
