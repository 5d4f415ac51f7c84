"""Several `uniform-vit train` runs side by side: a table of their results and one plot of their curves.

    python benchmarks/scripts/compare_runs.py runs/fm_112_e50 runs/fm_112_lr2e-3_e50 runs/fm_112_lr1e-3_e50 \
        --labels 'lr 4e-3' 'lr 2e-3' 'lr 1e-3' --plot benchmarks/train_lr_sweep_112.png

Reads each run folder's metrics.csv and summary.json (what `uniform-vit train --output DIR` writes). The table gives
the last epoch's test top-1 (what we report), the best epoch's, the final train loss, the training time and img/s;
the plot shows test top-1 (left) and train loss (right) for every run, against the epoch or, with `--x minutes`,
against the training time (runs of different lengths at equal cost, such as two resolutions in the same hour). The
top-1 axis spans the second halves of the runs, so an early dip does not squeeze the part that decides.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def load(run: Path) -> tuple[list[dict], dict]:
    metrics, summary = run / 'metrics.csv', run / 'summary.json'
    for f in (metrics, summary):
        if not f.is_file():
            raise SystemExit(f"{run}: no {f.name} (is it a finished `uniform-vit train --output` folder?)")
    with metrics.open() as fh:
        rows = [{k: float(v) if v not in ('', None) else None for k, v in r.items()} for r in csv.DictReader(fh)]
    return rows, json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', type=Path, help='run folders')
    p.add_argument('--labels', nargs='+', help='one label per run (default: the folder names)')
    p.add_argument('--plot', help='PNG path for the curves')
    p.add_argument('--x', choices=('epoch', 'minutes'), default='epoch',
                   help="the plot's x axis: epochs, or minutes of training (summed epoch_seconds)")
    args = p.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"{len(args.runs)} runs but {len(labels)} labels")
    data = [load(r) for r in args.runs]

    print('| run | epochs | test top-1, last epoch | best epoch | final train loss | training | img/s |')
    print('|---|---|---|---|---|---|---|')
    for label, (rows, s) in zip(labels, data):
        last = [r for r in rows if r['top1'] is not None][-1]
        print(f"| {label} | {s['epochs']} | {s['final_top1']:.2f} % | {s['best_top1']:.2f} % (epoch {s['best_epoch']}) "
              f"| {rows[-1]['train_loss']:.3f} | {s['train_seconds'] / 60:.1f} min | {s['train_img_per_s']:.0f} |")
        if abs(last['top1'] - s['final_top1']) >= 0.01:
            print(f"  warning: {label}: metrics.csv ends at {last['top1']} %, summary.json says {s['final_top1']} %")

    if args.plot:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        low, high = 100.0, 0.0
        for label, (rows, s) in zip(labels, data):
            x, t = [], 0.0
            for r in rows:
                t += r['epoch_seconds'] or 0.0
                x.append(r['epoch'] if args.x == 'epoch' else t / 60)
            ev = [(xi, r['top1']) for xi, r in zip(x, rows) if r['top1'] is not None]
            a.plot(*zip(*ev), label=f"{label}: {s['final_top1']:.2f} %")
            b.plot(x, [r['train_loss'] for r in rows], label=label)
            late = [v for _, v in ev[len(ev) // 2:]]
            low, high = min(low, *late), max(high, *late)
        a.set_ylim(low - 0.5, min(100.0, high + 0.3))
        xlabel = 'epoch' if args.x == 'epoch' else 'training time (min)'
        a.set_xlabel(xlabel)
        a.set_ylabel('test top-1 (%)')
        a.legend(title='last epoch')
        a.grid(alpha=0.3)
        b.set_xlabel(xlabel)
        b.set_ylabel('train loss')
        b.legend()
        b.grid(alpha=0.3)
        fig.suptitle(f"{data[0][1]['model']} on {data[0][1]['dataset']}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == '__main__':
    main()
