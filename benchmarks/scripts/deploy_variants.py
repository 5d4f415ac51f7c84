"""Whole-model A/B of candidate changes to UniForm's deploy form (session 6's did not pay), kept so the
measurement can be repeated when PyTorch or oneDNN change.

    python benchmarks/scripts/deploy_variants.py --model uniform_t --rounds 15

Each variant is the shipped deploy form (``reparameterize``, traced, 1 thread, batch 16, 224 px) with one change,
timed interleaved against the shipped form and against a second copy of it (the A/A control, which shows the noise
floor of the run); every copy carries the same weights, and the script checks the outputs agree. Variants:

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
"""

from __future__ import annotations

import argparse
import copy
import types

import timm
import torch
import torch.nn as nn

import uniform_vit  # noqa: F401  (registers uniform_*)
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers.conv import FFN, PointwiseConv2d, Residual
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.models.uniform import DeployStem, PatchMerging, _to_channels_last

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
    return torch.cat([part(p) for p in x.tensor_split(stem.chunks)])


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


def apply(model: nn.Module, variant: str) -> nn.Module:
    """A copy of the deploy-form ``model`` with ``variant`` patched in (method overrides on its instances)."""
    model = copy.deepcopy(model)
    stem = model.patch_embed
    if variant == 'postops-ffn':
        for m in model.modules():
            if isinstance(m, Residual) and isinstance(m.m, FFN):
                m.forward = types.MethodType(_ffn_postops, m)
    elif variant == 'postops-pm':
        for m in model.modules():
            if isinstance(m, PatchMerging):
                m.forward = types.MethodType(_pm_postops, m)
    elif variant == 'postops-stem':
        stem.forward = types.MethodType(_stem_postops, stem)
    elif variant == 'stem-nchw-conv1':
        stem[0].weight.data = stem[0].weight.data.contiguous()
        stem.forward = types.MethodType(_stem_nchw_conv1, stem)
    elif variant == 'stem-one-transpose':
        stem.forward = types.MethodType(_stem_one_transpose, stem)
    elif variant == 'conv1x1':
        for m in model.modules():
            if isinstance(m, PointwiseConv2d):
                m.forward = types.MethodType(nn.Conv2d.forward, m)
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model


VARIANTS = ('postops-ffn', 'postops-pm', 'postops-stem', 'stem-nchw-conv1', 'stem-one-transpose', 'conv1x1')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='uniform_t')
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--batch-size', type=int, default=16)
    args = ap.parse_args()
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
