"""``uniform-vit bench``: UniForm against its peers, side by side, on this machine (paper method by default)."""

from __future__ import annotations

import argparse
import json

from ._common import non_negative_int, positive_int, print_table

HELP = 'Benchmark UniForm against its peers on this machine: img/s, latency, memory, share of matmul peak.'
EXAMPLES = """examples:
  uniform-vit bench                                  6 models, under a minute on a quiet 2-core CPU (22 s here)
  uniform-vit bench --quick                          uniform_t/s vs efficientvit_m0/m1, fewer rounds
  uniform-vit bench --models full --json bench.json  the issue's full set (19 models)
  uniform-vit bench --models 'uniform_*,efficientvit_m*' --backend onnxruntime
  uniform-vit bench --models uniform_t,efficientvit_m0 --backend onnxruntime --int8
  uniform-vit bench --device cuda                    batch 2048, AMP (batch halved on out-of-memory)
model sets: readme (default), quick, full (alias: default); or a comma list / glob of timm names."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--models', default=None,
                   help="'readme' (default), 'quick', 'full'/'default', or a comma list / glob of timm model names")
    p.add_argument('--full', action='store_true', help="the issue's full model set (same as --models full)")
    p.add_argument('--quick', action='store_true', help='fewer rounds (and the 4-model quick set unless --models)')
    p.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    p.add_argument('--backend', default='jit', choices=['eager', 'jit', 'compile', 'onnxruntime'],
                   help='jit = torch.jit.trace, the paper method (default); compile = torch.compile, '
                        'weights frozen on CPU')
    p.add_argument('--int8', action='store_true', help='onnxruntime only: static int8 (calibrated on random data)')
    p.add_argument('--threads', type=positive_int, default=1, help='CPU threads (default 1, the paper method)')
    p.add_argument('--batch-size', type=positive_int, default=None, help='default: 16 on CPU, 2048 on CUDA')
    p.add_argument('--img-size', type=positive_int, default=None, help="default: each model's own input size")
    p.add_argument('--channels-last', action='store_true', help='channels-last memory format for model and input')
    p.add_argument('--no-fuse', action='store_true', help='time the unfused train-form networks (not the paper)')
    p.add_argument('--no-amp', action='store_true', help='CUDA: fp32 instead of AMP fp16')
    p.add_argument('--rounds', type=positive_int, default=None, help='interleaved timing rounds (default 10; quick 4)')
    p.add_argument('--warmup', type=non_negative_int, default=None, help='warm-up rounds (default 2; quick 1)')
    p.add_argument('--rewarm', type=non_negative_int, default=1,
                   help='untimed calls of each model right before its timed one in every round (default 1: each '
                        'model is timed warm, as if it ran alone; 0: straight after the previous model)')
    p.add_argument('--repeat', type=positive_int, default=1,
                   help='run the whole measurement N times, each in a fresh process, and report medians across them '
                        '(a paired ratio moves a few %% between processes; default 1)')
    p.add_argument('--no-latency', action='store_true', help='skip the batch-1 latency rounds')
    p.add_argument('--profile', type=positive_int, nargs='?', const=8, default=0, metavar='N',
                   help='after the timing, where each model spends its time: torch.profiler over the timed call, '
                        'the N operators with the most self time (default N: 8; CPU backends eager/jit/compile)')
    p.add_argument('--json', metavar='PATH', help="write the result as JSON ('-' for stdout, no table)")
    p.add_argument('--csv', metavar='PATH', help='write the rows as CSV')
    p.add_argument('--plot', metavar='PATH', help='PNG: published top-1 against measured img/s')


def settings_from_args(args: argparse.Namespace):
    """argparse -> BenchSettings (the pure part of the command, tested directly)."""
    from ..bench.models import MODEL_SETS, BenchSettings
    from ..errors import UserError
    from ._common import expand_models

    spec = args.models or ('full' if args.full else 'quick' if args.quick else 'readme')
    if args.full and args.models and args.models not in ('full', 'default'):
        raise UserError("--full and --models name different model sets; give one of them")
    if spec in MODEL_SETS:
        models, model_set = list(MODEL_SETS[spec]), spec
    else:
        models, model_set = expand_models(spec), 'custom'
    rounds = args.rounds or (4 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return BenchSettings(
        models=models, device=args.device, backend=args.backend, threads=args.threads, batch_size=args.batch_size,
        img_size=args.img_size, channels_last=args.channels_last, fused=not args.no_fuse, int8=args.int8,
        amp=False if args.no_amp else None, rounds=rounds, warmup=warmup, rewarm=args.rewarm,
        repeat=args.repeat, latency_rounds=0 if args.no_latency else rounds, model_set=model_set,
        profile=args.profile)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.models import (
        ROW_FIELDS,
        TABLE_COLUMNS,
        banner,
        batch_notes,
        check_outputs,
        form_notes,
        plot_top1_vs_throughput,
        resolve_settings,
        run_bench_repeated,
        table_rows,
        write_outputs,
    )

    s = resolve_settings(settings_from_args(args))
    check_outputs(args.json, args.csv, args.plot)
    to_stdout = args.json == '-'
    console = Console(stderr=to_stdout, width=max(140, Console().width))
    console.print(f"[bold]uniform-vit bench[/]: {len(s.models)} models ({s.model_set} set: {', '.join(s.models)}), "
                  f"backend {s.backend}, batch {s.batch_size}, {s.threads} thread(s), "
                  f"{'fused' if s.fused else 'unfused'}")
    if s.model_set == 'readme':
        console.print("  (README subset; '--models full' runs the issue's full 19-model set)", style='dim')
    with Progress(TextColumn('{task.description:<32}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task('starting', total=len(s.models))

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = run_bench_repeated(s, progress)
    if to_stdout:
        print(json.dumps(result, indent=2))
    else:
        console.print(banner(result))
        print_table(table_rows(result), TABLE_COLUMNS, 'UniForm vs peers (median of interleaved rounds)')
        for line in batch_notes(result):
            console.print(f"  note: {line}", style='yellow')
        for line in form_notes(result):
            console.print(f"  {line}", style='dim')
        for p in result['pairs']:
            if 'speedup_runs' in p:
                runs = ', '.join(f'{x:.2f}' for x in sorted(p['speedup_runs']))
                console.print(f"  {p['model']} is {p['speedup']:.2f}x {p['peer']} (median over "
                              f"{len(p['speedup_runs'])} processes of their per-round medians: {runs})")
            else:
                console.print(f"  {p['model']} is {p['speedup']:.2f}x {p['peer']} "
                              f"(median of per-round ratios, spread {100 * p['speedup_spread']:.0f}%)")
        profiled = [r for r in result['rows'] if r.get('profile')]
        if profiled:
            from ..bench.profile import format_profile

            console.print(f"\n[bold]Where the time goes[/] (torch.profiler, operator self time, batch {s.batch_size}, "
                          f"{s.threads} thread(s){', first process' if s.repeat > 1 else ''}):")
            for r in profiled:
                for line in format_profile(r['model'], r['profile'], r['ms_per_batch']):
                    console.print(line, markup=False, highlight=False)
    write_outputs(result, args.json, args.csv, args.plot, ROW_FIELDS, plot_top1_vs_throughput)
    return 0


