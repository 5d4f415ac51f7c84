"""The residual FFN as one C++ op (``ffn_kernel.cpp``, next to this file) against the deploy form's two oneDNN
matmuls, in isolation at UniForm's batch-16 shapes and inside the whole traced model (session 17: not adopted).

    python benchmarks/scripts/ffn_kernel.py --models uniform_t,uniform_m --rounds 15

Part 1 times x + relu(x W1^T + b1) W2^T + b2 on (M, C) token matrices three ways, interleaved: oneDNN's linear op
(what :class:`~uniform_vit.layers.conv.PointwiseConv2d` runs), MKL's ``addmm``, and the C++ op. Part 2 is a
whole-model A/B like ``deploy_variants.py``: the shipped deploy form, an A/A copy, and a copy whose residual FFNs call
the op (weights transposed once, up front), each traced, 1 thread, batch 16, 224 px.
"""

from __future__ import annotations

import argparse
import copy
import types
from pathlib import Path

import timm
import torch

import uniform_vit  # noqa: F401  (registers uniform_*)
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers.conv import FFN, Residual
from uniform_vit.layers.cpu_kernels import _ISA_FLAGS
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.utils.malloc import tune_allocator

SHAPES = [(3136, 64), (784, 128), (256, 192), (3136, 128), (784, 240), (256, 320), (3136, 192), (784, 288),
          (256, 384)]  # (B*H*W tokens at batch 16, C) of uniform_t / m / l's three stages; hidden 2C


def build() -> None:
    from torch.utils.cpp_extension import load

    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in _ISA_FLAGS:
        raise SystemExit(f'no build for the {isa} vector ISA')
    load(name=f'uniform_vit_ffn_bench_{isa.lower()}', sources=[str(Path(__file__).with_name('ffn_kernel.cpp'))],
         extra_cflags=['-O3', '-fopenmp', *_ISA_FLAGS[isa]], extra_ldflags=['-fopenmp'], is_python_module=False)


def onednn(x, w1, b1, w2, b2):
    h = torch.ops.mkldnn._linear_pointwise(x, w1, b1, 'none', [], '').relu_()
    return x + torch.ops.mkldnn._linear_pointwise(h, w2, b2, 'none', [], '')


def mkl(x, w1, b1, w2, b2):
    return torch.addmm(b2, torch.addmm(b1, x, w1.t()).relu_(), w2.t()).add_(x)


def isolated(rounds: int) -> None:
    print('part 1: one residual FFN, GFLOP/s (median of interleaved rounds), C++ op / oneDNN')
    for m, c in SHAPES:
        g = torch.Generator().manual_seed(m + c)
        x = torch.randn(m, c, generator=g)
        w1, b1 = torch.randn(2 * c, c, generator=g) / c ** 0.5, torch.randn(2 * c, generator=g)
        w2, b2 = torch.randn(c, 2 * c, generator=g) / (2 * c) ** 0.5, torch.randn(c, generator=g)
        w1t, w2t = w1.t().contiguous(), w2.t().contiguous()
        args = (x, w1, b1, w2, b2)
        fns = {'oneDNN': lambda a=args: onednn(*a), 'MKL': lambda a=args: mkl(*a),
               'C++ op': lambda a=(x, w1t, b1, w2t, b2): torch.ops.uniform_vit_ffn_bench.ffn(*a)}
        err = (fns['C++ op']() - fns['oneDNN']()).abs().max().item()
        times = interleaved_timing(fns, rounds=rounds, warmup=2, inner=3)
        flops = 4 * m * c * 2 * c
        rates = '  '.join(f'{k} {flops / median(t) / 1e9:5.1f}' for k, t in times.items())
        print(f'  M {m:5d} C {c:3d}: {rates}   C++/oneDNN {paired_ratio(times["C++ op"], times["oneDNN"]):.2f}x'
              f'   max |diff| {err:.1e}')


def _ffn_op(self: Residual, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    y = torch.ops.uniform_vit_ffn_bench.ffn(t, self.w1t, self.b1, self.w2t, self.b2)
    return y.view(b, h, w, c).permute(0, 3, 1, 2)


def with_ffn_op(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, Residual) and isinstance(m.m, FFN):
            pw1, pw2 = m.m.pw1, m.m.pw2
            m.w1t = pw1.weight.detach().view(pw1.out_channels, -1).t().contiguous()
            m.w2t = pw2.weight.detach().view(pw2.out_channels, -1).t().contiguous()
            m.b1, m.b2 = pw1.bias.detach(), pw2.bias.detach()
            m.forward = types.MethodType(_ffn_op, m)
    return model


def whole_model(name: str, rounds: int) -> None:
    model = timm.create_model(name).eval()
    for mod in model.modules():  # non-trivial BN statistics, so that the FFNs' second conv is not all zeros
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
    base = reparameterize(model)
    x = torch.randn(16, 3, 224, 224)
    models = {'shipped': base, 'shipped (A/A)': copy.deepcopy(base), 'FFN as one C++ op': with_ffn_op(base)}
    with torch.inference_mode():
        traced = {}
        for k, m in models.items():
            m(x)
            traced[k] = torch.jit.trace(m, x, check_trace=False)
        ref = traced['shipped'](x)
        diffs = {k: (t(x) - ref).abs().max().item() for k, t in traced.items()}
        times = interleaved_timing({k: (lambda t=t: t(x)) for k, t in traced.items()}, rounds=rounds, warmup=2,
                                   rewarm=1)
    print(f'part 2: {name}, batch 16, 1 thread, traced deploy form, {rounds} interleaved rounds')
    for k in traced:
        print(f'  {k:20s} {median(times[k]) * 1e3:7.2f} ms   speed-up over shipped '
              f'{paired_ratio(times[k], times["shipped"]):.3f}   max |diff| {diffs[k]:.1e}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', default='uniform_t,uniform_m')
    ap.add_argument('--rounds', type=int, default=15)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    build()
    with torch.inference_mode():
        isolated(args.rounds)
    for name in args.models.split(','):
        whole_model(name, args.rounds)


if __name__ == '__main__':
    main()
