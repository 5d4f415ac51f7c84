"""``torch.compile`` with and without Inductor's frozen-weights inference mode, next to the traced deploy form.

    python benchmarks/scripts/compile_freezing.py --models uniform_t,efficientvit_m0 --rounds 10

Each model's deploy form (``reparameterize``) three ways, interleaved in one process (1 thread, batch 16, 224 px,
one untimed call before each timed one): ``torch.jit.trace`` (the paper method, ``bench --backend jit``), plain
``torch.compile``, and ``torch.compile`` called with ``torch._inductor.config.freezing`` on, which is what
``uniform-vit bench --backend compile`` now does on CPU. Prints ms per batch, nominal GFLOP/s, and the paired
speed-ups of frozen over plain compile and of frozen compile over the trace, and, for models given as (ours,
peer) pairs, each pair's speed-up under every way. Needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import uniform_vit  # noqa: F401  (registers uniform_*)
from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.bench.models import BenchSettings, _bind, make_runner, nominal_flops
from uniform_vit.layers.fuse import reparameterize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', default='uniform_t,efficientvit_m0')
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--batch-size', type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, 3, 224, 224)
    settings = BenchSettings(models=args.models.split(','), backend='compile')
    calls, flops = {}, {}
    for name in settings.models:
        model = timm.create_model(name).eval()
        flops[name] = nominal_flops(model, (3, 224, 224)) * args.batch_size
        model = reparameterize(model)
        with torch.inference_mode():
            model(x)
            calls[f'{name} jit'] = _bind(torch.jit.trace(model, x, check_trace=False), x, settings)
        calls[f'{name} compile'] = _bind(torch.compile(model, dynamic=False), x, settings)
        # a copy: Dynamo would hand the same module its cached plain graph instead of compiling a frozen one
        frozen = make_runner(copy.deepcopy(model), 'compile', x, settings, '.')
        calls[f'{name} compile frozen'] = _bind(frozen, x, settings)
        for key in (f'{name} compile', f'{name} compile frozen'):
            calls[key]()  # compile outside the timed rounds
    times = interleaved_timing(calls, rounds=args.rounds, warmup=2, rewarm=1)
    print(f'1 thread, batch {args.batch_size}, 224 px, {args.rounds} interleaved rounds, torch {torch.__version__}')
    for key, t in times.items():
        name = key.split()[0]
        print(f'{key:34s} {median(t) * 1e3:7.2f} ms  {flops[name] / median(t) / 1e9:6.1f} GFLOP/s')
    for name in settings.models:
        frozen = times[f'{name} compile frozen']
        print(f'{name}: frozen compile {paired_ratio(frozen, times[f"{name} compile"]):.3f}x plain compile, '
              f'{paired_ratio(frozen, times[f"{name} jit"]):.3f}x the trace')
    models = settings.models
    for a, b in zip(models[::2], models[1::2]):  # models given as (ours, peer) pairs
        print(f'{a} over {b}: ' + ', '.join(f'{way} {paired_ratio(times[f"{a} {way}"], times[f"{b} {way}"]):.3f}x'
                                            for way in ('jit', 'compile', 'compile frozen')))


if __name__ == '__main__':
    main()
