"""Cross-layer attention reuse (TReX) for timm ViT/DeiT and UniForm, built by swapping attention modules.

TReX (Moitra et al., arXiv 2408.12742) lets chosen layers reuse an earlier layer's attention. Two modes:

``'attn'`` (map reuse)
    The layer keeps its value path and output projection but has no Q/K parameters, no QK^T and no softmax: it
    applies the attention map of its source layer (the nearest earlier layer that computes its own attention) to
    its OWN values. timm: ``softmax(q_s k_s^T) @ v_l`` per head; UniForm: the source's one shared (N, N) map per
    window applied to every head's depthwise-conv values (so UniForm reuses across heads AND across layers).
``'output'`` (block-output reuse)
    The layer computes nothing from its input: it returns ``T(out_s)``, the source's attention-block output (after
    its projection, before the residual add) through a small learned transform ``T`` initialised to identity:
    ``'channel'`` = per-channel scale and shift (C + C parameters, ~free on any hardware) or ``'linear'`` = a C x C
    pointwise map plus bias (as costly as one projection, more expressive).

The map (or output) travels from the source to its reusers through an :class:`AttentionBus` shared by the converted
modules of one model: the source writes it during the forward pass, the last reuser takes it out again, so no
tensor outlives the forward. Tracing (``torch.jit.trace``) records this as ordinary data flow. Gradient
checkpointing is not supported on converted models (a recomputed segment would not see the bus).

For UniForm, maps are per 7x7 window, so a layer can reuse only within its stage (same window grid and width).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..layers.attention import (
    MultiHeadAttention,
    ReuseAttention,
    WindowAttention,
    apply_map,
    merge_value_convs,
    reuse_attention,
    reuse_map,
)
from ..layers.conv import ConvNorm
from ..layers.fuse import fuse_children

MODES = ('attn', 'output')
TRANSFORMS = ('channel', 'linear')


class AttentionBus:
    """Hands maps/outputs from a source layer to the layers that reuse them, within one forward pass.

    Deep copies share the bus (``__deepcopy__`` returns it): the fuse path deep-copies blocks one at a time, which
    would otherwise give source and reuser different buses. Storage is thread-local, so copies of one converted
    model may run in different threads.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def store(self) -> dict[tuple[int, str], torch.Tensor]:
        if not hasattr(self._local, 'store'):
            self._local.store = {}
        return self._local.store

    def __deepcopy__(self, memo: dict) -> AttentionBus:
        return self

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def put(self, layer: int, kind: str, value: torch.Tensor) -> None:
        self.store[(layer, kind)] = value

    def take(self, layer: int, kind: str, last: bool) -> torch.Tensor:
        try:
            value = self.store[(layer, kind)]
        except KeyError:
            raise RuntimeError(f"no attention {kind} of layer {layer} on the bus: the source layer did not run "
                               "before its reuser in this forward pass") from None
        if last:
            del self.store[(layer, kind)]
        return value


class _BusMixin:
    """Where a converted layer reads from / writes to."""

    bus: AttentionBus
    layer: int  # this layer's index
    shares: frozenset[str]  # what this layer publishes: {'map', 'output'}

    def _publish(self, kind: str, value: torch.Tensor) -> None:
        if kind in self.shares:
            self.bus.put(self.layer, kind, value)


# ---------------------------------------------------------------------------------------------------------------
# timm VisionTransformer attention


def _timm_attention_cls() -> type[nn.Module]:
    from timm.models.vision_transformer import Attention

    return Attention


def _take_submodules(dst: nn.Module, src: nn.Module, names: Sequence[str]) -> None:
    """Share ``src``'s submodules under the same names (older timm lacks ``norm``/``gate``: Identity / None)."""
    for name in names:
        mod = getattr(src, name, None)
        setattr(dst, name, nn.Identity() if mod is None and name != 'gate' else mod)


