"""Whole-model A/B of candidate changes to UniForm's deploy form (session 6's did not pay), kept so the
measurement can be repeated when PyTorch or oneDNN change.

    python benchmarks/scripts/deploy_variants.py --model uniform_t --rounds 15

Each variant (``a+b``: several at once) is the shipped deploy form (``reparameterize``, traced, 1 thread, batch
16, 224 px) with one change, timed interleaved against the shipped form and against a second copy of it (the A/A
control, which shows the noise floor of the run); every copy carries the same weights, and the script checks the
outputs agree. Variants:

* ``postops-ffn``: each residual FFN as two oneDNN convolutions with fused post-ops (``mkldnn._convolution_pointwise``:
  ReLU after the first, the residual add after the second) instead of conv, ReLU, conv, add. The op takes a
  ``Scalar?[]`` argument that ``torch.jit.trace`` cannot record, so it is called through a TorchScript function.
* ``postops-pm``: the same for patch merging's expansion and depthwise conv (each with its ReLU).
* ``postops-stem``: the same for the three stem convs followed by a ReLU.
* ``stem-nchw-conv1``: the stem's first conv on the NCHW image (oneDNN's first-layer path), its 8-channel output
  then turned channels-last, instead of turning the 3-channel image channels-last first.
* ``stem-one-transpose``: the image turned channels-last once for the whole batch, then split in two.
* ``conv1x1``: every 1x1 conv through ``conv2d`` (the deploy form before session 10) instead of
  :class:`~uniform_vit.layers.conv.PointwiseConv2d`'s oneDNN matmul.
* ``mkl1x1``: every 1x1 conv as MKL's ``addmm`` on the channels-last token matrix (session 16, an AVX2 CPU).
* ``linear-relu``: the FFN's ReLU fused into its first oneDNN matmul (the linear op's 'relu' post-op).
* ``linear-relu-add``: that, and the residual add fused into the second matmul (the op's binary 'add' form).
* ``stem-contiguous``: the image turned channels-last by ``contiguous()`` instead of stacking its planes.
* ``stem-nchw-wcl``: the first stem conv on the NCHW image with a channels-last weight (no separate copy).
* ``pm-chunks2``, ``pm-chunks4``: patch merging's expansion and depthwise conv in 2 / 4 batch chunks.
* ``stem-aten``: the stem's first conv and ReLU without the C++ ``stem_conv`` op: on a channels-last copy of the
  image, through what ``DeployStem`` picks for a later layer (since session 18 the ``conv3x3_s2`` op for 16 output
  channels or fewer, else oneDNN; before session 17 it was oneDNN alone). A speed-up below 1 is what the op buys.
* ``dw-aten``: every depthwise conv through ATen (oneDNN) instead of the C++ ``depthwise_conv`` op (session 17).
* ``ffn-onednn``: every residual FFN as two oneDNN matmuls, a ReLU and an add instead of the C++ ``residual_ffn``
  op (session 17).
* ``pw-onednn``: every 1x1 conv through oneDNN's matmul (the deploy form before session 18) instead of the C++
  ``pointwise_conv`` op.
* ``stem3x3-aten``: the stem's second to fourth convs (3x3, stride 2) and their ReLUs as ATen ops (oneDNN) instead
  of the C++ ``conv3x3_s2`` op (session 18).
* ``stem3x3-all``: the C++ ``conv3x3_s2`` op for every stem conv after the first, not only those with at most
  ``DeployStem``'s width rule (16 outputs; on AVX-512 since session 30 every width, so there this is the shipped
  form).
* ``stem3x3-max16``, ``stem3x3-maxN``: the same op only for stem convs with at most 16 (N) output channels.
* ``stem-chunks1``, ``stem-chunks2``, ``stem-chunks4``, ``stem-chunks8``, ``stem-chunks16``: the deploy stem on the
  whole batch at once / in 2, 4, 8 or 16 parts instead of the ISA's default (2; 4 on AVX-512 since session 29; 16
  at batch 16 is one image at a time, whose first conv's 8-channel output, 0.4 MB, fits a 1 MB L2).
* ``pm-separate``: patch merging's expansion, ReLU, stride-2 depthwise conv and ReLU as separate layers instead of
  the C++ ``expand_dw`` op (session 18).
* ``se-timm``: patch merging's squeeze-excite as timm's module (1x1 convs and a multiply on 1x1 maps) instead of
  matrix products on the (B, C) means and one broadcast multiply over the token rows (session 18).
* ``dw-slices-aten``: depthwise convs whose input is a channel slice of a channels-last map (attention's queries)
  through ATen, as before session 18, instead of the C++ op reading the slice in place.
* ``dw-full-taps``: depthwise convs walk their whole kernel, the zero-padded taps of the merged value conv too (as
  before session 18), instead of each channel block's own tap radius.
* ``unpacked``: the C++ products (1x1 convs, FFNs, patch merging's expansion) read plain transposed weights instead
  of ``pack_panels``' column panels (session 18).
* ``token-views``: the C++ 1x1 conv and FFN ops called on the (B*H*W, C) token rows of each channels-last map
  (permute, reshape, then view and permute back), attention's output viewed with sizes read from the input, and
  patch merging's squeeze-excite on token rows: the deploy form before session 31, whose trace held twice the graph
  nodes (size arithmetic), instead of the ops taking the map itself.
* ``attn-separate``: attention's projection ReLU and its block's residual add as separate ops, the deploy form
  before session 31, instead of in the C++ core's and the 1x1 conv's stores.
* ``attn-eager``: Reuse Attention on UniForm's 7x7 windows as batched ATen products (``impl='eager'``), the deploy
  form before session 31, instead of the C++ core.
* ``prepacked1x1``: every 1x1 conv's oneDNN matmul on a weight reordered once into oneDNN's blocked layout
  (``mkldnn._reorder_linear_weight``, kept as an mkldnn buffer, which a trace accepts) instead of the plain (O, C)
  weight that the matmul packs again on every call (session 17).
"""

