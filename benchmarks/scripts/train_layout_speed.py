"""Training-step speed in NCHW against channels-last memory format, per model, on this CPU.

    python benchmarks/scripts/train_layout_speed.py --models uniform_t,uniform_s,efficientvit_m0 --img-size 96 \
        --batch-size 128 --in-chans 1 --threads 2

The choice behind `uniform-vit train`'s channels-last default on CPUs. Both layouts of a model start from the same
weights and run in one process, interleaved round by round (uniform_vit.bench.harness): one AdamW step on a fixed
batch per call. The ratio columns are medians of per-round ratios. ``--compile`` adds a candidate: channels-last
under ``torch.compile`` (what ``uniform-vit train --compile`` runs; compiled before timing). ``--bf16`` adds
channels-last under CPU bf16 autocast (why ``uniform-vit train`` uses no AMP on CPUs); both flags together add a
fourth, compiled under bf16 autocast (``train --compile --amp bf16``). ``--medium`` adds channels-last fp32 under
``torch.set_float32_matmul_precision('medium')`` (``train --matmul-precision medium``: PyTorch sends the fp32
products to oneDNN on bf16 inputs with fp32 sums where oneDNN can take bf16; AMX ran them on the Intel Xeon of
session 36). ``--drop-path P`` adds channels-last with
stochastic depth at rate P (``train --drop-path P``; same weights), with its ratio to plain channels-last. glibc's
malloc is tuned first, as ``uniform-vit train`` does (uniform_vit.utils.malloc; ``UNIFORM_VIT_MALLOC=default`` to
compare without).
"""

from __future__ import annotations

import copy

import timm
import torch
from _step_args import set_up, step_parser  # this folder's shared flags and set-up

import uniform_vit  # noqa: F401
from uniform_vit.bench.harness import interleaved_timing, median, spread
from uniform_vit.train.engine import matmul_precision
from uniform_vit.utils.malloc import allocator_label


def main() -> None:
    p = step_parser(__doc__, img_size=96)
    p.add_argument('--models', default='uniform_t,uniform_s,efficientvit_m0')
    p.add_argument('--compile', action='store_true', help='also time channels-last + torch.compile')
    p.add_argument('--bf16', action='store_true', help='also time channels-last + bf16 autocast')
    p.add_argument('--medium', action='store_true', help="also time channels-last with 'medium' fp32 matmul precision")
    p.add_argument('--drop-path', type=float, default=0.0, help='also time channels-last with this drop-path rate')
    args = p.parse_args()
    set_up(args)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    print(f'{args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, {args.threads} threads, '
          f'torch {torch.__version__}, malloc {allocator_label()}, {args.rounds} interleaved rounds, '
          'one AdamW step per call')
    extras = ['compiled'] * args.compile + ['bf16'] * args.bf16 + ['compiled-bf16'] * (args.compile and args.bf16)
    extras += ['medium'] * args.medium + ['drop-path'] * (args.drop_path > 0)
    against_cl = [k for k in ('medium', 'drop-path') if k in extras]  # variants of channels-last: also that ratio
    print('| model | NCHW img/s | channels-last img/s | channels-last / NCHW (spread) |'
          + ''.join(f' {k} img/s | {k} / NCHW |' for k in extras)
          + ''.join(f" {f'drop-path {args.drop_path}' if k == 'drop-path' else k} / channels-last (spread) |"
                    for k in against_cl))
    print('|---|---|---|---|' + '---|---|' * len(extras) + '---|' * len(against_cl))
    for name in args.models.split(','):
        base = timm.create_model(name, num_classes=args.num_classes, in_chans=args.in_chans)
        fns = {}
        for layout in ('nchw', 'channels_last', *extras):
            if layout == 'drop-path':  # the same weights in a model built with stochastic depth
                model = timm.create_model(name, num_classes=args.num_classes, in_chans=args.in_chans,
                                          drop_path_rate=args.drop_path)
                model.load_state_dict(base.state_dict())
            else:
                model = copy.deepcopy(base)
            model.train()
            xb = x
            if layout != 'nchw':
                model = model.to(memory_format=torch.channels_last)
                xb = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            compiled, bf16 = layout.startswith('compiled'), layout.endswith('bf16')
            fwd = torch.compile(model) if compiled else model

            def step(fwd=fwd, opt=opt, xb=xb, bf16=bf16, precision='medium' if layout == 'medium' else 'highest'):
                with matmul_precision(precision):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                        loss = torch.nn.functional.cross_entropy(fwd(xb), y)
                    loss.backward()
                    opt.step()

            if compiled:
                step()  # compile outside the timed rounds

            fns[layout] = step
        t = interleaved_timing(fns, rounds=args.rounds, warmup=1)
        ratios = [a / b for a, b in zip(t['nchw'], t['channels_last'])]
        nchw, cl = (args.batch_size / median(t[k]) for k in ('nchw', 'channels_last'))
        line = f'| {name} | {nchw:.0f} | {cl:.0f} | {median(ratios):.2f}x ({spread(ratios) * 100:.0f}%) |'
        for k in extras:
            rk = [a / b for a, b in zip(t['nchw'], t[k])]
            line += f" {args.batch_size / median(t[k]):.0f} | {median(rk):.2f}x |"
        for k in against_cl:
            rd = [a / b for a, b in zip(t['channels_last'], t[k])]
            line += f' {median(rd):.2f}x ({spread(rd) * 100:.0f}%) |'
        print(line)


if __name__ == '__main__':
    main()
