"""The tiled Reuse core with its C++ kernel (``layers/cpu_kernels.py``, ``layers/csrc/reuse_core.cpp``) against its
ATen path (one BLAS call per tile and product), in one process: channel-major and token-major q/k/v, with and
without a bias, and multi-head fused SDPA for scale. The arms are forced through ``attention.CPU_KERNEL``.

    python benchmarks/scripts/reuse_cpu_kernel.py --tokens 784,3136 --channels 64,128,256 --rounds 7

One thread (``--threads``), batch 1, 4 heads, Cq = C / 4, interleaved rounds with one untimed call before each
timed one (the harness of ``uniform-vit bench-attn``); prints ms, paired speed-ups and the peak memory of each arm
(the profiler's count; with more threads it may miss the other threads' slices of the map).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import uniform_vit.layers.attention as attention
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.bench.machine import peak_memory_bytes
from uniform_vit.layers.attention import reuse_attention
from uniform_vit.layers.cpu_kernels import status
from uniform_vit.utils.malloc import tune_allocator


def tiled(q, k, v, bias, kernel: bool) -> torch.Tensor:
    attention.CPU_KERNEL = kernel
    try:
        return reuse_attention(q, k, v, bias, 0.25, 'tiled')
    finally:
        attention.CPU_KERNEL = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokens', default='784,3136')
    ap.add_argument('--channels', default='64,128,256')
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--bias', action='store_true', help='with an (N, N) bias, as a whole-map layer has')
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args()
    tune_allocator()  # as the CLI does
    torch.set_num_threads(args.threads)
    print(f'C++ kernel: {status()}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, '
          f'{args.threads} thread(s), '
          f'bias {args.bias}', flush=True)
    g = torch.Generator().manual_seed(0)
    for n in map(int, args.tokens.split(',')):
        for c in map(int, args.channels.split(',')):
            measure(n, c, args.rounds, args.bias, g)


def measure(n: int, c: int, rounds: int, with_bias: bool, g: torch.Generator) -> None:
    cm = tuple(torch.randn(1, w, n, generator=g) for w in (c // 4, c // 4, c))  # channel-major
    tm = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in cm)  # the same values, token-major
    bias = torch.randn(n, n, generator=g) if with_bias else None
    qm, km, vm = (torch.randn(1, 4, n, c // 4, generator=g) for _ in range(3))
    fns = {'kernel cm': lambda: tiled(*cm, bias, True), 'aten cm': lambda: tiled(*cm, bias, False),
           'kernel tm': lambda: tiled(*tm, bias, True), 'aten tm': lambda: tiled(*tm, bias, False),
           'sdpa_mha': lambda: F.scaled_dot_product_attention(qm, km, vm)}
    with torch.no_grad():
        ref = reuse_attention(*cm, bias, 0.25, 'eager')
        for name in ('kernel cm', 'aten cm', 'kernel tm', 'aten tm'):
            err = (fns[name]() - ref).abs().max().item()
            assert err < 1e-5, f'{name}: max abs diff {err:.2e} from eager'
        mem = {name: peak_memory_bytes(fn) / 2**20 for name, fn in fns.items()}
        t = interleaved_timing(fns, rounds=rounds, warmup=1, rewarm=1)
    cells = '  '.join(f"{name} {median(x) * 1e3:.2f} ms ({paired_ratio(x, t['sdpa_mha']):.2f}x SDPA, "
                      f"{mem[name]:.2f} MiB)" for name, x in t.items() if name != 'sdpa_mha')
    print(f"N {n:5d} C {c:3d}: {cells}  sdpa {median(t['sdpa_mha']) * 1e3:.2f} ms ({mem['sdpa_mha']:.2f} MiB); "
          f"kernel vs aten: cm {paired_ratio(t['kernel cm'], t['aten cm']):.2f}x, "
          f"tm {paired_ratio(t['kernel tm'], t['aten tm']):.2f}x", flush=True)


if __name__ == '__main__':
    main()
