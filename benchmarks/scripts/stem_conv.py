"""The deploy stem's first layer two ways, interleaved in one process (session 17): ATen's (the image copied to
channels-last, oneDNN's conv, a ReLU pass) against the C++ ``stem_conv`` op (``layers/csrc/stem_conv.cpp``).

    python benchmarks/scripts/stem_conv.py --rounds 11

One half of the bench's batch (8 images: the deploy stem splits batch 16 in two), 224 px, 1 thread; output widths
8 / 16 / 24 (uniform_t, uniform_s/m, uniform_l), 3 input channels (RGB) and 1 (Fashion-MNIST).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers import cpu_kernels
from uniform_vit.models.uniform import _to_channels_last
from uniform_vit.utils.malloc import tune_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rounds', type=int, default=11)
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--img-size', type=int, default=224)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    op = cpu_kernels.stem_conv()
    if op is None:
        raise SystemExit(f'the C++ kernels are {cpu_kernels.status()}')
    print(f'first stem layer, batch {args.batch_size}, {args.img_size} px, 1 thread, {args.rounds} interleaved rounds '
          f'({torch.backends.cpu.get_cpu_capability()})')
    for cout in cpu_kernels.STEM_CHANNELS:
        for cin in (3, 1):
            g = torch.Generator().manual_seed(cout + cin)
            x = torch.randn(args.batch_size, cin, args.img_size, args.img_size, generator=g)
            w, b = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
            fns = {'aten': lambda a=(x, w, b): F.conv2d(_to_channels_last(a[0]), a[1], a[2], 2, 1).relu_(),
                   'op': lambda a=(x, w, b): op(*a, True)}
            with torch.inference_mode():
                err = (fns['op']() - fns['aten']()).abs().max().item()
                times = interleaved_timing(fns, rounds=args.rounds, warmup=2)
            oh = (args.img_size + 1) // 2
            flops = 2 * args.batch_size * oh * oh * cout * cin * 9
            ta, to = median(times['aten']), median(times['op'])
            print(f'  Cin {cin} Cout {cout:2d}: ATen {ta * 1e3:6.2f} ms ({flops / ta / 1e9:4.1f} GFLOP/s), '
                  f'op {to * 1e3:6.2f} ms ({flops / to / 1e9:4.1f} GFLOP/s), '
                  f'op speed-up {paired_ratio(times["op"], times["aten"]):.2f}x, max |diff| {err:.1e}')


if __name__ == '__main__':
    main()
