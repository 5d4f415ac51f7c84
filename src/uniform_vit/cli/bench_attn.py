"""``uniform-vit bench-attn``: attention mechanisms at the same C and h, swept over the number of tokens N."""

from __future__ import annotations

import argparse
import json

from ._common import non_negative_int, positive_int

HELP = 'Compare attention mechanisms (Reuse, MHA/SDPA, linear, CGA, GQA/MQA, SHSA, additive) across token counts.'
EXAMPLES = """examples:
  uniform-vit bench-attn                                  all mechanisms, C=128 h=4, N = 49 ... 4096
  uniform-vit bench-attn --mechanisms core_reuse_tiled,core_mha_sdpa --tokens 3136 --rounds 9
  uniform-vit bench-attn --channels 64,128,256 --heads 4 --json attn.json --csv attn.csv --plot attn.png
  uniform-vit bench-attn --device cuda --tokens 784,3136,4096 --channels 64,128,256   fp16, batch 32 on a GPU
  uniform-vit bench-attn --list                           the mechanisms and what they are"""


def _int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--mechanisms', default=None, help="comma list (default: all; see --list); 'modules', 'cores'")
    p.add_argument('--tokens', type=_int_list, default=None, help='comma list of N (default 49,196,784,3136,4096)')
    p.add_argument('--channels', type=_int_list, default=[128], help='comma list of C (default 128)')
    p.add_argument('--heads', type=_int_list, default=[4], help='comma list of h (default 4)')
    p.add_argument('--batch-size', type=positive_int, default=None,
                   help='default 1 on CPU, 32 on CUDA (one image at N = 3136 leaves most of a GPU idle)')
    p.add_argument('--dtype', default='auto', choices=['auto', 'fp32', 'fp16', 'bf16'],
                   help="auto (default): fp16 on CUDA (where PyTorch's flash attention runs), fp32 on CPU")
    p.add_argument('--threads', type=positive_int, default=1, help='CPU threads (default 1)')
    p.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    p.add_argument('--rounds', type=positive_int, default=5, help='interleaved rounds per configuration (default 5)')
    p.add_argument('--warmup', type=non_negative_int, default=1, help='warm-up rounds (default 1)')
    p.add_argument('--rewarm', type=non_negative_int, default=1,
                   help='untimed calls of each mechanism right before its timed one in every round (default 1)')
    p.add_argument('--list', action='store_true', help='list the mechanisms and exit')
    p.add_argument('--json', metavar='PATH', help="write the result as JSON ('-' for stdout)")
    p.add_argument('--csv', metavar='PATH', help='write the rows as CSV')
    p.add_argument('--plot', metavar='PATH', help='PNG: latency and peak memory against N')


def mechanism_names(spec: str | None) -> list[str]:
    from ..bench.attn import MECHANISMS

    if spec in (None, '', 'all'):
        return list(MECHANISMS)
    if spec in ('modules', 'cores'):
        return [n for n, m in MECHANISMS.items() if m.family == spec[:-1]]
    return [t.strip() for t in spec.split(',') if t.strip()]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.attn import DEFAULT_TOKENS, MECHANISMS, ROW_FIELDS, plot_sweep, run_attn_bench
    from ..bench.models import check_outputs, write_outputs
    from ._common import print_table

    if args.list:
        for name, m in MECHANISMS.items():
            print(f"{name:<20} {m.family:<7} {m.label}")
        return 0
    check_outputs(args.json, args.csv, args.plot)
    names = mechanism_names(args.mechanisms)
    batch = args.batch_size or (32 if args.device.startswith('cuda') else 1)
    tokens = args.tokens or list(DEFAULT_TOKENS)
    to_stdout = args.json == '-'
    console = Console(stderr=to_stdout, width=max(140, Console().width))
    with Progress(TextColumn('{task.description:<28}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task('starting', total=1)
        result = run_attn_bench(names, tokens, args.channels, args.heads, batch, args.rounds, args.warmup,
                                args.threads, args.device,
                                lambda phase, done, total: bar.update(task, description=phase, completed=done,
                                                                      total=total), args.rewarm, args.dtype)
    if to_stdout:
        print(json.dumps(result, indent=2))
    else:
        e, pk = result['environment'], result['peak']
        kernel = e.get('reuse_kernel', 'off')
        if e['gpu']:
            core = f"Triton kernel {kernel} (UNIFORM_VIT_GPU_KERNELS=0 for the ATen loop)"
        else:
            core = ('C++ kernel' if kernel == 'on' else f"C++ kernel {kernel}, products via {e['reuse_gemm']}") + \
                ' (UNIFORM_VIT_CPU_KERNELS=0, UNIFORM_VIT_GEMM override)'
        console.print(f"uniform-vit bench-attn: {e['gpu'] or e['cpu']} ({e['cpu_capability']}), {args.threads} "
                      f"thread(s), torch {e['torch']}, {result['settings']['dtype']}, batch {batch}, "
                      f"{args.rounds} interleaved rounds"
                      f"{f', each timed warm ({args.rewarm} untimed call first)' if args.rewarm else ''}, "
                      f"matmul peak {pk['gflops']} GFLOP/s ({pk['op']} {'x'.join(map(str, pk['shape']))}), "
                      f"tiled Reuse core: {core}")
        shown = []
        for r in result['rows']:
            d = dict(r)
            d['frac_of_peak'] = f"{100 * r['frac_of_peak']:.0f}%"
            d['gflop'] = f"{r['flops'] / 1e9:.3g}"
            d['mb'] = f"{r['bytes'] / 2**20:.3g}"
            d['speedup'] = f"{r['speedup']:.2f}x {r['vs']}" if r.get('speedup') else None
            shown.append(d)
        print_table(shown, [('mechanism', 'mechanism'), ('C', 'C'), ('h', 'h'), ('N', 'N'), ('ms', 'ms'),
                           ('gflop', 'GFLOP'), ('gflops', 'GFLOP/s'), ('frac_of_peak', '% peak'),
                           ('mb', 'MB moved'), ('intensity', 'FLOP/B'), ('peak_mem_mb', 'peak MB'),
                           ('speedup', 'speed-up (paired)')], 'attention mechanisms (median of interleaved rounds)')
        for s in result['skipped']:
            console.print(f"  skipped {s['mechanism']} at C={s['C']} h={s['h']} N={s['N']}: {s['reason']}",
                          style='yellow')
    write_outputs(result, args.json, args.csv, args.plot, ROW_FIELDS, plot_sweep)
    return 0