class TimmSourceAttention(_BusMixin, nn.Module):
    """timm ``Attention`` that also publishes its per-head map (B, h, N, N) and/or its output (B, N, C).

    Same submodule names as timm's class, so state-dict keys do not change. Publishing the map needs it explicitly,
    so that path does not use the fused SDPA kernel.
    """

    def __init__(self, attn: nn.Module, bus: AttentionBus, layer: int, shares: frozenset[str]):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale, self.fused_attn = attn.scale, attn.fused_attn
        _take_submodules(self, attn, ('qkv', 'q_norm', 'k_norm', 'attn_drop', 'norm', 'gate', 'proj', 'proj_drop'))
        self.bus, self.layer, self.shares = bus, layer, shares

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError('TReX reuse is implemented for bidirectional (non-causal) ViT attention only')
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, h, N, d) each
        if 'map' in self.shares or not self.fused_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = attn.softmax(dim=-1)  # (B, h, N, N): the map later layers reuse
            self._publish('map', attn)
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        self._publish('output', x)
        return x


class TimmReuseAttention(nn.Module):
    """A timm attention layer that borrows its source's maps: value projection + output projection only."""

    def __init__(self, attn: nn.Module, bus: AttentionBus, source: int, last: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        w = attn.qkv.weight  # rows: [q (attn_dim), k (attn_dim), v (attn_dim)]
        self.v = nn.Linear(w.shape[1], self.attn_dim, bias=attn.qkv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.v.weight.copy_(w[2 * self.attn_dim:])
            if attn.qkv.bias is not None:
                self.v.bias.copy_(attn.qkv.bias[2 * self.attn_dim:])
        _take_submodules(self, attn, ('attn_drop', 'norm', 'gate', 'proj', 'proj_drop'))
        self.bus, self.source, self.last = bus, source, last

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        attn = self.bus.take(self.source, 'map', self.last)  # (B, h, N, N), masked already by the source
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# ---------------------------------------------------------------------------------------------------------------
# UniForm attention (runs on one window: x is (B*windows, C, h, w))


class _UniformValues(nn.Module):
    """Per-head depthwise value convs over channel slices (train form) or one merged conv (deploy form)."""

    v_convs: nn.ModuleList
    splits: list[int]

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.v_convs) == 1:
            return self.v_convs[0](x)
        return torch.cat([conv(xi) for conv, xi in zip(self.v_convs, x.split(self.splits, dim=1))], dim=1)

    def _fuse_values(self, new: _UniformValues) -> None:
        new.v_convs = nn.ModuleList([merge_value_convs(list(self.v_convs))])
        new.splits = [sum(self.splits)]


class UniformSourceAttention(_BusMixin, _UniformValues):
    """UniForm Reuse Attention that publishes its shared map (B, N, N) and/or its output (B, C, h, w)."""

    def __init__(self, attn: ReuseAttention, bus: AttentionBus, layer: int, shares: frozenset[str]):
        super().__init__()
        self.dim, self.qk_dim, self.scale = attn.dim, attn.qk_dim, attn.scale
        self.impl = getattr(attn, 'impl', 'eager')
        self.splits, self.kernels = list(attn.splits), tuple(attn.kernels)
        self.qk, self.q_dw, self.v_convs, self.proj, self.rel_bias = attn.qk, attn.q_dw, attn.v_convs, attn.proj, \
            attn.rel_bias
        self.bus, self.layer, self.shares = bus, layer, shares

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k = self.qk(x).split([self.qk_dim, self.qk_dim], dim=1)  # (B, C/4, H, W) x 2
        q, k = self.q_dw(q).flatten(2), k.flatten(2)
        v = self._values(x).flatten(2)  # (B, C, N)
        bias = self.rel_bias(H, W)[0]  # (N, N)
        if 'map' in self.shares:
            attn = reuse_map(q, k, bias, self.scale)
            self._publish('map', attn)  # (B, N, N): the ONE map of this window
            out = apply_map(attn, v)  # in v's layout: a channels-last network stays channels-last
        else:
            out = reuse_attention(q, k, v, bias, self.scale, self.impl)
        out = self.proj(out.view(B, C, H, W))
        self._publish('output', out)
        return out

    @torch.no_grad()
    def fuse(self) -> UniformSourceAttention:
        new = copy.copy(self)  # shallow: keeps bus/layer/shares; submodules replaced below
        new._modules = dict(self._modules)
        new.qk, new.q_dw, new.proj = self.qk.fuse(), self.q_dw.fuse(), fuse_children(self.proj)
        new.rel_bias = copy.deepcopy(self.rel_bias)
        self._fuse_values(new)
        return new


class UniformReuseAttention(_UniformValues):
    """UniForm attention layer that borrows its source's shared map: value convs + output projection only."""

    def __init__(self, attn: ReuseAttention, bus: AttentionBus, source: int, last: bool):
        super().__init__()
        self.dim = attn.dim
        self.splits, self.kernels = list(attn.splits), tuple(attn.kernels)
        self.v_convs, self.proj = attn.v_convs, attn.proj
        self.bus, self.source, self.last = bus, source, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        attn = self.bus.take(self.source, 'map', self.last)  # (B, N, N), bias included by the source
        out = apply_map(attn, self._values(x).flatten(2))  # (B, C, N): every head, one matmul, in v's layout
        return self.proj(out.view(B, C, H, W))

    @torch.no_grad()
    def fuse(self) -> UniformReuseAttention:
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.proj = fuse_children(self.proj)
        self._fuse_values(new)
        return new


class UniformMHASourceAttention(_BusMixin, nn.Module):
    """UniForm's multi-head ablation attention that publishes its per-head maps (B, h, N, N) and/or output."""

    def __init__(self, attn: MultiHeadAttention, bus: AttentionBus, layer: int, shares: frozenset[str]):
        super().__init__()
        self.dim, self.num_heads, self.key_dim, self.v_dim, self.scale = \
            attn.dim, attn.num_heads, attn.key_dim, attn.v_dim, attn.scale
        self.qkv, self.proj, self.rel_bias = attn.qkv, attn.proj, attn.rel_bias
        self.bus, self.layer, self.shares = bus, layer, shares

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N, h = H * W, self.num_heads
        q, k, v = self.qkv(x).view(B, h, -1, N).split([self.key_dim, self.key_dim, self.v_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale + self.rel_bias(H, W)).softmax(dim=-1)  # (B, h, N, N)
        self._publish('map', attn)
        out = self.proj((v @ attn.transpose(-2, -1)).reshape(B, C, H, W))
        self._publish('output', out)
        return out

    def fuse(self) -> UniformMHASourceAttention:
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.qkv, new.proj, new.rel_bias = self.qkv.fuse(), fuse_children(self.proj), copy.deepcopy(self.rel_bias)
        return new


class UniformMHAReuseAttention(nn.Module):
    """Multi-head UniForm layer borrowing its source's per-head maps: the V rows of qkv + output projection."""

    def __init__(self, attn: MultiHeadAttention, bus: AttentionBus, source: int, last: bool):
        super().__init__()
        self.dim, self.num_heads, self.v_dim = attn.dim, attn.num_heads, attn.v_dim
        kd, vd, h = attn.key_dim, attn.v_dim, attn.num_heads
        # qkv output channels are laid out per head as [q (kd), k (kd), v (vd)]; keep only the v rows
        idx = torch.cat([torch.arange(i * (2 * kd + vd) + 2 * kd, (i + 1) * (2 * kd + vd)) for i in range(h)])
        src = attn.qkv
        self.v = ConvNorm(src.c.in_channels, h * vd)
        self.v.to(device=src.c.weight.device, dtype=src.c.weight.dtype)
        with torch.no_grad():
            self.v.c.weight.copy_(src.c.weight[idx])
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(self.v.bn, name).copy_(getattr(src.bn, name)[idx])
            self.v.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)
        self.proj = attn.proj
        self.bus, self.source, self.last = bus, source, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        attn = self.bus.take(self.source, 'map', self.last)  # (B, h, N, N)
        v = self.v(x).view(B, self.num_heads, self.v_dim, H * W)
        return self.proj((v @ attn.transpose(-2, -1)).reshape(B, C, H, W))

    def fuse(self) -> nn.Module:
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.v, new.proj = self.v.fuse(), fuse_children(self.proj)
        return new


# ---------------------------------------------------------------------------------------------------------------
# block-output reuse (both families)


class OutputReuse(nn.Module):
    """Returns ``T(source output)`` and ignores its own input. ``T`` starts as the identity.

    ``transform='channel'``: y = out * scale + shift, per channel (2C parameters).
    ``transform='linear'``: y = W out + b with a C x C matrix W (C^2 + C parameters).
    ``channel_dim`` is -1 for token tensors (B, N, C) and 1 for feature maps (B, C, h, w).
    """

    def __init__(self, dim: int, bus: AttentionBus, source: int, last: bool, transform: str = 'channel',
                 channel_dim: int = -1, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if transform not in TRANSFORMS:
            raise UserError(f"unknown output transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
        self.transform, self.channel_dim = transform, channel_dim
        if transform == 'channel':
            self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
            self.shift = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        else:
            self.weight = nn.Parameter(torch.eye(dim, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.bus, self.source, self.last = bus, source, last

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        y = self.bus.take(self.source, 'output', self.last)
        if self.transform == 'channel':
            shape = [1] * y.dim()
            shape[self.channel_dim] = -1
            return y * self.scale.view(shape) + self.shift.view(shape)
        if self.channel_dim == -1:
            return F.linear(y, self.weight, self.bias)
        return F.conv2d(y, self.weight[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return f"source={self.source}, transform={self.transform!r}"


# ---------------------------------------------------------------------------------------------------------------
# finding the attention layers, validating and applying a plan


@dataclass
class AttnLayer:
    """One attention layer of a model, in forward order."""

    index: int
    name: str  # qualified module name, e.g. 'blocks.3.attn' or 'stages.1.blocks.0.2.m.attn'
    parent: nn.Module
    attr: str
    module: nn.Module
    stage: int  # UniForm stage (windows/width shared inside); 0 for plain ViTs
    family: str  # 'timm' | 'uniform' | 'uniform_mha'


_CONVERTED = (TimmSourceAttention, TimmReuseAttention, UniformSourceAttention, UniformReuseAttention,
              UniformMHASourceAttention, UniformMHAReuseAttention, OutputReuse)


def attention_layers(model: nn.Module) -> list[AttnLayer]:
    """The model's attention layers in forward order; UserError for models TReX cannot convert."""
    from ..models.uniform import UniForm

    if any(isinstance(m, _CONVERTED) for m in model.modules()):
        raise UserError('this model already has cross-layer reuse applied; convert the original model instead')
    layers: list[AttnLayer] = []
    if isinstance(model, UniForm):
        for si, stage in enumerate(model.stages):
            for bi, block in enumerate(stage.blocks):
                wa = block[2].m
                if not isinstance(wa, WindowAttention):
                    raise UserError(f"stages.{si}.blocks.{bi}: expected a windowed attention at block[2]")
                attn, name = wa.attn, f'stages.{si}.blocks.{bi}.2.m.attn'
                if isinstance(attn, ReuseAttention):
                    family = 'uniform'
                elif isinstance(attn, MultiHeadAttention):
                    family = 'uniform_mha'
                else:
                    raise UserError(f"{name} is {type(attn).__name__}; TReX converts the train form "
                                    "(ReuseAttention / MultiHeadAttention): convert first, then fuse")
                layers.append(AttnLayer(len(layers), name, wa, 'attn', attn, si, family))
        return layers
    Attention = _timm_attention_cls()
    blocks = getattr(model, 'blocks', None)
    if isinstance(blocks, nn.Sequential):
        for i, blk in enumerate(blocks):
            attn = getattr(blk, 'attn', None)
            if type(attn) is not Attention:  # subclasses (rope, talking heads, ...) compute attention differently
                raise UserError(f"blocks.{i}.attn is {type(attn).__name__}; TReX supports timm "
                                "VisionTransformer/DeiT attention and UniForm")
            layers.append(AttnLayer(i, f'blocks.{i}.attn', blk, 'attn', attn, 0, 'timm'))
        if layers:
            return layers
    raise UserError(f"{type(model).__name__} is not supported: TReX converts timm VisionTransformer/DeiT models "
                    "and UniForm")


def resolve_plan(layers: Sequence[AttnLayer], reuse: Sequence[int] | Mapping[int, int]) -> dict[int, int]:
    """Plan -> {reusing layer: source layer}, checked.

    ``reuse`` is a list of layer indices (each takes the nearest earlier layer that computes its own attention) or
    an explicit ``{layer: source}`` mapping.
    """
    n = len(layers)

    def check_index(i: object, what: str) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"{what} {i!r} is not a layer index (whole number)")
        if not 0 <= i < n:
            raise UserError(f"{what} {i} is out of range: the model has {n} attention layers (0-{n - 1})")
        return i

    if isinstance(reuse, Mapping):
        plan = {check_index(k, 'layer'): check_index(v, 'source') for k, v in reuse.items()}
    else:
        idx = [check_index(i, 'layer') for i in reuse]
        if len(set(idx)) != len(idx):
            raise UserError(f"layer list {list(reuse)} repeats a layer")
        chosen, plan = set(idx), {}
        for i in sorted(idx):
            src = next((j for j in range(i - 1, -1, -1) if j not in chosen), None)
            if src is None:
                raise UserError(f"layer {i} cannot reuse: no earlier layer computes attention"
                                + (' (layer 0 always computes its own)' if i == 0 else ''))
            plan[i] = src
    for i, src in sorted(plan.items()):
        if src >= i:
            raise UserError(f"layer {i} cannot reuse layer {src}: the source must be an earlier layer")
        if src in plan:
            raise UserError(f"layer {i} cannot reuse layer {src}: layer {src} reuses too; point it at a layer that "
                            "computes its own attention")
        if layers[i].stage != layers[src].stage:
            raise UserError(f"layer {i} (stage {layers[i].stage}) cannot reuse layer {src} (stage {layers[src].stage})"
                            ": UniForm attention maps are per window and only match within a stage")
    return plan


def apply_reuse(model: nn.Module, reuse: Sequence[int] | Mapping[int, int], mode: str | Mapping[int, str] = 'attn',
                transform: str = 'channel', inplace: bool = False) -> nn.Module:
    """Return ``model`` with the planned layers reusing earlier attention (a deep copy unless ``inplace``).

    Weights are kept: a reusing layer keeps its V (timm: the V rows of qkv) and output projection, and drops Q/K;
    ``mode`` ('attn' | 'output', or one per layer) picks map reuse or block-output reuse (see module docstring).
    The plan is recorded as ``model.trex_plan``.
    """
    if transform not in TRANSFORMS:
        raise UserError(f"unknown output transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = attention_layers(model)
    plan = resolve_plan(layers, reuse)
    modes = {i: (mode.get(i, 'attn') if isinstance(mode, Mapping) else mode) for i in plan}
    bad = sorted({m for m in modes.values() if m not in MODES})
    if bad:
        raise UserError(f"unknown reuse mode {bad[0]!r}; choose one of {', '.join(MODES)}")
    if isinstance(mode, Mapping) and set(mode) - set(plan):
        raise UserError(f"modes given for layers that do not reuse: {sorted(set(mode) - set(plan))}")
    bus = AttentionBus()
    shares: dict[int, set[str]] = {}
    for i, src in plan.items():
        shares.setdefault(src, set()).add('map' if modes[i] == 'attn' else 'output')
    last_reader = {}
    for i in sorted(plan):
        last_reader[(plan[i], modes[i])] = i
    for src, kinds in shares.items():
        L = layers[src]
        cls = {'timm': TimmSourceAttention, 'uniform': UniformSourceAttention,
               'uniform_mha': UniformMHASourceAttention}[L.family]
        setattr(L.parent, L.attr, cls(L.module, bus, src, frozenset(kinds)))
    for i, src in plan.items():
        L = layers[i]
        last = last_reader[(src, modes[i])] == i
        if modes[i] == 'output':
            p = next(L.module.parameters())
            dim = L.module.proj.out_features if L.family == 'timm' else L.module.dim
            new: nn.Module = OutputReuse(dim, bus, src, last, transform, -1 if L.family == 'timm' else 1,
                                         device=p.device, dtype=p.dtype)
        else:
            cls = {'timm': TimmReuseAttention, 'uniform': UniformReuseAttention,
                   'uniform_mha': UniformMHAReuseAttention}[L.family]
            new = cls(L.module, bus, src, last)
        setattr(L.parent, L.attr, new.train(L.module.training))
    model.trex_plan = {'reuse': {int(k): int(v) for k, v in sorted(plan.items())},
                       'mode': {int(k): v for k, v in sorted(modes.items())}, 'transform': transform}
    return model

