"""The deploy form's residual FFN, x + relu(x W1^T + b1) W2^T + b2 on (M, C) token rows, three ways, interleaved in
one process (session 17): oneDNN's linear op twice (what :class:`~uniform_vit.layers.conv.PointwiseConv2d` runs,
and ``ResidualFFN`` without the kernel), MKL's ``addmm`` twice, and the C++ ``residual_ffn`` op.

    python benchmarks/scripts/ffn_kernel.py --rounds 15

Shapes: the token rows of uniform_t / m / l's three stages at batch 16, 224 px, hidden 2C, 1 thread. The whole-model
A/B is ``deploy_variants.py --variants ffn-onednn``.
"""

from __future__ import annotations

import argparse

import torch

from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers import cpu_kernels
from uniform_vit.utils.malloc import tune_allocator

SHAPES = [(3136, 64), (784, 128), (256, 192), (3136, 128), (784, 240), (256, 320), (3136, 192), (784, 288),
          (256, 384)]  # (B*H*W tokens at batch 16, C) of uniform_t / m / l's three stages


def onednn(x, w1, b1, w2, b2):
    h = torch.ops.mkldnn._linear_pointwise(x, w1, b1, 'none', [], '').relu_()
    return x + torch.ops.mkldnn._linear_pointwise(h, w2, b2, 'none', [], '')


def mkl(x, w1, b1, w2, b2):
    return torch.addmm(b2, torch.addmm(b1, x, w1.t()).relu_(), w2.t()).add_(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rounds', type=int, default=15)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    op = cpu_kernels.residual_ffn()
    if op is None:
        raise SystemExit(f'the C++ kernels are {cpu_kernels.status()}')
    print(f'residual FFN, GFLOP/s (median of {args.rounds} interleaved rounds of 3 calls), 1 thread '
          f'({torch.backends.cpu.get_cpu_capability()})')
    with torch.inference_mode():
        for m, c in SHAPES:
            g = torch.Generator().manual_seed(m + c)
            x = torch.randn(m, c, generator=g)
            w1, b1 = torch.randn(2 * c, c, generator=g) / c ** 0.5, torch.randn(2 * c, generator=g)
            w2, b2 = torch.randn(c, 2 * c, generator=g) / (2 * c) ** 0.5, torch.randn(c, generator=g)
            args_ = (x, w1, b1, w2, b2)
            fns = {'oneDNN': lambda a=args_: onednn(*a), 'MKL': lambda a=args_: mkl(*a),
                   'C++ op': lambda a=(x, w1.t().contiguous(), b1, w2.t().contiguous(), b2): op(*a)}
            err = (fns['C++ op']() - fns['oneDNN']()).abs().max().item()
            times = interleaved_timing(fns, rounds=args.rounds, warmup=2, inner=3)
            flops = 4 * m * c * 2 * c
            rates = '  '.join(f'{k} {flops / median(t) / 1e9:5.1f}' for k, t in times.items())
            print(f'  M {m:5d} C {c:3d}: {rates}   C++/oneDNN {paired_ratio(times["C++ op"], times["oneDNN"]):.2f}x'
                  f'   max |diff| {err:.1e}')


if __name__ == '__main__':
    main()
