"""Which training-mode BatchNorms should take this library's C++ ops rather than ATen's, on this CPU.

    python benchmarks/scripts/bn_route_speed.py --model uniform_t --img-size 112 --batch-size 128 --threads 2

``uniform_vit.layers.conv.BatchNorm2d`` sends a channels-last float32 map to the C++ op
(``cpu_kernels.batch_norm_train``, with its own C++ autograd) for every channel count on AVX-512 CPUs
(``BN_ALL_CHANNELS``), and on AVX2 only where the count is not a multiple of ``BN_ATEN_MULTIPLE`` (16; measured
on an AVX2 Zen 3 in session 19). This script measures the choice on the machine it runs on:
  1. every distinct BatchNorm input of one training step of ``--model`` (shapes recorded by forward hooks), forward
     and backward through the module as a step runs it, ATen against the ops, interleaved round by round; the table
     gives each shape's count in the step, both times, their ratio, and the milliseconds a step would save or lose
     by routing that shape to the ops. Isolated calls on tiny maps mislead (part 2 is the verdict): in session 37
     the ops lost on 2x2 maps alone but won the whole step with them;
  2. the whole step (forward, backward, one AdamW step at learning rate 0 with clipping, as ``uniform-vit train``)
     in three arms: ``multiple-16`` (the ops only off multiples of 16), ``ops-all`` and ``aten-all`` (no ops);
     ratios are medians of per-round ratios against ``multiple-16``; the output names this CPU's default.
``--matmul-precision medium`` runs the step with bf16 products where the CPU has them (``uniform-vit train
--matmul-precision``).
"""

from __future__ import annotations

from collections import Counter

import torch
from _step_args import (  # this folder's shared flags and set-up
    adamw_step,
    print_ratios,
    set_up,
    step_inputs,
    step_parser,
)
from timm.optim import create_optimizer_v2

import uniform_vit  # noqa: F401
import uniform_vit.layers.conv as conv
from uniform_vit.bench.harness import interleaved_timing, median
from uniform_vit.layers import cpu_kernels
from uniform_vit.train.engine import matmul_precision


def bn_shapes(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """(N, C, H, W) of every BatchNorm2d input in one training forward, with how often each occurs."""
    seen: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.update([tuple(a[0].shape)]))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def time_shape(shape: tuple, rounds: int) -> tuple[float, float]:
    """Milliseconds of one training-mode BatchNorm2d forward + backward on a channels-last map of ``shape``, as a
    training step runs it (autograd, running statistics, both gradients): (ATen's, the C++ ops')."""
    bn = conv.BatchNorm2d(shape[1]).train()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)

    def make(kernel: bool):
        def run():
            conv.BN_KERNEL, conv.BN_ALL_CHANNELS = kernel, True
            bn.zero_grad(set_to_none=True)
            bn(x.detach().requires_grad_()).backward(g)
        return run

    old = conv.BN_KERNEL, conv.BN_ALL_CHANNELS
    try:
        t = interleaved_timing({'aten': make(False), 'ops': make(True)}, rounds=rounds, warmup=2, inner=5)
    finally:
        conv.BN_KERNEL, conv.BN_ALL_CHANNELS = old
    return median(t['aten']) * 1e3, median(t['ops']) * 1e3


def shape_table(shapes: Counter, rounds: int) -> None:
    print('| N, C, H, W | per step | ATen fwd+bwd ms | ops fwd+bwd ms | ATen / ops | ms per step saved by ops |')
    print('|---|---|---|---|---|---|')
    total = 0.0
    for shape, count in sorted(shapes.items(), key=lambda kv: kv[0][1]):
        a, k = time_shape(shape, rounds)
        total += count * (a - k)
        print(f'| {", ".join(map(str, shape))} | {count} | {a:.3f} | {k:.3f} | {a / k:.2f}x | '
              f'{count * (a - k):+.2f} |')
    print(f'\nAll shapes on the ops instead of ATen: {total:+.1f} ms per step\n')


def main() -> None:
    p = step_parser(__doc__, img_size=112)
    p.add_argument('--model', default='uniform_t')
    p.add_argument('--matmul-precision', default='highest', choices=['highest', 'high', 'medium'])
    p.add_argument('--skip-shapes', action='store_true', help='only the whole-step arms')
    args = p.parse_args()
    set_up(args)
    if cpu_kernels.batch_norm_train() is None:
        raise SystemExit('the C++ ops are not built on this machine; nothing to compare')
    model, x, y = step_inputs(args)
    print(f'{args.model}, {args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, {args.threads} '
          f'threads, matmul precision {args.matmul_precision}, torch {torch.__version__}, {args.rounds} rounds\n')
    if not args.skip_shapes:
        shape_table(bn_shapes(model, x), args.rounds)

    opt = create_optimizer_v2(model, opt='adamw', lr=0.0, weight_decay=0.05, fused=True)
    # (BN_KERNEL, BN_ALL_CHANNELS)
    arms = {'multiple-16': (True, False), 'ops-all': (True, True), 'aten-all': (False, False)}
    old = conv.BN_KERNEL, conv.BN_ALL_CHANNELS

    def make(kernel: bool, all_channels: bool):
        def step():
            conv.BN_KERNEL, conv.BN_ALL_CHANNELS = kernel, all_channels
            adamw_step(model, opt, x, y)
        return step

    try:
        with matmul_precision(args.matmul_precision):
            t = interleaved_timing({k: make(*v) for k, v in arms.items()}, rounds=args.rounds, warmup=1, inner=3)
    finally:
        conv.BN_KERNEL, conv.BN_ALL_CHANNELS = old
    print(f"This CPU's default: {'ops-all' if conv.BN_ALL_CHANNELS else 'multiple-16'}\n")
    print_ratios(t, 'multiple-16', args.batch_size, first='step arm')


if __name__ == '__main__':
    main()
