"""The tiled Reuse core with channel-major values on ``torch.mm`` (MKL; the GEMM policy on Intel CPUs): output
written channel-major, ``v @ at^T`` into (C, T) column blocks, against token-major, ``at @ v^T`` (the only form
before session 13), which reads the values as a transposed operand; token-major values and multi-head fused SDPA
for scale. Both arms are forced (``attention.CHANNEL_OUT``); the shipped rule picks channel-major only for rows a
multiple of 4 KiB apart from N = 2048.

    python benchmarks/scripts/reuse_value_layout.py --tokens 784,1024,3136,4096 --rounds 7

One thread, batch 1, 4 heads, Cq = C / 4, no bias, C = 64 / 128 / 256, interleaved rounds with one untimed call
before each timed one (the harness of ``uniform-vit bench-attn``); prints ms and paired speed-ups.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import uniform_vit.layers.attention as attention
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers.attention import reuse_attention
from uniform_vit.layers.gemm import gemm_backend
from uniform_vit.utils.malloc import tune_allocator


def tiled(q, k, v, channel_out: bool) -> torch.Tensor:
    attention.CHANNEL_OUT = channel_out
    try:
        with gemm_backend('mkl'):
            return reuse_attention(q, k, v, None, 0.25, 'tiled')
    finally:
        attention.CHANNEL_OUT = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokens', default='784,1024,3136,4096')
    ap.add_argument('--channels', default='64,128,256')
    ap.add_argument('--rounds', type=int, default=7)
    args = ap.parse_args()
    tune_allocator()  # as the CLI does
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for n in map(int, args.tokens.split(',')):
        for c in map(int, args.channels.split(',')):
            measure(n, c, args.rounds, g)


def measure(n: int, c: int, rounds: int, g: torch.Generator) -> None:
    q, k = (torch.randn(1, c // 4, n, generator=g) for _ in range(2))
    v = torch.randn(1, c, n, generator=g)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # token-major copies
    qm, km, vm = (torch.randn(1, 4, n, c // 4, generator=g) for _ in range(3))
    fns = {'channel-major out': lambda: tiled(q, k, v, True),
           'token-major out (before)': lambda: tiled(q, k, v, False),
           'token-major q/k/v': lambda: tiled(qt, kt, vt, True),
           'sdpa_mha': lambda: F.scaled_dot_product_attention(qm, km, vm)}
    with torch.no_grad():
        assert torch.allclose(fns['channel-major out'](), fns['token-major out (before)'](), atol=1e-5)
        t = interleaved_timing(fns, rounds=rounds, warmup=1, rewarm=1)
    cells = '  '.join(f"{name} {median(x) * 1e3:.2f} ms ({paired_ratio(x, t['sdpa_mha']):.2f}x SDPA)"
                      for name, x in t.items() if name != 'sdpa_mha')
    print(f"N {n:5d} C {c:3d}: {cells}  sdpa {median(t['sdpa_mha']) * 1e3:.2f} ms; channel-major vs token-major out "
          f"{paired_ratio(t['channel-major out'], t['token-major out (before)']):.3f}x", flush=True)


if __name__ == '__main__':
    main()
