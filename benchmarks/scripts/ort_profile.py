"""Where onnxruntime spends a model's time, per convolution shape, and how the stem compares with the rest.

    python benchmarks/scripts/ort_profile.py --model uniform_t

Exports the deploy form as ``uniform-vit bench --backend onnxruntime`` does (stem widened to this machine's channel
block), runs it with onnxruntime's profiler on one thread at batch 16, 224 px, and prints each node kind's share of
the time, each convolution shape's achieved GFLOP/s (from the exported, widened shapes), and the nominal-FLOP rate
of the stem (``patch_embed``) against the rest of the network, as a share of this machine's matmul peak (measured
first, as ``uniform-vit bench`` does; ``--peak`` GFLOP/s overrides it). Profiled calls run a few percent slower than
unprofiled ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
import timm
import torch

import uniform_vit  # noqa: F401  (registers uniform_*)
from uniform_vit.bench.machine import calibrate_matmul_peak
from uniform_vit.bench.models import nominal_flops
from uniform_vit.export.onnx import export_onnx, ort_channel_block
from uniform_vit.layers.fuse import reparameterize


def _shape(entry: dict) -> list[int]:
    return list(next(iter(entry.values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='uniform_t')
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--calls', type=int, default=20)
    ap.add_argument('--peak', type=float, help='GFLOP/s (default: measured here, as uniform-vit bench does)')
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peak is None:
        op, shape, peak = calibrate_matmul_peak()
        args.peak = peak / 1e9
        print(f'matmul peak {args.peak:.0f} GFLOP/s ({op} {shape})')
    model = timm.create_model(args.model).eval()
    flops = nominal_flops(model, (3, 224, 224)) * args.batch_size
    stem_flops = nominal_flops(model.patch_embed, (3, 224, 224)) * args.batch_size
    fused = reparameterize(model)
    stem_convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.patch_embed.modules())
    tmp = tempfile.mkdtemp()
    path = export_onnx(fused, os.path.join(tmp, 'm.onnx'), input_size=(3, 224, 224), align_channels=ort_channel_block())
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, 'prof')
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((args.batch_size, 3, 224, 224), dtype=np.float32)
    for _ in range(5):
        sess.run(None, {'input': x})
    t0 = time.perf_counter()
    for _ in range(args.calls):
        sess.run(None, {'input': x})
    wall = (time.perf_counter() - t0) / args.calls
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    # only the timed calls: the node events inside the last `calls` model runs, in execution order
    runs = sorted((e['ts'], e['ts'] + e['dur']) for e in events if e.get('name') == 'model_run')[-args.calls:]
    calls = len(runs)

    def run_of(ts: int) -> int | None:
        return next((i for i, (start, end) in enumerate(runs) if start <= ts <= end), None)

    nodes = sorted(((run_of(e['ts']), e['ts'], i, e) for i, e in enumerate(events)
                    if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')), key=lambda t: t[1:3])
    by_kind, conv_t, conv_n, conv_f = collections.Counter(), collections.Counter(), collections.Counter(), {}
    stem_us, convs_seen, current = 0.0, 0, None
    for run, _, _, e in nodes:
        if run is None:  # a warm-up call
            continue
        a = e['args']
        if run != current:  # a new call: count its stem again
            current, convs_seen = run, 0
        if convs_seen < stem_convs:  # the stem: every node up to its last conv (reorders included)
            stem_us += e['dur']
        by_kind[a['op_name']] += e['dur']
        if a['op_name'] == 'Conv':
            convs_seen += 1
            x_s, w_s = _shape(a['input_type_shape'][0]), _shape(a['input_type_shape'][1])
            key = f'{x_s} w{w_s}'
            conv_t[key] += e['dur']
            conv_n[key] += 1
            conv_f[key] = 2 * math.prod(_shape(a['output_type_shape'][0])) * math.prod(w_s[1:])
    total = sum(by_kind.values())
    print(f'{args.model}, onnxruntime {ort.__version__}, 1 thread, batch {args.batch_size}: {wall * 1e3:.2f} ms per '
          f'call (profiled), {flops / wall / 1e9:.0f} GFLOP/s nominal = {100 * flops / wall / 1e9 / args.peak:.0f} % '
          f'of {args.peak:g}')
    for kind, us in by_kind.most_common(8):
        print(f'  {kind:20s} {us / calls / 1e3:6.2f} ms  {100 * us / total:5.1f} %')
    print('convolutions (exported shapes; GFLOP/s of the work done, widened stem channels included):')
    for key, us in conv_t.most_common(14):
        per = us / conv_n[key]
        print(f'  {key:44s} {us / calls / 1e3:6.2f} ms  x{conv_n[key] // calls:<3d} '
              f'{conv_f[key] / per / 1e3:6.1f} GFLOP/s')
    stem_s, rest_s = stem_us / calls / 1e6, (total - stem_us) / calls / 1e6
    for name, f, s in (('stem', stem_flops, stem_s), ('rest', flops - stem_flops, rest_s)):
        print(f'{name}: {100 * f / flops:4.1f} % of the nominal FLOPs, {100 * s / (stem_s + rest_s):4.1f} % of the '
              f'node time, {f / s / 1e9:5.0f} GFLOP/s = {100 * f / s / 1e9 / args.peak:3.0f} % of peak')


if __name__ == '__main__':
    main()
