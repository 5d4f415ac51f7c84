"""glibc malloc as it comes against uniform_vit.utils.malloc.tune_allocator, in alternating processes.

    python benchmarks/scripts/allocator_speed.py --mode train --img-size 112 --batch-size 128 --threads 2 --pairs 4
    python benchmarks/scripts/allocator_speed.py --mode train --compile ...   # as `uniform-vit train --compile` runs
    python benchmarks/scripts/allocator_speed.py --mode infer --img-size 224 --batch-size 16 --threads 1

mallopt settings hold for a whole process and cannot be taken back, so the two arms cannot share one process the way
the other speed scripts interleave candidates. Each pair starts one fresh process per arm, in ABBA order across pairs
(default first in even pairs, tuned first in odd ones), each building the same model from the same seed, warming up,
then timing ``--steps`` calls; the ratio is taken pair by pair (median of the arms' per-process medians) and
summarised as the median over pairs. Also reported: minor page faults per timed call (getrusage), which do not
depend on the machine's load. ``--mode train``: one AdamW step of the train form (channels-last, cross-entropy) on a
fixed batch; ``--mode infer``: the BN-fused, traced deploy form that ``uniform-vit bench`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import warnings

    from uniform_vit.utils.malloc import tune_allocator

    if args.worker == 'tuned' and not tune_allocator():
        raise SystemExit('tune_allocator() did not apply here (not glibc, or UNIFORM_VIT_MALLOC/MALLOC_* set)')
    import timm
    import torch

    import uniform_vit  # noqa: F401

    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mode == 'train':
        model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
        x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, args.num_classes, (args.batch_size,))
        model = model.train().to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fwd = torch.compile(model) if args.compile else model

        def call() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
                loss = torch.nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
    else:
        import tempfile

        from uniform_vit.bench.models import BenchSettings, prepare

        settings = BenchSettings(models=[args.model], threads=args.threads, batch_size=args.batch_size,
                                 img_size=args.img_size, latency_rounds=0)
        call = prepare(args.model, settings, tempfile.mkdtemp()).call

    for _ in range(args.warmup):
        call()
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps
    print(json.dumps({'median_s': statistics.median(times), 'faults_per_call': faults}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--mode', choices=('train', 'infer'), default='train')
    p.add_argument('--model', default='uniform_t')
    p.add_argument('--img-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--in-chans', type=int, default=1)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--compile', action='store_true', help='train: torch.compile the model')
    p.add_argument('--bf16', action='store_true', help='train: CPU bf16 autocast')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--steps', type=int, default=15)
    p.add_argument('--pairs', type=int, default=4)
    p.add_argument('--worker', choices=('default', 'tuned'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.mode == 'infer' and (args.compile or args.bf16):
        p.error('--compile and --bf16 apply to --mode train')
    env = {k: v for k, v in os.environ.items() if k != 'UNIFORM_VIT_MALLOC'}
    passthrough = sys.argv[1:]
    results: dict[str, list[dict]] = {'default': [], 'tuned': []}
    chans = f"in_chans {args.in_chans}, " if args.mode == 'train' else ''
    print(f"{args.mode}: {args.model}, {args.img_size} px, batch {args.batch_size}, {chans}"
          f"{args.threads} threads{', compiled' if args.compile else ''}{', bf16 autocast' if args.bf16 else ''}; "
          f"{args.pairs} pairs of processes (ABBA), {args.warmup} warm-up + {args.steps} timed calls each")
    for i in range(args.pairs):
        order = ('default', 'tuned') if i % 2 == 0 else ('tuned', 'default')
        for arm in order:
            out = subprocess.run([sys.executable, __file__, *passthrough, '--worker', arm], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
        d, t = results['default'][-1], results['tuned'][-1]
        print(f"pair {i + 1}: default {d['median_s'] * 1e3:.1f} ms ({d['faults_per_call']:.0f} faults/call), "
              f"tuned {t['median_s'] * 1e3:.1f} ms ({t['faults_per_call']:.0f} faults/call), "
              f"default/tuned {d['median_s'] / t['median_s']:.3f}x", flush=True)
    ratios = [d['median_s'] / t['median_s'] for d, t in zip(results['default'], results['tuned'])]
    med = {k: statistics.median(r['median_s'] for r in v) for k, v in results.items()}
    print(f"median over pairs: default {args.batch_size / med['default']:.0f} img/s, "
          f"tuned {args.batch_size / med['tuned']:.0f} img/s, tuned speed-up {statistics.median(ratios):.3f}x "
          f"(pairs {min(ratios):.3f}-{max(ratios):.3f}x)")


if __name__ == '__main__':
    main()
