"""Each of the deploy form's session-18 C++ ops alone, at UniForm's batch-16 shapes, against what it replaced (one
thread, interleaved rounds, medians):

* ``pointwise``: ``pointwise_conv`` (on packed weights, as the model runs it) against oneDNN's matmul
  (``mkldnn._linear_pointwise``, the ReLU fused where the model has one) for every 1x1 conv shape of uniform_t and
  uniform_m;
* ``conv3x3``: ``conv3x3_s2`` against ATen's conv (+ ReLU) for the stem's later convs of uniform_t / s / l;
* ``expand_dw``: ``expand_dw`` against the same layers as separate ops (the 1x1 op with its ReLU, then the
  depthwise op and a ReLU) for the patch mergings of uniform_t and uniform_m.

    python benchmarks/scripts/deploy_ops.py [--ops pointwise,conv3x3,expand_dw] [--rounds 7] [--calls 20]

Why these ops, and what they buy in the whole model: benchmarks/RESULTS.md, section 1, session 18.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from uniform_vit.layers import cpu_kernels
from uniform_vit.utils.malloc import tune_allocator

# (name, tokens, in, out, relu): uniform_t and uniform_m at 224 px, batch 16
POINTWISE = [
    ('T pm expand', 3136, 64, 256, True), ('T pm proj', 784, 256, 128, False), ('T qk', 784, 128, 64, False),
    ('T attn proj', 784, 128, 128, False), ('T pm2 expand', 784, 128, 512, True), ('T pm2 proj', 256, 512, 192, False),
    ('T s3 qk', 256, 192, 96, False), ('T s3 proj', 256, 192, 192, False), ('M pm expand', 3136, 128, 512, True),
    ('M pm2 expand', 784, 240, 960, True), ('M pm proj', 784, 512, 240, False), ('M pm2 proj', 256, 960, 320, False),
    ('M qk', 784, 240, 120, False), ('M attn proj', 784, 240, 240, False), ('M s3 proj', 256, 320, 320, False),
    ('M s3 qk', 256, 320, 160, False), ('M s1 proj', 3136, 128, 128, False), ('M s1 qk', 3136, 128, 64, False)]
# (name, images, in, out, input size, relu): the stem's second to fourth convs on half a batch (DeployStem's chunks)
CONV3X3 = [
    ('T conv2', 8, 8, 16, 112, True), ('T conv3', 8, 16, 32, 56, True), ('T conv4', 8, 32, 64, 28, False),
    ('S/M conv2', 8, 16, 32, 112, True), ('S/M conv3', 8, 32, 64, 56, True), ('S/M conv4', 8, 64, 128, 28, False),
    ('L conv2', 8, 24, 48, 112, True), ('L conv3', 8, 48, 96, 56, True), ('L conv4', 8, 96, 192, 28, False)]
# (name, images, in channels, map size): patch merging's input; the expansion is 4x the channels
EXPAND_DW = [('T stage 1', 16, 64, 14), ('T stage 2', 16, 128, 7), ('M stage 1', 16, 128, 14),
             ('M stage 2', 16, 240, 7)]


def timed(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns within every round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[k].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def row(name: str, flops: float, t: dict[str, float], old: str) -> str:
    return (f'{name:14s} {old} {t["old"] * 1e6:8.0f} us {flops / t["old"] / 1e9:5.1f} GFLOP/s   op '
            f'{t["op"] * 1e6:8.0f} us {flops / t["op"] / 1e9:5.1f} GFLOP/s   op speed-up {t["old"] / t["op"]:.2f}x')


def pointwise_pair(m: int, k: int, n: int, relu: bool, g: torch.Generator) -> tuple[Callable, Callable, int]:
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    wt = cpu_kernels.pack_panels(w.t().contiguous())  # as the model's weight cache holds it
    return (lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, 'relu' if relu else 'none', [], ''),
            lambda: torch.ops.uniform_vit.pointwise_conv(x, wt, b, relu, True), 2 * m * k * n)


def conv3x3_pair(bsz: int, cin: int, cout: int, hw: int, relu: bool, g: torch.Generator) -> tuple[Callable, Callable,
                                                                                                   int]:
    x = torch.randn(bsz, cin, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    b, wt = torch.randn(cout, generator=g), w.permute(2, 3, 1, 0).contiguous()

    def aten() -> torch.Tensor:
        y = F.conv2d(x, w, b, 2, 1)
        return y.relu_() if relu else y

    return aten, lambda: torch.ops.uniform_vit.conv3x3_s2(x, wt, b, relu), 2 * bsz * (hw // 2) ** 2 * cout * cin * 9


def expand_dw_pair(bsz: int, c: int, hw: int, g: torch.Generator) -> tuple[Callable, Callable, int]:
    ops, xc = torch.ops.uniform_vit, 4 * c
    x = torch.randn(bsz, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(xc, c, generator=g) / c ** 0.5, torch.randn(xc, generator=g)
    wd, bd = torch.randn(xc, 1, 3, 3, generator=g), torch.randn(xc, generator=g)
    w1t, wdw = cpu_kernels.pack_panels(w1.t().contiguous()), wd[:, 0].permute(1, 2, 0).contiguous()

    def separate() -> torch.Tensor:
        y = ops.pointwise_conv(x.permute(0, 2, 3, 1).reshape(-1, c), w1t, b1, True, True)
        return ops.depthwise_conv(y.view(bsz, hw, hw, xc).permute(0, 3, 1, 2), wd, bd, 2).relu_()

    flops = 2 * bsz * hw * hw * c * xc + 2 * bsz * ((hw + 1) // 2) ** 2 * xc * 9
    return separate, lambda: ops.expand_dw(x, w1t, b1, wdw, bd, True), flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--ops', default='pointwise,conv3x3,expand_dw')
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--calls', type=int, default=20)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    if cpu_kernels.status() != 'on':
        raise SystemExit(f'the C++ kernels are {cpu_kernels.status()}')
    g = torch.Generator().manual_seed(0)
    cases = []
    if 'pointwise' in args.ops:
        cases += [(name, 'oneDNN', f'{m} x {k} -> {n}', pointwise_pair(m, k, n, relu, g))
                  for name, m, k, n, relu in POINTWISE]
    if 'conv3x3' in args.ops:
        cases += [(name, 'ATen  ', f'{cin} -> {cout} at {hw} px', conv3x3_pair(bsz, cin, cout, hw, relu, g))
                  for name, bsz, cin, cout, hw, relu in CONV3X3]
    if 'expand_dw' in args.ops:
        cases += [(name, 'apart ', f'{c} -> {4 * c} at {hw} px', expand_dw_pair(bsz, c, hw, g))
                  for name, bsz, c, hw in EXPAND_DW]
    print(f'one thread, {args.rounds} interleaved rounds of {args.calls} calls, medians')
    with torch.inference_mode():
        for name, old, shape, (old_fn, op_fn, flops) in cases:
            t = timed({'old': old_fn, 'op': op_fn}, args.rounds, args.calls)
            print(row(name, flops, t, old), f'  ({shape})')


if __name__ == '__main__':
    main()
