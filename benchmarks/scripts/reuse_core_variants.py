"""Reuse core variants at one token count: our query-tiled core with its products through oneDNN (logits too, or
logits through MKL's addmm as before session 5) or all through ``torch.mm`` (MKL; ``uniform_vit.layers.gemm`` picks
one per CPU vendor), the same arithmetic as one compiled ``flex_attention`` call (Inductor's CPU flash template), and
multi-head fused SDPA (the issue's baseline); then the whole deploy layer with either GEMM backend.

    python benchmarks/scripts/reuse_core_variants.py --tokens 3136 --peak 250

One thread, batch 1, 4 heads, C = 64 / 128 / 256, interleaved rounds with one untimed call before each timed one
(the harness of ``uniform-vit bench-attn``); prints ms, GFLOP/s against the nominal 2.5 N^2 C, share of ``--peak``
(GFLOP/s; ``uniform-vit bench`` prints this machine's) and the paired speed-up over SDPA. Needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import uniform_vit.layers.attention as attention
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.hardware import cpu_vendor
from uniform_vit.layers.attention import reuse_attention
from uniform_vit.layers.gemm import gemm_backend, onednn_preferred


@contextlib.contextmanager
def logits_via_onednn(on: bool) -> Iterator[None]:
    """The tiled core's logits through oneDNN (the default) or MKL's addmm, for the duration of the block."""
    attention.ONEDNN_LOGITS = on
    try:
        yield
    finally:
        attention.ONEDNN_LOGITS = True


def compare(C: int, N: int, rounds: int, heads: int = 4) -> tuple[float, dict[str, list[float]]]:
    """(flex's max abs difference from eager, seconds per call of each candidate and round)."""
    scale = 16 ** -0.5
    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(0)
    # q/k token-major as a channels-last deploy layer makes them (the oneDNN-logits case), v channel-major (no copy)
    q, k = (torch.randn(1, N, C // 4, generator=g).transpose(1, 2) for _ in range(2))
    v = torch.randn(1, C, N, generator=g)
    qm, km, vm = (torch.randn(1, heads, N, C // heads, generator=g) for _ in range(3))
    # flex wants (B, heads, N, d): the shared map is one head with a C-wide value
    qf, kf, vf = (t.transpose(1, 2)[:, None].contiguous() for t in (q, k, v))

    def tiled(backend: str, onednn_logits: bool = True) -> torch.Tensor:
        with gemm_backend(backend), logits_via_onednn(onednn_logits):
            return reuse_attention(q, k, v, None, scale, 'tiled')

    with torch.no_grad():
        ref = reuse_attention(q, k, v, None, scale, 'eager')[0]
        diff = (flex(qf, kf, vf, scale=scale)[0, 0].T - ref).abs().max().item()
        fns = {'tiled_onednn': lambda: tiled('onednn'), 'tiled_mkl_logits': lambda: tiled('onednn', False),
               'tiled_mkl': lambda: tiled('mkl'),
               'flex': lambda: flex(qf, kf, vf, scale=scale),
               'sdpa_mha': lambda: F.scaled_dot_product_attention(qm, km, vm)}
        return diff, interleaved_timing(fns, rounds=rounds, warmup=2, rewarm=1)


def compare_layer(C: int, H: int, rounds: int) -> dict[str, list[float]]:
    """The whole deploy layer (bench-attn's ``reuse_fast``: channels-last, q/k sliced from one conv, relative
    position bias) on an H x H map, its products through oneDNN or MKL."""
    from uniform_vit.bench.attn import MECHANISMS

    layer = MECHANISMS['reuse_fast'].build(C, 4, H, H)
    x = torch.randn(1, C, H, H)

    def run(backend: str) -> torch.Tensor:
        with gemm_backend(backend):
            return layer(x)

    with torch.no_grad():
        return interleaved_timing({'onednn': lambda: run('onednn'), 'mkl': lambda: run('mkl')}, rounds=rounds,
                                  warmup=2, rewarm=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokens', type=int, default=3136)
    ap.add_argument('--peak', type=float, default=250.0, help='single-core matmul peak, GFLOP/s')
    ap.add_argument('--rounds', type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    N = args.tokens
    print(f"CPU vendor {cpu_vendor()}: the default GEMM backend here is {'onednn' if onednn_preferred() else 'mkl'}")
    for C in (64, 128, 256):
        diff, times = compare(C, N, args.rounds)
        flops = 2.5 * N * N * C
        print(f'C = {C}, N = {N}: flex vs eager max abs difference {diff:.1e}')
        for name, t in times.items():
            rate = flops / median(t) / 1e9
            print(f'  {name:16s} {median(t) * 1e3:8.2f} ms {rate:7.1f} GFLOP/s {rate / args.peak:6.1%} of peak'
                  f'   {paired_ratio(t, times["sdpa_mha"]):.2f}x SDPA')
        print(f'  oneDNN vs MKL, all products (paired): {paired_ratio(times["tiled_onednn"], times["tiled_mkl"]):.3f}x;'
              f' logits alone: {paired_ratio(times["tiled_onednn"], times["tiled_mkl_logits"]):.3f}x')
    side = round(N ** 0.5)
    for C in (64, 128, 256):
        t = compare_layer(C, side, args.rounds)
        print(f'deploy layer C = {C}, {side}x{side} map: oneDNN {median(t["onednn"]) * 1e3:.2f} ms, MKL '
              f'{median(t["mkl"]) * 1e3:.2f} ms, oneDNN {paired_ratio(t["onednn"], t["mkl"]):.3f}x MKL (paired)')


if __name__ == '__main__':
    main()
