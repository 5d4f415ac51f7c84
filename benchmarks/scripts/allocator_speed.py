"""glibc malloc as it comes against uniform_vit.utils.malloc.tune_allocator (and jemalloc, tcmalloc), one process each.

    python benchmarks/scripts/allocator_speed.py --mode train --img-size 112 --batch-size 128 --threads 2 --pairs 4
    python benchmarks/scripts/allocator_speed.py --mode train --compile ...   # as `uniform-vit train --compile` runs
    python benchmarks/scripts/allocator_speed.py --mode infer --img-size 224 --batch-size 16 --threads 1
    python benchmarks/scripts/allocator_speed.py --arms default,tuned,jemalloc,tcmalloc ...   # preloaded allocators

mallopt settings hold for a whole process and cannot be taken back, so the two arms cannot share one process the way
the other speed scripts interleave candidates. Each round (``--pairs`` of them) starts one fresh process per arm, in
reversed order every other round (ABBA for two arms), each building the same model from the same seed, warming up,
then timing ``--steps`` calls; each ratio is taken round by round (of the arms' per-process medians) and
summarised as the median over rounds. Also reported: minor page faults per timed call (getrusage), which do not
depend on the machine's load. ``--mode train``: one AdamW step of the train form (channels-last, cross-entropy) on a
fixed batch; ``--mode infer``: the BN-fused, traced deploy form that ``uniform-vit bench`` times. ``--arms`` adds
jemalloc and tcmalloc (glibc left alone, the library preloaded with LD_PRELOAD; Debian packages libjemalloc2 and
libtcmalloc-minimal4); every ratio is against 'default', round by round.
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

ARMS = ('default', 'tuned', 'jemalloc', 'tcmalloc')
PRELOADS = {'jemalloc': 'libjemalloc.so.2', 'tcmalloc': 'libtcmalloc_minimal.so.4'}
DEBIAN = {'jemalloc': 'libjemalloc2', 'tcmalloc': 'libtcmalloc-minimal4'}


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
    p.add_argument('--pairs', type=int, default=4, help='rounds: one process per arm each')
    p.add_argument('--arms', default='default,tuned', help=f"comma list from {','.join(ARMS)}, 'default' first")
    p.add_argument('--worker', choices=('default', 'tuned'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.mode == 'infer' and (args.compile or args.bf16):
        p.error('--compile and --bf16 apply to --mode train')
    arms = [a.strip() for a in args.arms.split(',') if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or len(arms) < 2 or arms[0] != 'default' or len(set(arms)) != len(arms):
        p.error(f"--arms: 'default' first, then at least one of {', '.join(ARMS[1:])}, no repeats (got {args.arms!r})")
    base_env = {k: v for k, v in os.environ.items() if k not in ('UNIFORM_VIT_MALLOC', 'LD_PRELOAD')}
    envs = {a: base_env | ({'LD_PRELOAD': _preload(a)} if a in PRELOADS else {}) for a in arms}
    passthrough = sys.argv[1:]
    results: dict[str, list[dict]] = {a: [] for a in arms}
    chans = f"in_chans {args.in_chans}, " if args.mode == 'train' else ''
    print(f"{args.mode}: {args.model}, {args.img_size} px, batch {args.batch_size}, {chans}"
          f"{args.threads} threads{', compiled' if args.compile else ''}{', bf16 autocast' if args.bf16 else ''}; "
          f"{args.pairs} rounds of one process per arm (order reversed every other round), "
          f"{args.warmup} warm-up + {args.steps} timed calls each")
    for i in range(args.pairs):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            worker_arm = 'tuned' if arm == 'tuned' else 'default'  # a preloaded allocator runs untouched
            out = subprocess.run([sys.executable, __file__, *passthrough, '--worker', worker_arm], env=envs[arm],
                                 check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
        d = results['default'][-1]
        print(f"round {i + 1}: " + ', '.join(
            f"{a} {results[a][-1]['median_s'] * 1e3:.1f} ms ({results[a][-1]['faults_per_call']:.0f} faults/call"
            + (f", {d['median_s'] / results[a][-1]['median_s']:.3f}x)" if a != 'default' else ')') for a in arms),
            flush=True)
    med = {a: statistics.median(r['median_s'] for r in v) for a, v in results.items()}
    line = f"median over rounds: default {args.batch_size / med['default']:.0f} img/s"
    for a in arms[1:]:
        ratios = [d['median_s'] / t['median_s'] for d, t in zip(results['default'], results[a])]
        line += (f"; {a} {args.batch_size / med[a]:.0f} img/s, speed-up {statistics.median(ratios):.3f}x "
                 f"(rounds {min(ratios):.3f}-{max(ratios):.3f}x)")
    print(line)


def _preload(arm: str) -> str:
    """Path of the shared library that LD_PRELOAD needs for ``arm`` (Debian: libjemalloc2, libtcmalloc-minimal4)."""
    import ctypes.util
    import glob

    name = PRELOADS[arm]
    for pattern in (f'/usr/lib/*-linux-gnu/{name}', f'/usr/lib/{name}', f'/usr/local/lib/{name}'):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    found = ctypes.util.find_library(name.split('.so')[0].removeprefix('lib'))
    if found:
        return found
    raise SystemExit(f"--arms {arm}: {name} not found (Debian: apt-get install {DEBIAN[arm]})")


if __name__ == '__main__':
    main()
