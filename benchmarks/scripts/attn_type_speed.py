"""Reuse Attention vs multi-head attention in the same UniForm network: train-step and inference img/s.

    python benchmarks/scripts/attn_type_speed.py --model uniform_t --img-size 64 --batch-size 128 --in-chans 1

All candidates run in one process, one thread, interleaved round by round (uniform_vit.bench.harness); the table
shows medians over rounds. Inference: traced (paper method), train form and BN-fused deploy form.
"""

from __future__ import annotations

import argparse
import warnings

import timm
import torch

import uniform_vit  # noqa: F401
from uniform_vit import reparameterize
from uniform_vit.bench.harness import interleaved_timing, median, spread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='uniform_t')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--in-chans', type=int, default=1)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--rounds', type=int, default=7)
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    fns = {}
    for attn in ('reuse', 'mha'):
        model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, attn_type=attn)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model.train(), opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        fns[f'{attn} train step'] = step
        with torch.no_grad():
            for form, net in (('train form', model), ('fused', None)):
                net = reparameterize(model) if net is None else net
                net.eval()
                traced = torch.jit.trace(net, x)
                fns[f'{attn} inference, {form}'] = (lambda t=traced: t(x))
        model.train()
    times = interleaved_timing({k: v for k, v in fns.items() if k.endswith('train step')}, rounds=args.rounds,
                               warmup=1)
    with torch.no_grad():
        times.update(interleaved_timing({k: v for k, v in fns.items() if 'inference' in k}, rounds=args.rounds,
                                        warmup=1))
    print(f'{args.model} {args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, 1 thread, '
          f'torch {torch.__version__}, {args.rounds} interleaved rounds')
    print('| candidate | img/s (median) | spread |')
    print('|---|---|---|')
    for name, t in times.items():
        print(f'| {name} | {args.batch_size / median(t):.0f} | {spread(t) * 100:.0f}% |')


if __name__ == '__main__':
    main()
