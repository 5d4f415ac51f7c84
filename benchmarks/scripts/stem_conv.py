"""The deploy stem's first layer two ways, interleaved in one process (session 17): ATen's (the image copied to
channels-last, oneDNN's conv, a ReLU pass) against the C++ ``stem_conv`` op (``layers/csrc/stem_conv.cpp``).

    python benchmarks/scripts/stem_conv.py --rounds 11
    python benchmarks/scripts/stem_conv.py --with-256 --models uniform_t,uniform_s,uniform_m,uniform_l   # session 27

One half of the bench's batch (8 images: the deploy stem splits batch 16 in two), 224 px, 1 thread; output widths
8 / 16 / 24 (uniform_t, uniform_s/m, uniform_l), 3 input channels (RGB) and 1 (Fashion-MNIST).

``--with-256`` (AVX-512 machines): also a second build of the same source with ``-DSTEM_CONV_256``, the op's
256-bit AVX2 code, registered under another namespace, so the 512-bit and 256-bit versions are timed side by side.
``--models``: then the whole traced, fused models (batch 16), once with each version of the op in their stems and
once with the first stem layer left to ``DeployStem``'s other path (``stem_kernel = False``: a channels-last copy of
the image, then the 3x3 conv op or oneDNN).
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from uniform_vit.bench.harness import interleaved_timing, median, paired_ratio
from uniform_vit.layers import cpu_kernels
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.models.uniform import DeployStem, _to_channels_last
from uniform_vit.utils.malloc import tune_allocator


def build_256():
    """The op's 256-bit code as ``torch.ops.uniform_vit_stem256.stem_conv`` (same source, -DSTEM_CONV_256)."""
    from torch.utils.cpp_extension import load

    src = (Path(cpu_kernels.__file__).with_name('csrc') / 'stem_conv.cpp').read_text()
    src = re.sub(r'TORCH_LIBRARY_(FRAGMENT|IMPL)\(uniform_vit,', r'TORCH_LIBRARY_\1(uniform_vit_stem256,', src)
    path = Path(tempfile.mkdtemp()) / 'stem_conv_256.cpp'
    path.write_text('#define STEM_CONV_256\n' + src)
    isa = torch.backends.cpu.get_cpu_capability()
    load(name=f'uniform_vit_stem256_{isa.lower()}', sources=[str(path)],
         extra_cflags=['-O3', '-fopenmp', *cpu_kernels._ISA_FLAGS[isa]], extra_ldflags=['-fopenmp'],
         is_python_module=False, verbose=False)
    return torch.ops.uniform_vit_stem256.stem_conv


def time_layers(ops: dict, args) -> None:
    print(f'first stem layer, batch {args.batch_size}, {args.img_size} px, 1 thread, {args.rounds} interleaved rounds '
          f'({torch.backends.cpu.get_cpu_capability()}); GFLOP/s and speed-up over ATen')
    for cout in cpu_kernels.STEM_CHANNELS:
        for cin in (3, 1):
            g = torch.Generator().manual_seed(cout + cin)
            x = torch.randn(args.batch_size, cin, args.img_size, args.img_size, generator=g)
            w, b = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
            fns = {'aten': lambda a=(x, w, b): F.conv2d(_to_channels_last(a[0]), a[1], a[2], 2, 1).relu_()}
            fns.update({k: (lambda a=(x, w, b), op=op: op(*a, True)) for k, op in ops.items()})
            with torch.inference_mode():
                ref = fns['aten']()
                err = max((fns[k]() - ref).abs().max().item() for k in ops)
                times = interleaved_timing(fns, rounds=args.rounds, warmup=2)
            oh = (args.img_size + 1) // 2
            flops = 2 * args.batch_size * oh * oh * cout * cin * 9
            cols = ', '.join(f'{k} {flops / median(t) / 1e9:5.1f} ({paired_ratio(t, times["aten"]):.2f}x)'
                             for k, t in times.items())
            print(f'  Cin {cin} Cout {cout:2d}: {cols}; max |diff| {err:.1e}')


def time_models(names: list[str], ops: dict, rounds: int) -> None:
    x = torch.randn(16, 3, 224, 224)
    print(f'whole traced, fused models, batch 16, 1 thread, {rounds} interleaved rounds; '
          f'speed-up over "{next(iter(ops))}"')
    for name in names:
        base = reparameterize(timm.create_model(name).eval())
        fns = {}
        with torch.no_grad():
            for k in [*ops, 'no stem op']:
                m = copy.deepcopy(base)
                for s in m.modules():
                    if isinstance(s, DeployStem) and k == 'no stem op':
                        s.stem_kernel = False
                shipped, op = cpu_kernels.stem_conv, ops.get(k)
                if op is not None:  # the trace records whichever op the stem asks for
                    cpu_kernels.stem_conv = lambda op=op: op
                try:
                    fns[k] = lambda tm=torch.jit.trace(m, x): tm(x)
                finally:
                    cpu_kernels.stem_conv = shipped
        with torch.inference_mode():
            ref = fns['no stem op']()
            err = max((f() - ref).abs().max().item() for f in fns.values())
            times = interleaved_timing(fns, rounds=rounds, warmup=2)
        first = times[next(iter(ops))]
        print(f'  {name}: ' + ', '.join(f'{k} {median(t) * 1e3:.2f} ms ({paired_ratio(t, first):.3f}x)'
                                      for k, t in times.items()) + f'; max |diff| {err:.1e}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rounds', type=int, default=11)
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--img-size', type=int, default=224)
    ap.add_argument('--with-256', action='store_true', help="also the op's 256-bit code (AVX-512 machines)")
    ap.add_argument('--models', default='', help='comma list: also time these whole models with each version')
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    op = cpu_kernels.stem_conv()
    if op is None:
        raise SystemExit(f'the C++ kernels are {cpu_kernels.status()}')
    ops = {'op': op}
    if args.with_256:
        if torch.backends.cpu.get_cpu_capability() != 'AVX512':
            raise SystemExit('--with-256 compares the AVX-512 build with its 256-bit code: this CPU builds AVX2 only')
        ops = {'op 256-bit': build_256(), 'op 512-bit': op}
    time_layers(ops, args)
    if args.models:
        time_models([n for n in args.models.split(',') if n], ops, args.rounds)


if __name__ == '__main__':
    main()
