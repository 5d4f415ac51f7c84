"""``uniform-vit export``: deploy-form model -> ONNX (optionally int8) or TorchScript, with a parity check."""

from __future__ import annotations

import argparse
import json

from ._common import positive_int

FORMATS = ('onnx', 'torchscript', 'executorch')
HELP = 'Export a model (fused deploy form) to ONNX, int8 ONNX, TorchScript or ExecuTorch and check it matches PyTorch.'
EXAMPLES = """examples:
  uniform-vit export --model uniform_s --output uniform_s.onnx
  uniform-vit export --checkpoint runs/fm/model.safetensors --output fm.onnx --img-size 64
  uniform-vit export --checkpoint fm.safetensors --output fm_int8.onnx --int8 --calib-data fashion-mnist
  uniform-vit export --model uniform_t --format torchscript --output uniform_t.pt
  uniform-vit export --checkpoint fm.safetensors --format executorch --output fm.pte   (pip install executorch)

The exported fp32 model must match PyTorch within 1e-4 (max abs logit difference) on random and real images, else the
command exits with status 1. --calib-data is a folder of images or a built-in set (fashion-mnist, cifar10, cifar100;
its train split); it also supplies the real images for the parity check (default: Fashion-MNIST test images)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', default=None, help='timm model name (default: the one the checkpoint names)')
    p.add_argument('--checkpoint', default=None, help='trained weights (.safetensors/.pth); none = random weights')
    p.add_argument('--num-classes', type=positive_int, default=None, help='class count (must match the checkpoint)')
    p.add_argument('--in-chans', type=positive_int, default=None, help='input channels (default: checkpoint, else 3)')
    p.add_argument('--attn-type', default=None, help="UniForm attention kind: 'reuse' (default) or 'mha'")
    p.add_argument('--format', choices=FORMATS, default='onnx',
                   help='output format (default onnx; executorch needs pip install executorch)')
    p.add_argument('--output', '-o', required=True, help='file to write (.onnx, .pt or .pte)')
    p.add_argument('--img-size', type=positive_int, default=None,
                   help='square input size baked into the graph (default: checkpoint training size, else 224)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter\'s, 18 or newer)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--dynamic-batch', dest='dynamic_batch', action='store_true', default=True,
                   help='symbolic batch axis (default)')
    g.add_argument('--static-batch', dest='dynamic_batch', action='store_false',
                   help='batch fixed to 1 (always so for executorch)')
    p.add_argument('--int8', action='store_true', help='post-training static int8 quantization (ONNX, QDQ)')
    p.add_argument('--calib-data', default=None, help='image folder or built-in dataset for calibration and checks')
    p.add_argument('--calib-samples', type=positive_int, default=512, help='calibration images (default 512)')
    p.add_argument('--calib-method', default=None, help='minmax, entropy or percentile (default)')
    p.add_argument('--check-samples', type=positive_int, default=64, help='real images in the parity check')
    p.add_argument('--simplify', action='store_true', help='simplify the ONNX graph with onnxslim/onnxsim if installed')
    p.add_argument('--align-channels', default=None, metavar='N|auto',
                   help="ONNX: widen the stem's convs to a multiple of N channels with zero filters (exact) for "
                        "onnxruntime's blocked x86 convs; 'auto' = this machine's block (16 AVX-512, 8 AVX2)")
    p.add_argument('--json', action='store_true', help='print the report as JSON')


def export_model(model_name: str | None, output: str, fmt: str = 'onnx', checkpoint: str | None = None,
                 num_classes: int | None = None, in_chans: int | None = None, attn_type: str | None = None,
                 img_size: int | None = None, opset: int | None = None, dynamic_batch: bool = True,
                 int8: bool = False, calib_data: str | None = None, calib_samples: int = 512,
                 calib_method: str | None = None, check_samples: int = 64, simplify: bool = False,
                 align_channels: int | str | None = None) -> dict:
    """Export and verify; returns a report dict (``ok`` is False when fp32 parity exceeds the tolerance)."""
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from ..errors import UserError
    from ..export.images import eval_stats, image_dataset, sample_batches
    from ..export.model import build_model, default_img_size, input_channels
    from ..export.onnx import (
        PARITY_TOL,
        OrtRunner,
        check_onnx,
        check_opset,
        check_output_path,
        export_onnx,
        max_abs_diff,
        ort_channel_block,
        simplify_onnx,
    )
    from ..layers.fuse import count_batchnorms, reparameterize

    # cheap argument checks first, before any model is built
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != 'onnx' and (int8 or opset is not None or simplify or align_channels):
        raise UserError("--int8, --opset, --simplify and --align-channels apply to --format onnx only")
    align = None
    if align_channels is not None:
        if str(align_channels) == 'auto':
            align = ort_channel_block()
        else:
            try:
                align = int(align_channels)
            except ValueError:
                align = 0
            if align < 1:
                raise UserError(f"--align-channels takes a positive integer or 'auto', got {align_channels!r}")
    if int8 and not calib_data:
        raise UserError("--int8 needs --calib-data DIR (real images to calibrate activation ranges)")
    if calib_method is not None:
        from ..export.quant import CALIBRATION_METHODS

        if calib_method not in CALIBRATION_METHODS:
            raise UserError(f"unknown --calib-method {calib_method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    check_output_path(output)
    check_opset(opset)
    if img_size is not None and img_size < 32:
        raise UserError(f"--img-size must be at least 32 (UniForm downsamples 64x), got {img_size}")
    if fmt == 'executorch':
        dynamic_batch = False  # see export.executorch: XNNPACK programs run at batch 1
    torch.manual_seed(0)

    model, meta = build_model(model_name, checkpoint, num_classes, in_chans, attn_type)
    name = meta.get('model') or model_name
    fused = reparameterize(model)
    chans = input_channels(fused)
    size = img_size or default_img_size(model, meta)
    input_size = (chans, size, size)
    mean, std = eval_stats(meta, model, chans, calib_data)
    report = dict(model=name, checkpoint=checkpoint, format=fmt, output=str(output), input_size=list(input_size),
                  fused=count_batchnorms(fused) == 0, dynamic_batch=dynamic_batch or fmt == 'torchscript',
                  int8=int8, align_channels=align, torch=torch.__version__, tolerance=PARITY_TOL)

    # real images for the check: the calibration source's images, else Fashion-MNIST's test set when installed
    real_source = calib_data or 'fashion-mnist'
    try:
        real = sample_batches(image_dataset(real_source, size, chans, mean, std, split='test'), check_samples, 16,
                              seed=1)
    except UserError as e:
        if calib_data:
            raise
        print(f"warning: no real images for the parity check ({e}); give --calib-data DIR", file=sys.stderr)
        real = []
    rand = [torch.randn(1, *input_size), torch.randn(3, *input_size)]
    if not dynamic_batch and fmt != 'torchscript':
        rand = [torch.randn(1, *input_size)]
        real = [x[i:i + 1] for x in real[:1] for i in range(min(4, len(x)))]

    if fmt == 'torchscript':
        from ..export.torchscript import export_torchscript, load_torchscript

        export_torchscript(fused, output, input_size)
        runner = load_torchscript(output)
        report['runtime'] = 'torch.jit'
    elif fmt == 'executorch':
        from ..export.executorch import ExecuTorchRunner, export_executorch

        export_executorch(fused, output, input_size)
        runner = ExecuTorchRunner(output)
        report['runtime'] = 'executorch (xnnpack)'
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path = Path(tmp) / 'fp32.onnx' if int8 else Path(output)
            export_onnx(fused, fp32_path, input_size, opset=opset, dynamic_batch=dynamic_batch, align_channels=align)
            if simplify:
                report['simplified_with'] = simplify_onnx(fp32_path) or 'none installed (pip install onnxslim)'
            report.update(check_onnx(fp32_path))
            if opset is not None and report['opset'] != opset:
                raise UserError(f"asked for opset {opset} but the exporter wrote {report['opset']}")
            runner = OrtRunner(fp32_path)
            report['runtime'] = 'onnxruntime'
            report['max_abs_diff_random'] = max_abs_diff(fused, runner, rand)
            report['max_abs_diff_real'] = max_abs_diff(fused, runner, real) if real else None
            fp32_ok = max(v for v in (report['max_abs_diff_random'], report['max_abs_diff_real'])
                          if v is not None) <= PARITY_TOL
            if int8 and fp32_ok:  # quantizing a graph that already differs would only hide the problem
                from ..export.quant import DEFAULT_METHOD, quantize_int8

                method = calib_method or DEFAULT_METHOD
                calib_ds = image_dataset(calib_data, size, chans, mean, std, split='train')
                calib = sample_batches(calib_ds, calib_samples, 16, seed=0)
                quantize_int8(fp32_path, output, (x.numpy() for x in calib), method=method)
                report.update(calib_method=method, calib_images=sum(len(x) for x in calib))
                q = OrtRunner(output)
                report.update({k: v for k, v in check_onnx(output).items() if k in ('nodes', 'size_mb')})
                report['fp32_size_mb'] = round(fp32_path.stat().st_size / 1e6, 3)
                if real:
                    with torch.no_grad():
                        ref = torch.cat([fused(x) for x in real])
                    got = torch.cat([q(x) for x in real])
                    report['int8_max_abs_diff_real'] = float((ref - got).abs().max())
                    report['int8_top1_agreement'] = float((ref.argmax(1) == got.argmax(1)).float().mean())
    if fmt != 'onnx':
        report['max_abs_diff_random'] = max_abs_diff(fused, runner, rand)
        report['max_abs_diff_real'] = max_abs_diff(fused, runner, real) if real else None
        report['size_mb'] = round(Path(output).stat().st_size / 1e6, 3)
    worst = max(v for v in (report['max_abs_diff_random'], report['max_abs_diff_real']) if v is not None)
    report['ok'] = worst <= PARITY_TOL
    return report


def run(args: argparse.Namespace) -> int:
    import sys

    report = export_model(args.model, args.output, args.format, args.checkpoint, args.num_classes, args.in_chans,
                          args.attn_type, args.img_size, args.opset, args.dynamic_batch, args.int8, args.calib_data,
                          args.calib_samples, args.calib_method, args.check_samples, args.simplify,
                          args.align_channels)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f'export {report["model"]} -> {args.output}', show_header=False)
        for k, v in report.items():
            if v is not None:
                table.add_row(k, f'{v:.2e}' if isinstance(v, float) and v < 0.01 else str(v))
        Console().print(table)
    if not report['ok']:
        print(f"uniform-vit export: error: the exported model differs from PyTorch by more than "
              f"{report['tolerance']:g} (max abs logit difference)", file=sys.stderr)
        return 1
    return 0
