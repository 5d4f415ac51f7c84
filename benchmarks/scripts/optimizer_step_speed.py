"""Training-step speed under each named optimiser (timm's names), side by side.

    python benchmarks/scripts/optimizer_step_speed.py --opts adamw,muon --img-size 112 --threads 2

Each arm is one whole training step of ``uniform-vit train`` less the data (forward, label-smoothed loss, backward,
gradient clipping at 5, the optimiser's step) on the same model and batch, with the optimiser built as the trainer
builds it (timm's ``create_optimizer_v2``, fused where torch has a fused step) at learning rate 0 so the weights stay
put. The arms run interleaved round by round; ratios are medians of per-round ratios against the first optimiser.
The optimiser's step alone is timed too (the same interleaving), since it is what differs between the arms.
"""

from __future__ import annotations

import torch
from _step_args import adamw_step, print_ratios, set_up, step_inputs, step_parser
from timm.optim import create_optimizer_v2

import uniform_vit  # noqa: F401
from uniform_vit.bench.harness import interleaved_timing, median
from uniform_vit.train.engine import fused_optimizer_kwargs


def _setting(kv: str) -> tuple[str, int | float | str]:
    """'ns_steps=3' -> ('ns_steps', 3); numbers become int or float, anything else stays a string."""
    key, sep, value = kv.partition('=')
    if not sep or not key:
        raise SystemExit(f"optimiser setting {kv!r}: expected KEY=VALUE")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    p = step_parser(__doc__, img_size=112)
    p.add_argument('--model', default='uniform_t')
    p.add_argument('--opts', default='adamw,muon',
                   help="comma-separated timm optimiser names, each with optional settings for timm after colons "
                        "(muon:ns_steps=3:ns_coefficients=polar_express); the first is the base")
    p.add_argument('--matmul-precision', default='highest', choices=('highest', 'high', 'medium'),
                   help="torch.set_float32_matmul_precision for all arms ('medium': bf16 products on AMX CPUs)")
    args = p.parse_args()
    set_up(args)
    torch.set_float32_matmul_precision(args.matmul_precision)
    model, x, y = step_inputs(args)
    names = args.opts.split(',')
    opts = {}
    for arm in names:
        name, *settings = arm.split(':')
        kw = dict(_setting(kv) for kv in settings)
        opts[arm] = create_optimizer_v2(model, opt=name, lr=0.0, weight_decay=0.05,
                                        **fused_optimizer_kwargs(name, torch.device('cpu')), **kw)
    print(f'{args.model}, {args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, {args.threads} '
          f'threads, matmul precision {args.matmul_precision}, torch {torch.__version__}, {args.rounds} rounds')
    t = interleaved_timing({n: (lambda o=o: adamw_step(model, o, x, y)) for n, o in opts.items()},
                           rounds=args.rounds, warmup=1, inner=3)
    print_ratios(t, names[0], args.batch_size, first='optimiser')

    adamw_step(model, opts[names[0]], x, y)  # gradients in place for the step-only timing
    alone = interleaved_timing({n: o.step for n, o in opts.items()}, rounds=args.rounds, warmup=1, inner=3)
    print('\n| optimiser | its step alone, ms (median) |\n|---|---|')
    for n in names:
        print(f'| {n} | {1e3 * median(alone[n]):.1f} |')


if __name__ == '__main__':
    main()
