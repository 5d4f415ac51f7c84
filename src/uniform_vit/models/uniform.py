"""UniForm: Reuse Attention for efficient transformers on resource-constrained edge devices.

Paper: Yeom & Kim, "UniForm: A Reuse Attention Mechanism for Efficient Transformers on Resource-Constrained Edge
Devices", arXiv 2412.02344. Official code: https://github.com/seulkiyeom/mixtransform (``MixViT``).

A three-stage hierarchical network on EfficientViT-M's skeleton::

    stem (4 x Conv3x3 s2 + BN, ReLU between)                 (B, E0, H/16, W/16)
    stage 0: depth[0] x Block                                 (B, E0, H/16, W/16)
    stage 1: Downsample -> depth[1] x Block                   (B, E1, H/32, W/32)
    stage 2: Downsample -> depth[2] x Block                   (B, E2, H/64, W/64)
    head: global average pool -> BatchNorm1d -> Linear

    Block      = Res(DW3x3) -> Res(FFN) -> Res(WindowAttention(ReuseAttention)) -> Res(DW3x3) -> Res(FFN)
    Downsample = Res(DW3x3) -> Res(FFN) -> PatchMerging -> Res(DW3x3) -> Res(FFN)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SqueezeExcite, trunc_normal_
from timm.layers.activations import Sigmoid as TimmSigmoid
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import conv as conv_mod
from ..layers import cpu_kernels
from ..layers.attention import WindowAttention, create_attention
from ..layers.conv import FFN, BNLinear, ConvNorm, PointwiseConv2d, Residual, deploy_op_may_run, kernel_layout
from ..layers.fuse import fuse_children, fuse_inplace

__all__ = ['UniForm', 'UniFormConfig']


@dataclass(frozen=True)
class UniFormConfig:
    """What a UniForm variant is. Key dim 16, 7x7 windows and value kernels (1, 3, 5, 7) for every variant."""

    embed_dim: tuple[int, int, int] = (64, 128, 192)  # channels E of the three stages
    depth: tuple[int, int, int] = (1, 2, 2)  # sandwich blocks per stage
    num_heads: tuple[int, int, int] = (4, 4, 4)  # value groups (heads) sharing one attention map
    key_dim: int = 16  # sets the softmax scale 16^-0.5
    window_size: int = 7
    kernels: tuple[int, ...] = field(default=(1, 3, 5, 7))  # depthwise kernel of head i's value
    mlp_ratio: float = 2.0


VARIANTS: dict[str, UniFormConfig] = {
    'uniform_t': UniFormConfig((64, 128, 192), (1, 2, 2), (4, 4, 4)),
    'uniform_s': UniFormConfig((128, 144, 192), (1, 2, 2), (4, 4, 4)),
    'uniform_m': UniFormConfig((128, 240, 320), (1, 2, 3), (4, 3, 4)),
    'uniform_l': UniFormConfig((192, 288, 384), (1, 2, 3), (3, 3, 4)),
}


class Stem(nn.Sequential):
    """16x patch embedding: 4 x (Conv3x3 stride 2 + BN), ReLU between; E/8 -> E/4 -> E/2 -> E channels."""

    def __init__(self, in_chans: int, dim: int):
        chs = [in_chans, dim // 8, dim // 4, dim // 2, dim]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(ConvNorm(chs[i], chs[i + 1], 3, stride=2, padding=1))
            if i < 3:
                layers.append(nn.ReLU())
        super().__init__(*layers)

    def fuse(self) -> nn.Module:
        # same children in the same slots (so the same state-dict keys); ReLUs in place on fresh conv outputs
        return DeployStem(*(nn.ReLU(inplace=True) if isinstance(m, nn.ReLU) else m for m in fuse_children(self)))


class DeployStem(conv_mod.KernelLayoutOwner, nn.Sequential):
    """Fused stem that switches the network to channels-last: oneDNN's convolutions work natively on (B, H, W, C)
    memory (its NCHW path reorders around every conv: the FFNs' 1x1 convs measured 3-5x slower on CPU, the 3-channel
    first conv 1.5x), and every deploy block downstream keeps that layout (convs preserve it; attention reads it as
    tokens). Same children and state-dict keys as :class:`Stem`.

    On x86 CPUs where this library's C++ kernels are built (:mod:`uniform_vit.layers.cpu_kernels`), the first conv
    and its ReLU run as one op that reads the NCHW image and writes the channels-last map (``stem_conv``; 8, 16 or
    24 output channels, float32, no gradient): oneDNN ran that conv at 8-25 GFLOP/s on an AVX2 CPU, behind a copy of
    the image to channels-last and ahead of a ReLU pass over the largest map of the network (benchmarks/RESULTS.md,
    section 1, session 17). ``stem_kernel = False`` (or ``UNIFORM_VIT_CPU_KERNELS=0``) keeps ATen's ops.

    On CPU a batch of two or more images goes through in ``chunks`` parts (``Tensor.tensor_split``: a jit trace
    stays valid at every batch size; one traced at batch 1 just never splits): each part's input copy and large early
    feature maps stay in cache for the next conv. Two parts made the fused, traced uniform_t about 3 % and uniform_s
    about 5 % faster at batch 16 on one thread (interleaved A/B against A/A controls), 7-14 % at batch 64; four or
    eight parts gained less then, with ATen's convs (benchmarks/RESULTS.md, session 6). Same outputs up to float
    rounding (oneDNN may pick other kernels for the smaller batches). On CPUs with AVX-512 the default is now four
    parts: with the C++ ops they made uniform_s/m/l 1-3 % faster than two on a Zen 5 EPYC and uniform_t about 1 %
    (session 29). A batch with fewer images than parts (empty parts) still comes out channels-last.

    The C++ 3x3 stride-2 conv (``conv3x3_s2``) takes the later layers up to ``conv_kernel_max_out`` outputs (16 by
    default: on an AVX2 Zen 3 oneDNN was as fast or faster for wider ones). Where the ops are built for AVX-512 it
    takes every later layer: on a Zen 5 EPYC, once the op split each row of output pixels into register blocks of
    equal size (session 30), all three convs through it made uniform_s 1.9-2.0 %, uniform_m 0.8 % and uniform_l
    0.7-1.0 % faster than the session-29 rule (up to 64 outputs with whole 16-float input vectors), which uniform_t
    meets anyway (benchmarks/RESULTS.md, section 1)."""

    chunks: int | None = None  # None: 4 on AVX-512 CPUs, else 2
    stem_kernel = True
    conv_kernel = True
    conv_kernel_max_out: int | None = None  # None: 16, or any width with AVX-512; a number: that width, any ISA

    def batch_chunks(self) -> int:
        """How many parts a CPU batch goes through in (``chunks``, or the ISA's default)."""
        return self.chunks if self.chunks is not None else 4 if _avx512() else 2

    def _conv_op_width(self, conv: nn.Conv2d) -> bool:
        """Whether the C++ 3x3 op should take this layer, by its widths (see the class doc)."""
        if self.conv_kernel_max_out is not None:
            return conv.out_channels <= self.conv_kernel_max_out
        return conv.out_channels <= 16 or _avx512()

    def _first_layer_op(self, x: torch.Tensor):
        """The C++ first conv + ReLU, or None where it does not apply."""
        conv = self[0]
        if not (self.stem_kernel and len(self) > 1 and isinstance(self[1], nn.ReLU) and type(conv) is nn.Conv2d
                and conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
                and conv.out_channels in cpu_kernels.STEM_CHANNELS
                and deploy_op_may_run(x, conv.weight, channels_last=False)):
            return None
        return cpu_kernels.stem_conv()

    def _conv_op(self, conv: nn.Module, x: torch.Tensor):
        """The C++ 3x3 stride-2 conv (+ ReLU) for a later layer, or None where it does not apply."""
        if not (self.conv_kernel and type(conv) is nn.Conv2d and self._conv_op_width(conv)
                and conv.kernel_size == (3, 3)
                and conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == 'zeros' and deploy_op_may_run(x, conv.weight)):
            return None
        return cpu_kernels.conv3x3_s2()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        layers, i = list(self), 0
        op = self._first_layer_op(x)
        if op is None:
            x = _to_channels_last(x)
        else:
            x, i = op(x, self[0].weight, self[0].bias, True), 2
        while i < len(layers):
            m = layers[i]
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            op = self._conv_op(m, x)
            if op is None:
                x, i = m(x), i + 1
                continue
            w = m.weight
            wt, = kernel_layout(m, (w,), lambda w=w: (w.permute(2, 3, 1, 0).contiguous(),))
            x, i = op(x, wt, m.bias, relu), i + (2 if relu else 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # an ONNX graph has no memory formats: the channels-last code paths downstream would only add Transpose
            # nodes, and onnxruntime picks its own blocked conv layout from plain NCHW
            return super().forward(x)
        chunks = self.batch_chunks()
        if chunks > 1 and x.device.type == 'cpu' and x.shape[0] > 1:
            # fewer images than parts leaves empty parts, whose (both-layouts) outputs would make torch.cat return
            # NCHW memory and send every layer downstream off its channels-last path: keep the layout explicitly
            # (no copy when the parts agree)
            out = torch.cat([self._run(part) for part in x.tensor_split(chunks)])
            return out.contiguous(memory_format=torch.channels_last)
        return self._run(x)


@functools.cache
def _avx512() -> bool:
    """True where PyTorch (and so this library's C++ ops, built for the same key) runs its AVX-512 code."""
    return torch.backends.cpu.get_cpu_capability() == 'AVX512'


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous(memory_format=torch.channels_last)``, faster for an NCHW image batch with 2-4 channels:
    PyTorch's generic permute-copy is slow for C = 3; stacking the C planes along a new last axis writes the same
    (B, H, W, C) memory and made the whole fused, traced uniform_t 1.064x faster at batch 16 on one thread
    (interleaved A/B, benchmarks/RESULTS.md). The copy is still ~17 % of that call: it is DRAM-bound."""
    if x.device.type == 'cpu' and 2 <= x.shape[1] <= 4 and x.is_contiguous() and not torch.jit.is_scripting():
        return torch.stack(x.unbind(1), dim=-1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


class PatchMerging(nn.Module):
    """Conv1x1+BN (E -> 4E) -> ReLU -> DWConv3x3 s2 + BN -> ReLU -> Squeeze-Excite(1/4) -> Conv1x1+BN (4E -> E')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = dim * 4
        self.conv1 = ConvNorm(dim, hid, 1)
        self.act1 = nn.ReLU()
        self.conv2 = ConvNorm(hid, hid, 3, stride=2, padding=1, groups=hid)
        self.act2 = nn.ReLU()
        self.se = SqueezeExcite(hid, 0.25)
        self.conv3 = ConvNorm(hid, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))

    def fuse(self) -> nn.Module:
        fused = fuse_children(self)
        fused.__class__ = DeployPatchMerging  # the same module with the deploy forward (no state of its own)
        fused.act1, fused.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)  # on fresh conv outputs
        return fused


class DeployPatchMerging(conv_mod.KernelLayoutOwner, PatchMerging):
    """Fused patch merging (same children and state-dict keys). On x86 CPUs where this library's C++ kernels are
    built (:mod:`uniform_vit.layers.cpu_kernels`), the expansion, its ReLU, the stride-2 depthwise conv and its ReLU
    run as one op (``expand_dw``) on channels-last float32 maps without gradients: the expansion's rows are made as
    the depthwise conv needs them and never go out to memory as the network's widest map (4x the channels at full
    resolution). The squeeze-excite then runs on the map's token rows: a mean over tokens, its two 1x1 convs as
    matrix products of the (B, 4E) means, and the gate as one broadcast multiply. As 1x1 convs and a multiply of 1x1
    maps timm's module took 2.5-3x as long on an AVX2 CPU, most of it fixed cost per call (benchmarks/RESULTS.md,
    section 1, session 18). ``expand_kernel = False`` (or ``UNIFORM_VIT_CPU_KERNELS=0``) keeps the separate
    layers."""

    expand_kernel = True

    def _kernel_op(self, x: torch.Tensor):
        c1, c2 = self.conv1, self.conv2
        if not (self.expand_kernel and isinstance(c1, PointwiseConv2d) and isinstance(self.act1, nn.ReLU)
                and isinstance(self.act2, nn.ReLU) and c1.bias is not None and c2.bias is not None
                and c2.kernel_size == (3, 3) and c2.stride == (2, 2) and c2.padding == (1, 1)
                and c2.dilation == (1, 1) and c2.groups == c2.in_channels == c2.out_channels == c1.out_channels
                and deploy_op_may_run(x, c1.weight, c2.weight)):
            return None
        return cpu_kernels.expand_dw()

    def _squeeze_excite(self, y: torch.Tensor) -> torch.Tensor:
        """timm's ``SqueezeExcite`` (ReLU, no norm, sigmoid gate) on a channels-last map, as products on its means."""
        se = self.se
        if not (isinstance(se, SqueezeExcite) and isinstance(se.bn, nn.Identity) and isinstance(se.act, nn.ReLU)
                and isinstance(se.gate, (nn.Sigmoid, TimmSigmoid)) and not se.add_maxpool):
            return se(y)
        s = F.linear(y.mean((2, 3)), se.fc1.weight.flatten(1), se.fc1.bias).relu_()
        s = torch.sigmoid(F.linear(s, se.fc2.weight.flatten(1), se.fc2.bias))
        return y * s[:, :, None, None]  # keeps y's channels-last memory; no views, so no size arithmetic in a trace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self._kernel_op(x)
        if op is None:
            return super().forward(x)
        w1, w2, packed = self.conv1.weight, self.conv2.weight, conv_mod.PACK_WEIGHTS
        w1t, wdw = kernel_layout(self, (w1, w2), lambda: (conv_mod.kernel_matrix(w1, packed),
                                                          w2[:, 0].permute(1, 2, 0).contiguous()), tag=packed)
        return self.conv3(self._squeeze_excite(op(x, w1t, self.conv1.bias, wdw, self.conv2.bias, packed)))

    def fuse(self) -> nn.Module:
        return self  # already the deploy form


def _dw_ffn(dim: int, mlp_ratio: float, dw_bn_init: float, dpr: float) -> list[nn.Module]:
    return [Residual(ConvNorm(dim, dim, 3, padding=1, groups=dim, bn_weight_init=dw_bn_init), dpr),
            Residual(FFN(dim, int(dim * mlp_ratio)), dpr)]


class Block(nn.Sequential):
    """The DWConv-FFN-attention-DWConv-FFN sandwich, every part residual."""

    def __init__(self, dim: int, num_heads: int, cfg: UniFormConfig, attn_type: str = 'reuse', drop_path: float = 0.0,
                 attn_kwargs: dict | None = None):
        attn = create_attention(attn_type, dim, num_heads, key_dim=cfg.key_dim, window_size=cfg.window_size,
                                kernels=cfg.kernels, **(attn_kwargs or {}))
        super().__init__(
            *_dw_ffn(dim, cfg.mlp_ratio, 0.0, drop_path),
            Residual(WindowAttention(attn, cfg.window_size), drop_path),
            *_dw_ffn(dim, cfg.mlp_ratio, 0.0, drop_path),
        )

    def fuse(self) -> nn.Module:
        return fuse_children(self)


class Downsample(nn.Sequential):
    def __init__(self, dim: int, out_dim: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__(*_dw_ffn(dim, mlp_ratio, 1.0, drop_path), PatchMerging(dim, out_dim),
                         *_dw_ffn(out_dim, mlp_ratio, 1.0, drop_path))

    def fuse(self) -> nn.Module:
        return fuse_children(self)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, cfg: UniFormConfig, attn_type: str,
                 dprs: Sequence[float], downsample: bool, attn_kwargs: dict | None = None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim, cfg.mlp_ratio) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, num_heads, cfg, attn_type, dprs[i], attn_kwargs)
                                      for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class UniForm(nn.Module):
    """UniForm network; follows timm's model contract (features, heads, intermediates, fuse)."""

    def __init__(self, cfg: UniFormConfig = UniFormConfig(), in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = 'avg', drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn_type: str = 'reuse', attn_kwargs: dict | None = None, img_size: int | Sequence[int] = 224,
                 deploy: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"UniForm got unexpected arguments: {sorted(kwargs)}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.attn_type = attn_type
        self.img_size = img_size  # informational: any size >= 32 px (non-square too) runs
        self.grad_checkpointing = False

        self.patch_embed = Stem(in_chans, cfg.embed_dim[0])
        dpr = torch.linspace(0, drop_path_rate, sum(cfg.depth)).tolist()
        stages, self.feature_info = [], []
        prev, stride, start = cfg.embed_dim[0], 16, 0
        for i, (dim, depth, heads) in enumerate(zip(cfg.embed_dim, cfg.depth, cfg.num_heads)):
            if i > 0:
                stride *= 2
            stage = Stage(prev, dim, depth, heads, cfg, attn_type, dpr[start:start + depth], i > 0, attn_kwargs)
            stages.append(stage)
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f'stages.{i}'))
            prev, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cfg.embed_dim[-1]
        self.head = BNLinear(self.num_features, num_classes, drop_rate) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if deploy:
            self._deploy_inplace()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _deploy_inplace(self) -> None:
        """Build directly in deploy form (Apple MobileOne's constructor flag), so fused checkpoints load."""
        self.eval()
        fuse_inplace(self)

    # ---- timm contract ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if 'attention_biases' in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^patch_embed', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear if isinstance(self.head, BNLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        p = next(self.parameters())
        head = BNLinear(self.num_features, num_classes, self.drop_rate) if num_classes > 0 else nn.Identity()
        self.head = head.to(device=p.device, dtype=p.dtype)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """Features after each stage (NCHW), optionally with the final unpooled features."""
        if output_fmt != 'NCHW':
            raise ValueError('UniForm only supports output_fmt="NCHW"')
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.patch_embed(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))  # (B, E2, H/64, W/64)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- timm registration ------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (4, 4),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'patch_embed.0.c', 'classifier': 'head.linear', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2412.02344', 'paper_name': 'UniForm: A Reuse Attention Mechanism for Efficient '
        'Transformers on Resource-Constrained Edge Devices', 'origin_url': 'https://github.com/seulkiyeom/mixtransform',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create_uniform(variant: str, pretrained: bool = False, **kwargs) -> UniForm:
    if pretrained:
        raise RuntimeError(f"no pretrained ImageNet weights are published for {variant}; load your own with "
                           "uniform_vit.load_checkpoint (pretrained_cfg_overlay=dict(file=...) also works)")
    out_indices = kwargs.pop('out_indices', (0, 1, 2))
    return build_model_with_cfg(
        UniForm, variant, pretrained, cfg=VARIANTS[variant],
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)


@register_model
def uniform_t(pretrained: bool = False, **kwargs) -> UniForm:
    return _create_uniform('uniform_t', pretrained, **kwargs)


@register_model
def uniform_s(pretrained: bool = False, **kwargs) -> UniForm:
    return _create_uniform('uniform_s', pretrained, **kwargs)


@register_model
def uniform_m(pretrained: bool = False, **kwargs) -> UniForm:
    return _create_uniform('uniform_m', pretrained, **kwargs)


@register_model
def uniform_l(pretrained: bool = False, **kwargs) -> UniForm:
    return _create_uniform('uniform_l', pretrained, **kwargs)