from __future__ import annotations

import argparse
import copy
import types

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import uniform_vit  # noqa: F401  (registers uniform_*)
import uniform_vit.layers.conv as conv_mod
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers.attention import ReuseAttentionDeploy, reuse_attention
from uniform_vit.layers.conv import (
    FFN,
    DepthwiseConv2d,
    PointwiseConv2d,
    Residual,
    ResidualFFN,
    SameConv2d,
    _pointwise_traceable,
)
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.models.uniform import DeployPatchMerging, DeployStem, PatchMerging, _to_channels_last
from uniform_vit.utils.malloc import tune_allocator

Scalars = list[int | float | complex | None]  # TorchScript's spelling of the op's Scalar?[]


@torch.jit.script
def conv_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: list[int], stride: list[int],
              groups: int) -> torch.Tensor:
    none: Scalars = []
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, [1, 1], groups, 'relu', none, '')


@torch.jit.script
def conv_add(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    none: Scalars = []
    return torch.ops.mkldnn._convolution_pointwise(x, other, w, b, [0, 0], [1, 1], [1, 1], 1, 'add', None, None,
                                                   none, None)


def _cr(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv_relu(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), conv.groups)


def _ffn_postops(self: Residual, x: torch.Tensor) -> torch.Tensor:
    return conv_add(_cr(self.m.pw1, x), x, self.m.pw2.weight, self.m.pw2.bias)


def _pm_postops(self: PatchMerging, x: torch.Tensor) -> torch.Tensor:
    return self.conv3(self.se(_cr(self.conv2, _cr(self.conv1, x))))


def _in_parts(stem: DeployStem, x: torch.Tensor, part) -> torch.Tensor:
    """``part`` on each of the deploy stem's batch chunks, concatenated (as ``DeployStem.forward`` does)."""
    return torch.cat([part(p) for p in x.tensor_split(stem.batch_chunks())])


def _stem_postops(self: DeployStem, x: torch.Tensor) -> torch.Tensor:
    convs = [m for m in self if isinstance(m, nn.Conv2d)]

    def part(p: torch.Tensor) -> torch.Tensor:
        p = _to_channels_last(p)
        for c in convs[:-1]:
            p = _cr(c, p)
        return convs[-1](p)

    return _in_parts(self, x, part)


def _stem_nchw_conv1(self: DeployStem, x: torch.Tensor) -> torch.Tensor:
    # the first conv and its ReLU on the NCHW image, the rest on channels-last (plain Sequentials: a slice of the
    # DeployStem would be a DeployStem, splitting and converting again)
    head, tail = nn.Sequential(*list(self)[:2]), nn.Sequential(*list(self)[2:])
    return _in_parts(self, x, lambda p: tail(head(p).contiguous(memory_format=torch.channels_last)))


def _stem_one_transpose(self: DeployStem, x: torch.Tensor) -> torch.Tensor:
    return _in_parts(self, _to_channels_last(x), lambda p: nn.Sequential.forward(self, p))


@torch.jit.script
def linear_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    B, C, H, W = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1).reshape(B * H * W, C), w, b, 'relu', [], '')
    return y.view(B, H, W, w.shape[0]).permute(0, 3, 1, 2)


