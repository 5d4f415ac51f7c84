"""The Triton Reuse core (``layers/gpu_kernels.py``) on a CUDA GPU: every candidate block configuration, the
autotuned choice, and the alternatives at the same C and h: PyTorch SDPA multi-head (its flash kernel in fp16/bf16),
the Reuse core as single-head SDPA (C-wide value) and the eager (B, N, N) map.

    python benchmarks/scripts/reuse_gpu_kernel.py --tokens 3136 --channels 64,128,256 --batch 32 --json out.json

Each arm is checked against the float64 eager core first (relative error of the whole output), then timed with
``triton.testing.do_bench`` (CUDA events, median of repeated calls). Prints one table; ``--json`` keeps the rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
import torch.nn.functional as F

from uniform_vit.layers import gpu_kernels
from uniform_vit.layers.attention import reuse_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokens', default='3136')
    ap.add_argument('--channels', default='64,128,256')
    ap.add_argument('--heads', type=int, default=4)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--dtype', default='fp16', choices=['fp16', 'bf16', 'fp32'])
    ap.add_argument('--json', default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    dt = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}[args.dtype]
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, '
          f'h {args.heads}; kernel {gpu_kernels.status()}', flush=True)
    rows = []
    g = torch.Generator(device='cuda').manual_seed(0)
    for n in map(int, args.tokens.split(',')):
        for c in map(int, args.channels.split(',')):
            rows += measure(n, c, args.heads, args.batch, dt, args.dtype, g, do_bench)
    print(f"{'N':>5} {'C':>4} {'arm':<34} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9} {'MiB':>8} {'vs flash':>8}")
    for r in rows:
        e = '' if math.isnan(r['rel_err']) else f"{r['rel_err']:.1e}"
        print(f"{r['N']:>5} {r['C']:>4} {r['arm']:<34} {r['ms']:>8.3f} {r['tflops']:>8.1f} {e:>9} "
              f"{r['peak_mib']:>8.1f} {r.get('vs_mha_flash', ''):>8}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


def measure(n: int, c: int, h: int, b: int, dt: torch.dtype, dtype: str, g: torch.Generator, do_bench) -> list:
    """Every arm at one (N, C): correctness against float64, peak memory of one call, median time."""
    cq = c // 4
    q, k = (torch.randn(b, cq, n, device='cuda', dtype=dt, generator=g) for _ in range(2))
    v = torch.randn(b, c, n, device='cuda', dtype=dt, generator=g)
    mq, mk, mv = (torch.randn(b, h, n, c // h, device='cuda', dtype=dt, generator=g) for _ in range(3))
    scale = 16 ** -0.5
    ref = reuse_attention(q[:2].double(), k[:2].double(), v[:2].double(), None, scale, 'eager')
    arms = {}
    for i, cf in enumerate(gpu_kernels._TUNE):
        cfg = dict(cf, BLOCK_Q=max(16, 1 << (cq - 1).bit_length()))
        if cfg['BLOCK_C'] > max(16, 1 << (c - 1).bit_length()):
            continue
        label = f"cfg{i} M{cf['BLOCK_M']} N{cf['BLOCK_N']} C{cf['BLOCK_C']} w{cf['num_warps']} s{cf['num_stages']}"
        arms[label] = functools.partial(gpu_kernels.reuse_core, q, k, v, None, scale, cfg)
    arms['reuse triton (autotuned)'] = functools.partial(gpu_kernels.reuse_core, q, k, v, None, scale)
    arms['reuse sdpa (1 head, C-wide v)'] = functools.partial(reuse_attention, q, k, v, None, scale, 'sdpa')
    arms['reuse eager (B,N,N map)'] = functools.partial(reuse_attention, q, k, v, None, scale, 'eager')
    arms['mha sdpa (flash)'] = functools.partial(F.scaled_dot_product_attention, mq, mk, mv)
    rows, base = [], None
    for name, fn in arms.items():
        try:
            with torch.inference_mode():
                out = fn()
                err = float((out[:2].double() - ref).norm() / ref.norm()) if not name.startswith('mha') \
                    else float('nan')
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                mem = (torch.cuda.max_memory_allocated() - before) / 2**20
                ms = do_bench(fn, warmup=25, rep=100, return_mode='median')
        except Exception as e:  # noqa: BLE001  (an arm that cannot run is reported, not fatal)
            print(f'  N={n} C={c} {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}', flush=True)
            continue
        fl = (4.0 if name.startswith('mha') else 2.5) * b * n * n * c
        rows.append(dict(N=n, C=c, h=h, batch=b, dtype=dtype, arm=name, ms=round(ms, 4),
                         tflops=round(fl / ms / 1e9, 1), rel_err=err, peak_mib=round(mem, 1)))
        if name.startswith('mha'):
            base = ms
    for r in rows:
        if base:
            r['vs_mha_flash'] = round(base / r['ms'], 2)
    return rows


if __name__ == '__main__':
    main()
