"""Measurements behind docs/deploy.md: int8 calibration study (accuracy and speed) and peak memory per runtime.

    python -m uniform_vit.export.bench int8 --checkpoint fm.safetensors --json int8.json
    python -m uniform_vit.export.bench memory --checkpoint fm.safetensors --json mem.json
    python -m uniform_vit.export.bench parity --img-size 224 --json parity.json

Speed is onnxruntime on one thread, interleaved rounds and medians (``bench.harness``). Peak memory is the peak
resident set size (VmHWM) of a fresh subprocess per runtime that imports only what that runtime needs (onnxruntime alone
for ONNX), so the numbers are what a device would see, not this process's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..bench.harness import interleaved_timing, median, paired_ratio, spread

# (name, method, per_channel): the calibration settings compared by the study
INT8_CONFIGS = (('minmax', 'minmax', True), ('entropy', 'entropy', True), ('percentile', 'percentile', True),
                ('percentile, per-tensor', 'percentile', False))


def _environment() -> dict:
    import platform

    import onnxruntime

    from ..hardware import cpu_flags, cpu_name

    flags = cpu_flags()
    return dict(cpu=cpu_name(), avx512_vnni=None if flags is None else 'avx512_vnni' in flags,
                torch=torch.__version__, onnxruntime=onnxruntime.__version__,
                python=platform.python_version(), threads=1)


def _accuracy(fn, batches: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        pred = torch.cat([fn(x).argmax(1) for x in batches])
    return round(100.0 * float((pred == labels).float().mean()), 2), pred


def int8_study(checkpoint: str, calib_samples: int = 512, eval_samples: int = 10000, rounds: int = 15,
               configs: tuple = INT8_CONFIGS, dataset: str = 'fashion-mnist', img_size: int | None = None) -> dict:
    """fp32 vs int8 (each calibration setting): test top-1, agreement with fp32, single-thread speed at batch 1/16.

    ``img_size`` other than the checkpoint's measures speed at that size (accuracy there is not the model's own);
    ``eval_samples=0`` skips accuracy.
    """
    from ..layers.fuse import reparameterize
    from ..utils.checkpoint import model_from_checkpoint
    from .images import eval_stats, image_dataset, sample_batches
    from .model import default_img_size, input_channels
    from .onnx import OrtRunner, export_onnx
    from .quant import quantize_int8

    torch.set_num_threads(1)
    model, meta = model_from_checkpoint(checkpoint)
    fused = reparameterize(model)
    chans, size = input_channels(fused), img_size or default_img_size(model, meta)
    mean, std = eval_stats(meta, model, chans, dataset)
    test = image_dataset(dataset, size, chans, mean, std, split='test')
    n = min(eval_samples, len(test))
    idx = np.random.default_rng(0).permutation(len(test))[:max(n, 16)]
    labels = torch.tensor([test.targets[int(i)] for i in idx])
    evals = sample_batches(test, max(n, 16), 100, seed=0)  # same permutation as idx
    calib = sample_batches(image_dataset(dataset, size, chans, mean, std, split='train'), calib_samples, 32, seed=0)
    out = dict(environment=_environment(), checkpoint=str(checkpoint), model=meta.get('model'), input_size=size,
               in_chans=chans, calib_images=sum(len(c) for c in calib), calib_split='train', eval_images=n,
               eval_split='test', rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(fused, Path(tmp) / 'fp32.onnx', (chans, size, size))
        runners = {'fp32': OrtRunner(fp32_path)}
        acc_torch, _ = _accuracy(fused, evals, labels) if n else (None, None)
        acc_fp32, pred_fp32 = _accuracy(runners['fp32'], evals, labels) if n else (None, None)
        out.update(top1_pytorch=acc_torch, top1_onnx_fp32=acc_fp32,
                   fp32_size_mb=round(fp32_path.stat().st_size / 1e6, 3))
        for name, method, per_channel in configs:
            path = quantize_int8(fp32_path, Path(tmp) / f'int8_{len(runners)}.onnx', (c.numpy() for c in calib),
                                 method=method, per_channel=per_channel)
            runners[name] = OrtRunner(path)
            if not n:
                continue
            acc, pred = _accuracy(runners[name], evals, labels)
            out['rows'].append(dict(config=name, method=method, per_channel=per_channel, top1=acc,
                                    drop=round(acc_fp32 - acc, 2),
                                    agreement=round(100.0 * float((pred == pred_fp32).float().mean()), 2),
                                    size_mb=round(path.stat().st_size / 1e6, 3)))
        for batch in (1, 16):
            x = torch.cat(evals)[:batch].numpy()
            xt = torch.from_numpy(x)
            fns = {k: (lambda r=r, x=x: r.run_numpy(x)) for k, r in runners.items()}
            fns['pytorch eager fp32'] = lambda xt=xt: fused(xt)
            with torch.no_grad():
                times = interleaved_timing(fns, rounds=rounds, warmup=3, inner=max(1, 20 // batch))
            # speed-up: median over rounds of the per-round ratio (load bursts hit both sides of a round alike)
            out[f'ms_batch{batch}'] = {k: dict(ms=round(median(v) * 1e3, 3), spread=round(spread(v), 3),
                                               speedup_vs_ort_fp32=round(paired_ratio(v, times['fp32']), 2))
                                       for k, v in times.items()}
    return out


# ---- parity of every variant -------------------------------------------------------------------------------------

def parity_table(img_size: int = 224, seed: int = 0) -> dict:
    """ONNX (onnxruntime) vs PyTorch for every uniform_* variant, random weights with non-trivial BatchNorm
    statistics (freshly initialised UniForm zero-inits its residual BNs, whose tiny logits would flatter the diff)."""
    import timm

    from ..layers.fuse import reparameterize
    from ..models.uniform import VARIANTS
    from .onnx import OrtRunner, check_onnx, export_onnx

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            model = timm.create_model(name, num_classes=1000)
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                    m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            fused = reparameterize(model)
            path = export_onnx(fused, Path(tmp) / f'{name}.onnx', (3, img_size, img_size))
            runner, facts = OrtRunner(path), check_onnx(path)
            row = dict(model=name, img_size=img_size, opset=facts['opset'], size_mb=facts['size_mb'])
            for b in (1, 3):
                x = torch.randn(b, 3, img_size, img_size, generator=g)
                with torch.no_grad():
                    ref = fused(x)
                row[f'max_abs_diff_b{b}'] = float((runner(x) - ref).abs().max())
                row['max_abs_logit'] = round(float(ref.abs().max()), 2)
            rows.append(row)
    return dict(environment=_environment(), rows=rows)


# ---- peak memory ---------------------------------------------------------------------------------------------------

# VmHWM (this address space's peak RSS), not getrusage's ru_maxrss: that one survives exec, so a child spawned by a
# large parent would report the parent's peak
_PRELUDE = """
import sys, json
def peak_mib():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
"""

_CODE = {
    'onnxruntime': _PRELUDE + """
