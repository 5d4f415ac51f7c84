"""Training-step speed with the CPU training paths of uniform_vit.layers.conv against ATen's convolutions.

    python benchmarks/scripts/train_paths.py --models uniform_t --img-size 112 --batch-size 128 --in-chans 1 \
        --threads 2

Three paths, each behind an A/B switch of ``uniform_vit.layers.conv``:
  * ``SMALL_MAP_GRAD``: a stride-1 depthwise conv on a map smaller than its kernel (UniForm's 3x3 convs over 2x2
    maps, its 5x5 / 7x7 value convs over 4x4 maps when small images are upsampled) computes its weight gradient
    with this library's C++ op (or sums per tap), not oneDNN's convolution backward;
  * ``TRAIN_MATMUL``: 1x1 convs on channels-last maps train as one matrix product over the tokens (``F.linear``,
    whose backward is two BLAS products), not oneDNN's convolution and its backward;
  * ``BN_KERNEL``: BatchNorm over channels-last maps (on AVX2 those whose channel count is not a multiple of 16, such
    as the stem's first layers; on AVX-512 all) trains through this library's C++ ops, not ATen's channels-last
    BatchNorm.
The matrix products of ``TRAIN_MATMUL`` run where ``uniform_vit.layers.gemm``'s policy sends them (oneDNN on AMD
CPUs with AVX-512, where MKL runs AVX2 code; session 32); the ``all-blas`` arm is ``all`` with them on BLAS
(``torch.mm``, as before session 32).
Arms: all on (what ``uniform-vit train`` runs), each alone, and none (ATen's ops). One model, one set of weights,
one AdamW step at learning rate 0 per call on a fixed channels-last batch, the arms interleaved round by round
(uniform_vit.bench.harness); ratios are medians of per-round ratios against 'aten'. ``--compile`` adds 'all' and
'aten' under ``torch.compile`` (what ``uniform-vit train --compile`` runs; inductor fuses the per-tap sums there;
compiled before timing) next to the eager arms, so that compiled and eager steps are compared in the same rounds.
glibc's malloc is tuned first, as ``uniform-vit train`` does.
"""

from __future__ import annotations

import timm
import torch
from _step_args import set_up, step_parser  # this folder's shared flags and set-up

import uniform_vit  # noqa: F401
import uniform_vit.layers.conv as conv
from uniform_vit.bench.harness import interleaved_timing, median, spread
from uniform_vit.layers.cpu_kernels import status
from uniform_vit.layers.gemm import gemm_backend
from uniform_vit.utils.malloc import allocator_label

# (SMALL_MAP_GRAD, TRAIN_MATMUL, BN_KERNEL, GEMM backend of the matrix products)
ARMS = {'all': (True, True, True, 'auto'), 'all-blas': (True, True, True, 'mkl'),
        'dw-grad': (True, False, False, 'auto'), 'matmul': (False, True, False, 'auto'),
        'bn': (False, False, True, 'auto'), 'aten': (False, False, False, 'auto')}


def main() -> None:
    p = step_parser(__doc__, img_size=112)
    p.add_argument('--models', default='uniform_t')
    p.add_argument('--compile', action='store_true', help="also time 'all' and 'aten' under torch.compile")
    args = p.parse_args()
    set_up(args)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    arms = {k: (*v, False) for k, v in ARMS.items()}
    if args.compile:
        arms.update({f'{k} compiled': (*ARMS[k], True) for k in ('all', 'aten')})
    print(f'{args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, {args.threads} threads, '
          f'torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, C++ kernels {status()}, '
          f'malloc {allocator_label()}, {args.rounds} interleaved rounds, one AdamW step per call')
    print('| model |' + ''.join(f' {k} img/s |' for k in arms) + ''.join(f' {k} / aten |' for k in arms if k != 'aten'))
    print('|---|' + '---|' * (2 * len(arms) - 1))
    for name in args.models.split(','):
        model = timm.create_model(name, num_classes=args.num_classes, in_chans=args.in_chans)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # the weights stay the same
        fns = {}
        for arm, (small_map, matmul, bn, gemm, compiled) in arms.items():
            fwd = torch.compile(model) if compiled else model

            def step(fwd=fwd, opt=opt, small_map=small_map, matmul=matmul, bn=bn, gemm=gemm):
                conv.SMALL_MAP_GRAD, conv.TRAIN_MATMUL, conv.BN_KERNEL = small_map, matmul, bn
                opt.zero_grad(set_to_none=True)
                with gemm_backend(gemm):
                    torch.nn.functional.cross_entropy(fwd(x), y).backward()
                opt.step()

            if compiled:
                step()  # compile outside the timed rounds
            fns[arm] = step
        t = interleaved_timing(fns, rounds=args.rounds, warmup=1)
        line = f'| {name} |' + ''.join(f' {args.batch_size / median(t[k]):.0f} |' for k in arms)
        for k in arms:
            if k != 'aten':
                r = [a / b for a, b in zip(t['aten'], t[k])]
                line += f' {median(r):.2f}x ({spread(r) * 100:.0f}%) |'
        print(line, flush=True)
    conv.SMALL_MAP_GRAD, conv.TRAIN_MATMUL, conv.BN_KERNEL = True, True, True


if __name__ == '__main__':
    main()
