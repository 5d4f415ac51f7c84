"""Is the tiled Reuse core's softmax worth a hand-written kernel? ``reuse_softmax_kernel.cpp`` (next to this file,
built here with ``torch.utils.cpp_extension``: a C++ compiler and ninja) does each (T, N) tile's rows in L1 with
ATen's vectorised ``exp_u20`` (the fast exp of PyTorch's CPU flash attention), leaves them unnormalised and returns
the row sums, so the (T, C) output is divided instead of the map rescaled. Measured against ATen's softmax in a
replica of the core's MKL loop (the GEMM policy on Intel CPUs; token-major q/k/v, the deploy layer's case), with
the ATen path of the shipped core and multi-head fused SDPA for scale. Session 14: 1.00-1.04x, so this kernel did
not ship; the cost was elsewhere (layers/csrc/reuse_core.cpp, benchmarks/RESULTS.md).

    python benchmarks/scripts/reuse_softmax_kernel.py --tokens 784,3136 --channels 64,128,256 --rounds 7

One thread, batch 1, 4 heads, Cq = C / 4, no bias, interleaved rounds with one untimed call before each timed one
(the harness of ``uniform-vit bench-attn``); prints ms and paired speed-ups.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

import uniform_vit.layers.attention as attention
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers.attention import query_tile, reuse_attention
from uniform_vit.layers.gemm import gemm_backend
from uniform_vit.utils.malloc import tune_allocator

ISA_FLAGS = {'AVX512': ['-DCPU_CAPABILITY_AVX512', '-DCPU_CAPABILITY=AVX512', '-mavx512f', '-mavx512dq', '-mavx512vl',
                        '-mavx512bw', '-mfma'],
             'AVX2': ['-DCPU_CAPABILITY_AVX2', '-DCPU_CAPABILITY=AVX2', '-mavx2', '-mfma']}


def build() -> None:
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ISA_FLAGS:
        raise SystemExit(f'no build flags for the {isa} vector ISA')
    load(name=f'uniform_vit_reuse_softmax_{isa.lower()}', sources=[str(Path(__file__).with_suffix('.cpp'))],
         extra_cflags=['-O3', *ISA_FLAGS[isa]], is_python_module=False)


def replica(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: bool) -> torch.Tensor:
    """The tiled core's MKL loop for token-major q/k/v (layers/attention.py, _reuse_tiled), softmax swappable."""
    B, C, N = v.shape
    tile = query_tile(N, q.element_size())
    qt, vt = q.transpose(1, 2), v.transpose(1, 2)
    out, buf, kb = v.new_empty(B, N, C), q.new_empty(min(tile, N), N), k.new_empty(k.shape[1], N)
    for b in range(B):
        kb.copy_(k[b])
        for s in range(0, N, tile):
            e = min(s + tile, N)
            at = buf[:e - s]
            torch.addmm(at, qt[b, s:e], kb, beta=0.0, alpha=0.25, out=at)
            if kernel:
                sums = torch.ops.uniform_vit_exp.exp_rows_(at)
                torch.mm(at, vt[b], out=out[b, s:e])
                out[b, s:e].div_(sums.unsqueeze(1))
            else:
                torch.ops.aten._softmax.out(at, -1, False, out=at)
                torch.mm(at, vt[b], out=out[b, s:e])
    return out.transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokens', default='784,3136')
    ap.add_argument('--channels', default='64,128,256')
    ap.add_argument('--rounds', type=int, default=7)
    args = ap.parse_args()
    build()
    tune_allocator()  # as the CLI does
    torch.set_num_threads(1)
    print(f'torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread', flush=True)
    g = torch.Generator().manual_seed(0)
    for n in map(int, args.tokens.split(',')):
        for c in map(int, args.channels.split(',')):
            measure(n, c, args.rounds, g)


def measure(n: int, c: int, rounds: int, g: torch.Generator) -> None:
    q, k, v = (torch.randn(1, n, ch, generator=g).transpose(1, 2) for ch in (c // 4, c // 4, c))  # token-major
    qm, km, vm = (torch.randn(1, 4, n, c // 4, generator=g) for _ in range(3))

    def shipped() -> torch.Tensor:  # the ATen path of the tiled core (the C++ core of session 14 switched off)
        attention.CPU_KERNEL = False
        try:
            with gemm_backend('mkl'):
                return reuse_attention(q, k, v, None, 0.25, 'tiled')
        finally:
            attention.CPU_KERNEL = True

    fns = {'kernel': lambda: replica(q, k, v, True), 'aten': lambda: replica(q, k, v, False), 'shipped': shipped,
           'sdpa_mha': lambda: F.scaled_dot_product_attention(qm, km, vm)}
    with torch.no_grad():
        ref = shipped()
        for name in ('kernel', 'aten'):
            err = (fns[name]() - ref).abs().max().item()
            assert err < 1e-5, f'{name} vs the shipped core: max abs diff {err:.2e}'
        t = interleaved_timing(fns, rounds=rounds, warmup=1, rewarm=1)
    cells = '  '.join(f"{name} {median(x) * 1e3:.2f} ms ({paired_ratio(x, t['sdpa_mha']):.2f}x SDPA)"
                      for name, x in t.items() if name != 'sdpa_mha')
    print(f"N {n:5d} C {c:3d}: {cells}  sdpa {median(t['sdpa_mha']) * 1e3:.2f} ms; kernel vs aten "
          f"{paired_ratio(t['kernel'], t['aten']):.3f}x", flush=True)


if __name__ == '__main__':
    main()