import numpy as np, onnxruntime as ort
base = peak_mib()
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])
x = np.random.default_rng(0).standard_normal((int(sys.argv[2]), *json.loads(sys.argv[3])), dtype=np.float32)
for _ in range(5):
    s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps(dict(base_mib=base, peak_mib=peak_mib())))
""",
    'torch-jit': _PRELUDE + """
import torch, warnings
warnings.simplefilter('ignore')
torch.set_num_threads(1)
base = peak_mib()
m = torch.jit.load(sys.argv[1]).eval()
x = torch.randn(int(sys.argv[2]), *json.loads(sys.argv[3]))
with torch.no_grad():
    for _ in range(5):
        m(x)
print(json.dumps(dict(base_mib=base, peak_mib=peak_mib())))
""",
    'torch-eager': _PRELUDE + """
import torch
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.utils.checkpoint import model_from_checkpoint
torch.set_num_threads(1)
base = peak_mib()
m = reparameterize(model_from_checkpoint(sys.argv[1])[0])
x = torch.randn(int(sys.argv[2]), *json.loads(sys.argv[3]))
with torch.no_grad():
    for _ in range(5):
        m(x)
print(json.dumps(dict(base_mib=base, peak_mib=peak_mib())))
""",
}


def peak_memory(runtime: str, path: str | Path, batch: int, input_size: tuple[int, int, int]) -> dict:
    """Peak RSS (MiB) of a fresh process running ``path`` at ``batch``; ``base_mib`` is the peak after imports."""
    r = subprocess.run([sys.executable, '-c', _CODE[runtime], str(path), str(batch), json.dumps(list(input_size))],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(f"{runtime} memory run failed: {r.stderr.strip().splitlines()[-1:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(runtime=runtime, batch=batch, base_mib=round(res['base_mib'], 1), peak_mib=round(res['peak_mib'], 1),
                model_mib=round(res['peak_mib'] - res['base_mib'], 1))


def memory_table(checkpoint: str, batches: tuple[int, ...] = (1, 16), calib_samples: int = 256,
                 img_size: int | None = None) -> dict:
    """Peak RSS for PyTorch eager, TorchScript, onnxruntime fp32 and int8 at each batch size."""
    from ..layers.fuse import reparameterize
    from ..utils.checkpoint import model_from_checkpoint
    from .images import eval_stats, image_dataset, sample_batches
    from .model import default_img_size, input_channels
    from .onnx import export_onnx
    from .quant import quantize_int8
    from .torchscript import export_torchscript

    model, meta = model_from_checkpoint(checkpoint)
    fused = reparameterize(model)
    chans, size = input_channels(fused), img_size or default_img_size(model, meta)
    shape = (chans, size, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(fused, Path(tmp) / 'fp32.onnx', shape)
        mean, std = eval_stats(meta, model, chans, meta.get('dataset'))
        calib = sample_batches(image_dataset(meta.get('dataset') or 'fashion-mnist', size, chans, mean, std),
                               calib_samples, 32)
        int8 = quantize_int8(fp32, Path(tmp) / 'int8.onnx', (c.numpy() for c in calib))
        jit = export_torchscript(fused, Path(tmp) / 'm.pt', shape)
        for batch in batches:
            for label, runtime, path in (('PyTorch eager fp32', 'torch-eager', checkpoint),
                                         ('TorchScript fp32', 'torch-jit', jit),
                                         ('onnxruntime fp32', 'onnxruntime', fp32),
                                         ('onnxruntime int8', 'onnxruntime', int8)):
                rows.append(dict(label=label, **peak_memory(runtime, path, batch, shape)))
    return dict(environment=_environment(), checkpoint=str(checkpoint), input_size=list(shape), rows=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m uniform_vit.export.bench', description=__doc__.splitlines()[0])
    p.add_argument('what', choices=('int8', 'memory', 'parity'))
    p.add_argument('--checkpoint', default=None, help='int8, memory: the trained checkpoint')
    p.add_argument('--eval-samples', type=int, default=10000)
    p.add_argument('--calib-samples', type=int, default=512)
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--img-size', type=int, default=None,
                   help='input size (default: the checkpoint\'s; parity: 224)')
    p.add_argument('--configs', choices=('all', 'default'), default='all', help='int8: calibration settings')
    p.add_argument('--json', default=None, help='also write the result here')
    a = p.parse_args(argv)
    if a.what != 'parity' and not a.checkpoint:
        p.error(f'{a.what} needs --checkpoint')
    if a.what == 'parity':
        res = parity_table(a.img_size or 224)
    elif a.what == 'int8':
        from .quant import DEFAULT_METHOD

        configs = INT8_CONFIGS if a.configs == 'all' else ((DEFAULT_METHOD, DEFAULT_METHOD, True),)
        res = int8_study(a.checkpoint, a.calib_samples, a.eval_samples, a.rounds, configs, img_size=a.img_size)
    else:
        res = memory_table(a.checkpoint, img_size=a.img_size)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
