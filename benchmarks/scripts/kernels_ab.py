"""The C++ kernels as they are in the working tree against the same kernels at another git revision, in one process
(session 30): whole traced, fused models, or one op on the shapes UniForm's stem gives it, or on the calls a model
makes to it.

    python benchmarks/scripts/kernels_ab.py --rev HEAD~1 --models uniform_t,uniform_s --rounds 21
    python benchmarks/scripts/kernels_ab.py --rev HEAD~1 --op stem_conv --cold     # the first stem conv alone
    python benchmarks/scripts/kernels_ab.py --rev HEAD~1 --op depthwise_conv       # uniform_t's 24 depthwise calls
    python benchmarks/scripts/kernels_ab.py --rev tree --define DEPTHWISE_PIXELS   # a compile-time switch

The revision must take the same op arguments as the working tree's Python code passes (session 31's ops take maps
where session 30's took token rows: compare whole models across that change with ``deploy_variants.py``).

The revision's ``layers/csrc`` sources are built a second time under another operator namespace
(``uniform_vit_ab``), so both versions live in the process at once; a model traced while ``cpu_kernels`` hands out
the second namespace's ops records those. Each model: the working tree's build against the revision's, interleaved
rounds, medians, the per-round speed-up and the largest output difference (0 when the change keeps the arithmetic).

``--op stem_conv`` times the first stem conv on 16 images at 224 px in four parts of 4 (how ``DeployStem`` runs a
batch on AVX-512), 8 output channels; ``--cold`` writes 64 MB between calls so that the images come from memory, as
a new batch does in the model, instead of from cache. ``--op conv3x3_s2`` times uniform_t's three later stem convs
on one part. Any other op (``--op depthwise_conv``, ``reuse_core``, ...) is timed on the arguments of every call the
first of ``--models`` makes to it in one forward pass of 16 images. ``--rev tree --define A,B`` builds the working
tree itself with those macros as the second version. Both builds take a minute or two the first time (cached
afterwards, like the library's own).
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import tempfile
import time
from pathlib import Path

import timm
import torch

from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers import cpu_kernels
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.utils.malloc import tune_allocator

NS = 'uniform_vit_ab'


def build_revision(rev: str, defines: list[str] = ()) -> None:
    """The library's sources at ``rev`` (``tree``: the working tree's) built as ``torch.ops.uniform_vit_ab``, with
    ``-D`` for each of ``defines`` (compile-time switches such as ``DEPTHWISE_PIXELS``)."""
    from torch.utils.cpp_extension import load

    root = Path(cpu_kernels.__file__).resolve().parents[3]
    csrc = Path(cpu_kernels.__file__).resolve().parent / 'csrc'
    rel = csrc.relative_to(root).as_posix()
    git = ['git', '-C', str(root)]
    if rev == 'tree':
        sha = 'tree' + '_'.join(defines).lower()
        names = sorted(p.name for p in csrc.iterdir())
        read = lambda name: (csrc / name).read_text()  # noqa: E731
    else:
        sha = subprocess.run([*git, 'rev-parse', rev], capture_output=True, text=True, check=True).stdout.strip()
        names = subprocess.run([*git, 'ls-tree', '--name-only', f'{sha}:{rel}/'], capture_output=True, text=True,
                               check=True).stdout.split()
        read = lambda name: subprocess.run([*git, 'show', f'{sha}:{rel}/{name}'], capture_output=True,  # noqa: E731
                                           text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp())
    for name in names:
        src = read(name)
        src = re.sub(r'TORCH_LIBRARY(_FRAGMENT|_IMPL)?\(uniform_vit,', rf'TORCH_LIBRARY\1({NS},', src)
        (tmp / name).write_text(src)
    isa = torch.backends.cpu.get_cpu_capability()
    load(name=f'{NS}_{isa.lower()}_{sha[:10]}', sources=[str(p) for p in sorted(tmp.glob('*.cpp'))],
         extra_cflags=['-O3', '-fopenmp', *cpu_kernels._ISA_FLAGS[isa], *(f'-D{d}' for d in defines)],
         extra_ldflags=['-fopenmp'],
         is_python_module=False, verbose=False)


def time_models(names: list[str], rounds: int) -> None:
    x = torch.randn(16, 3, 224, 224)
    shipped = cpu_kernels._recordable_op
    for name in names:
        base = reparameterize(timm.create_model(name).eval())
        fns = {}
        with torch.no_grad():
            for k in ('tree', 'rev'):
                if k == 'rev':  # the trace records whichever op cpu_kernels hands out
                    cpu_kernels._recordable_op = lambda op: getattr(getattr(torch.ops, NS), op)
                try:
                    fns[k] = lambda tm=torch.jit.trace(copy.deepcopy(base), x): tm(x)
                finally:
                    cpu_kernels._recordable_op = shipped
        with torch.inference_mode():
            err = (fns['tree']() - fns['rev']()).abs().max().item()
            t = interleaved_timing(fns, rounds=rounds, warmup=2)
        print(f'{name}: working tree {median(t["tree"]) * 1e3:.2f} ms, revision {median(t["rev"]) * 1e3:.2f} ms, '
              f'speed-up {paired_ratio(t["tree"], t["rev"]):.3f}x; max |diff| {err:.1e}', flush=True)


def model_calls(model: str, op: str) -> tuple[list[tuple], int]:
    """The arguments of every call the fused ``model`` makes to ``uniform_vit::op`` in one forward pass of 16 images
    at 224 px, and their FLOPs (the op's registered formula)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    target = getattr(torch.ops.uniform_vit, op).default
    calls: list[tuple] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == target:
                calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            return func(*args, **(kwargs or {}))

    m = reparameterize(timm.create_model(model).eval())
    with torch.inference_mode(), Record():
        m(torch.randn(16, 3, 224, 224))
    if not calls:
        raise SystemExit(f'{model} makes no call to uniform_vit::{op}')
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        for a in calls:
            target(*a)
    return calls, fc.get_total_flops()


def time_op(op: str, rounds: int, cold: bool, model: str = 'uniform_t') -> None:
    ops = {'tree': getattr(torch.ops.uniform_vit, op), 'rev': getattr(getattr(torch.ops, NS), op)}
    if op == 'stem_conv':
        x, w, b = torch.randn(16, 3, 224, 224), torch.randn(8, 3, 3, 3), torch.randn(8)
        calls = [(p, w, b, True) for p in x.tensor_split(4)]
        flops, what = 2 * 16 * 112 * 112 * 8 * 27, 'first stem conv, 16 images in 4 parts, 3 -> 8 at 224 px'
    elif op == 'conv3x3_s2':
        calls, flops = [], 0
        for cin, cout, s in ((8, 16, 112), (16, 32, 56), (32, 64, 28)):  # uniform_t's later stem convs, one part
            calls.append((torch.randn(4, cin, s, s).contiguous(memory_format=torch.channels_last),
                          torch.randn(3, 3, cin, cout), torch.randn(cout), True))
            flops += 2 * 4 * (s // 2) ** 2 * 9 * cin * cout
        what = "uniform_t's stem convs 2-4 on 4 images"
    else:
        calls, flops = model_calls(model, op)
        what = f"the {len(calls)} calls {model}'s forward makes at batch 16"
    junk = torch.zeros(16 * 1024 * 1024)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(rounds + 2):
        for k, f in ops.items():
            if cold:
                junk.add_(1.0)  # 64 MB written: the inputs leave the caches
            t0 = time.perf_counter()
            for a in calls:
                f(*a)
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    print(f'{op} ({what}; {"cold" if cold else "warm"} inputs, {rounds} rounds):')
    for k, t in times.items():
        print(f'  {k:5s} {median(t) * 1e3:7.3f} ms, {flops / median(t) / 1e9:6.1f} GFLOP/s, '
              f'speed-up over the revision {paired_ratio(t, times["rev"]):.3f}x')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rev', default='HEAD', help="git revision to compare the working tree with ('tree': the working "
                    "tree itself, with --define)")
    ap.add_argument('--define', default='', help='comma list of macros defined in the revision\'s build')
    ap.add_argument('--models', default='uniform_t', help='comma list of models (with --op: whose calls to time)')
    ap.add_argument('--op', default='', help="time one op instead: stem_conv or conv3x3_s2 (the stem's shapes), or "
                    "any other op of the library on the calls the first of --models makes")
    ap.add_argument('--cold', action='store_true', help='with --op: inputs from memory, not cache')
    ap.add_argument('--rounds', type=int, default=21)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    if not cpu_kernels._load():
        raise SystemExit(f'the C++ kernels are off: {cpu_kernels.status()}')
    defines = [d for d in args.define.split(',') if d]
    build_revision(args.rev, defines)
    print(f'working tree against {args.rev}{" with -D" + " -D".join(defines) if defines else ""}, 1 thread, '
          f'{torch.backends.cpu.get_cpu_capability()}')
    if args.op:
        time_op(args.op, args.rounds, args.cold, args.models.split(',')[0])
    else:
        time_models(args.models.split(','), args.rounds)


if __name__ == '__main__':
    main()