@torch.jit.script
def linear_add(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    B, C, H, W = x.shape
    o = other.permute(0, 2, 3, 1).reshape(B * H * W, other.shape[1])
    y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1).reshape(B * H * W, C), o, w, b, 'add')
    return y.view(B, H, W, w.shape[0]).permute(0, 3, 1, 2)


def _w2d(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.view(conv.out_channels, conv.in_channels)


def _ffn_linear_relu(self: Residual, x: torch.Tensor) -> torch.Tensor:
    return x + self.m.pw2(linear_relu(x, _w2d(self.m.pw1), self.m.pw1.bias))


def _ffn_linear_relu_add(self: Residual, x: torch.Tensor) -> torch.Tensor:
    return linear_add(linear_relu(x, _w2d(self.m.pw1), self.m.pw1.bias), x, _w2d(self.m.pw2), self.m.pw2.bias)


def _mkl_1x1(self: PointwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    if not self._onednn_ok(x):
        return nn.Conv2d.forward(self, x)
    B, C, H, W = x.shape
    t = x.permute(0, 2, 3, 1).reshape(B * H * W, C)
    y = torch.addmm(self.bias, t, _w2d(self).t()) if self.bias is not None else torch.mm(t, _w2d(self).t())
    return y.view(B, H, W, -1).permute(0, 3, 1, 2)


def _stem_contiguous(self: DeployStem, x: torch.Tensor) -> torch.Tensor:
    return _in_parts(self, x, lambda p: nn.Sequential.forward(self, p.contiguous(memory_format=torch.channels_last)))


def _stem_nchw_wcl(self: DeployStem, x: torch.Tensor) -> torch.Tensor:
    c0, tail = self[0], nn.Sequential(*list(self)[1:])
    w = c0.weight.contiguous(memory_format=torch.channels_last)  # a channels-last weight makes the output one
    return _in_parts(self, x, lambda p: tail(F.conv2d(p, w, c0.bias, c0.stride, c0.padding)))


def _dw_aten(self: DepthwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    return SameConv2d.forward(self, x) if self.stride == (1, 1) else nn.Conv2d.forward(self, x)


@torch.jit.script
def linear_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    none: Scalars = []
    return torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', none, '')


def _prepacked_1x1(self: PointwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    if not self._onednn_ok(x):
        return nn.Conv2d.forward(self, x)
    B, C, H, W = x.shape
    if not hasattr(self, 'packed'):  # the first (eager) call packs for its row count; the trace keeps the buffer
        self.register_buffer('packed', torch.ops.mkldnn._reorder_linear_weight(_w2d(self).detach(), B * H * W),
                             persistent=False)
    y = linear_packed(x.permute(0, 2, 3, 1).reshape(B * H * W, C), self.packed, self.bias)
    return y.view(B, H, W, -1).permute(0, 3, 1, 2)


def _dw_slices_aten(self: DepthwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous(memory_format=torch.channels_last):
        return DepthwiseConv2d.forward(self, x)
    return _dw_aten(self, x)


def _pw_onednn(self: PointwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    if not self._onednn_ok(x):
        return nn.Conv2d.forward(self, x)
    return _pointwise_traceable()(x, _w2d(self), self.bias)  # scripted: a trace records it


def _pm_chunks(k: int):
    def forward(self: PatchMerging, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.act2(self.conv2(self.act1(self.conv1(p)))) for p in x.tensor_split(k)])
        return self.conv3(self.se(h))

    return forward


class _Unpacked(nn.Module):
    """Runs (and so traces) the model with the C++ products on plain transposed weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        old, conv_mod.PACK_WEIGHTS = conv_mod.PACK_WEIGHTS, False
        try:
            return self.model(x)
        finally:
            conv_mod.PACK_WEIGHTS = old


def _pw_token_views(self: PointwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    op = self._kernel_op(x)
    if op is None:
        return PointwiseConv2d.forward(self, x)
    wt, = conv_mod.kernel_layout(self, (self.weight,), lambda: (conv_mod.kernel_matrix(self.weight, True),), tag=True)
    return conv_mod._on_token_rows(x, lambda t: op(t, wt, self.bias, False, True))


def _ffn_token_views(self: ResidualFFN, x: torch.Tensor) -> torch.Tensor:
    op = self._kernel_op(x)
    if op is None:
        return ResidualFFN.forward(self, x)
    w1t, w2t = self._weights(True)
    return conv_mod._on_token_rows(x, lambda t: op(t, w1t, self.m.pw1.bias, w2t, self.m.pw2.bias, True))


def _attn_shape_views(self: ReuseAttentionDeploy, x: torch.Tensor, residual=None) -> torch.Tensor:
    B, C, H, W = x.shape
    q, k = self.qk(x).split([self.qk_dim, self.qk_dim], dim=1)
    q = self.q_dw(q)
    v = self.v_conv(x)
    out = reuse_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.rel_bias(H, W)[0], self.scale, self.impl,
                          relu=True)
    return self.proj[1](out.view(B, C, H, W), residual)


def _attn_separate(self: ReuseAttentionDeploy, x: torch.Tensor, residual=None) -> torch.Tensor:
    q, k = self.qk(x).split([self.qk_dim, self.qk_dim], dim=1)
    q = self.q_dw(q)
    v = self.v_conv(x)
    out = reuse_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.rel_bias(x.shape[2], x.shape[3])[0],
                          self.scale, self.impl)
    out = self.proj(out.view_as(x))
    return out if residual is None else out + residual


def _se_token_views(self: DeployPatchMerging, y: torch.Tensor) -> torch.Tensor:
    se = self.se
    B, C, H, W = y.shape
    t = y.permute(0, 2, 3, 1).reshape(B, H * W, C)
    s = F.linear(t.mean(1), se.fc1.weight.flatten(1), se.fc1.bias).relu_()
    s = torch.sigmoid(F.linear(s, se.fc2.weight.flatten(1), se.fc2.bias))
    return (t * s[:, None]).view(B, H, W, C).permute(0, 3, 1, 2)


def _patch(model: nn.Module, cls: type | tuple, fn, name: str = 'forward') -> None:
    """Bind ``fn`` as method ``name`` on every ``cls`` module of ``model`` (an instance override of its class's). A
    1x1 conv's replacement forward(x) also takes the residual that attention's projection may pass (added after)."""
    if name == 'forward' and cls is PointwiseConv2d:
        inner = fn

        def fn(self, x, residual=None):  # noqa: F811
            y = inner(self, x)
            return y if residual is None else y + residual

    for m in model.modules():
        if isinstance(m, cls):
            setattr(m, name, types.MethodType(fn, m))


def _ffn_residuals(model: nn.Module) -> list[Residual]:
    return [m for m in model.modules() if isinstance(m, Residual) and isinstance(m.m, FFN)]


def apply(model: nn.Module, variant: str) -> nn.Module:
    """A copy of the deploy-form ``model`` with ``variant`` patched in (method overrides on its instances);
    ``a+b`` applies both."""
    if '+' in variant:
        # 'unpacked' wraps the model, so it goes last: the others patch the network's own modules
        for v in sorted(variant.split('+'), key=lambda v: v == 'unpacked'):
            model = apply(model, v)
        return model
    model = copy.deepcopy(model)
    stem = model.patch_embed
    if variant == 'postops-ffn':
        for m in _ffn_residuals(model):
            m.forward = types.MethodType(_ffn_postops, m)
    elif variant == 'postops-pm':
        _patch(model, PatchMerging, _pm_postops)
    elif variant == 'postops-stem':
        stem.forward = types.MethodType(_stem_postops, stem)
    elif variant == 'stem-nchw-conv1':
        stem[0].weight.data = stem[0].weight.data.contiguous()
        stem.forward = types.MethodType(_stem_nchw_conv1, stem)
    elif variant == 'stem-one-transpose':
        stem.forward = types.MethodType(_stem_one_transpose, stem)
    elif variant == 'conv1x1':
        _patch(model, PointwiseConv2d, nn.Conv2d.forward)
    elif variant == 'mkl1x1':
        _patch(model, PointwiseConv2d, _mkl_1x1)
    elif variant in ('linear-relu', 'linear-relu-add'):
        fn = _ffn_linear_relu if variant == 'linear-relu' else _ffn_linear_relu_add
        for m in _ffn_residuals(model):
            m.forward = types.MethodType(fn, m)
    elif variant == 'stem-contiguous':
        stem.forward = types.MethodType(_stem_contiguous, stem)
    elif variant == 'stem-nchw-wcl':
        stem.forward = types.MethodType(_stem_nchw_wcl, stem)
    elif variant in ('pm-chunks2', 'pm-chunks4'):
        _patch(model, PatchMerging, _pm_chunks(int(variant[-1])))
    elif variant == 'stem-aten':
        stem.stem_kernel = False
    elif variant == 'ffn-onednn':
        _patch(model, ResidualFFN, Residual.forward)
    elif variant == 'prepacked1x1':
        _patch(model, PointwiseConv2d, _prepacked_1x1)
    elif variant == 'pw-onednn':
        _patch(model, PointwiseConv2d, _pw_onednn)
    elif variant == 'pm-separate':
        for m in model.modules():
            if isinstance(m, PatchMerging):
                m.expand_kernel = False
    elif variant == 'dw-slices-aten':
        _patch(model, DepthwiseConv2d, _dw_slices_aten)
    elif variant == 'unpacked':
        return _Unpacked(model)
    elif variant == 'dw-full-taps':
        _patch(model, DepthwiseConv2d, lambda self: (DepthwiseConv2d._kernel_args(self)[0], None), '_kernel_args')
    elif variant == 'se-timm':
        _patch(model, DeployPatchMerging, lambda self, y: self.se(y), '_squeeze_excite')
    elif variant == 'stem3x3-aten':
        stem.conv_kernel = False
    elif variant == 'stem3x3-all':
        stem.conv_kernel_max_out = 1 << 30
    elif variant in ('stem-chunks1', 'stem-chunks2', 'stem-chunks4', 'stem-chunks8', 'stem-chunks16'):
        stem.chunks = int(variant[len('stem-chunks'):])
    elif variant.startswith('stem3x3-max') and variant[len('stem3x3-max'):].isdigit():
        stem.conv_kernel_max_out = int(variant[len('stem3x3-max'):])
    elif variant == 'dw-aten':
        _patch(model, DepthwiseConv2d, _dw_aten)
    elif variant == 'token-views':
        _patch(model, PointwiseConv2d, _pw_token_views)
        _patch(model, ResidualFFN, _ffn_token_views)
        _patch(model, ReuseAttentionDeploy, _attn_shape_views)
        _patch(model, DeployPatchMerging, _se_token_views, '_squeeze_excite')
    elif variant == 'attn-separate':
        _patch(model, ReuseAttentionDeploy, _attn_separate)
    elif variant == 'attn-eager':
        for m in model.modules():
            if isinstance(m, ReuseAttentionDeploy):
                m.impl = 'eager'

    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model


VARIANTS = ('postops-ffn', 'postops-pm', 'postops-stem', 'stem-nchw-conv1', 'stem-one-transpose', 'conv1x1', 'mkl1x1',
            'linear-relu', 'linear-relu-add', 'stem-contiguous', 'stem-nchw-wcl', 'pm-chunks2', 'pm-chunks4',
            'stem-aten', 'dw-aten', 'prepacked1x1', 'ffn-onednn', 'pw-onednn', 'stem3x3-aten',
            'stem3x3-all', 'pm-separate', 'se-timm', 'dw-slices-aten',
            'dw-full-taps', 'stem3x3-max16', 'stem-chunks1', 'stem-chunks2', 'stem-chunks4', 'stem-chunks8',
            'stem-chunks16', 'token-views', 'attn-eager', 'attn-separate',
            'unpacked')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='uniform_t')
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--batch-size', type=int, default=16)
    args = ap.parse_args()
    tune_allocator()  # as every uniform-vit command does
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, 3, 224, 224)
    base = reparameterize(timm.create_model(args.model).eval())
    models = {'shipped': base, 'shipped (A/A)': copy.deepcopy(base)}
    models.update({v: apply(base, v) for v in args.variants.split(',')})
    with torch.inference_mode():
        traced = {}
        for name, m in models.items():
            m(x)  # one eager call first, as the bench does
            traced[name] = torch.jit.trace(m, x, check_trace=False)
        ref = traced['shipped'](x)
        diffs = {name: (t(x) - ref).abs().max().item() for name, t in traced.items()}
        times = interleaved_timing({k: (lambda t=t: t(x)) for k, t in traced.items()}, rounds=args.rounds, warmup=2,
                                   rewarm=1)
    print(f'{args.model}, batch {args.batch_size}, 1 thread, traced deploy form, {args.rounds} interleaved rounds')
    for name in traced:
        print(f'{name:22s} {median(times[name]) * 1e3:7.2f} ms   speed-up over shipped '
              f'{paired_ratio(times[name], times["shipped"]):.3f}   max |diff| {diffs[name]:.1e}')


if __name__ == '__main__':
    main()
