"""ONNX export of a deploy-form (fused) model, the checks that prove the file computes the same thing, and a small
onnxruntime runner for benchmarks.

The exporter is PyTorch's ``torch.export``-based one (``dynamo=True``, the default since torch 2.9): it emits opset
18 or newer and writes one self-contained ``.onnx`` file (no external-data sidecar; our models are far below 2 GB).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..utils.checkpoint import atomic_target

MIN_OPSET = 18  # the torch.export-based exporter cannot target older opsets (it silently keeps 18)
PARITY_TOL = 1e-4  # max abs logit difference accepted between onnxruntime (fp32) and PyTorch


def _require(module: str, extra: str = 'export'):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"{module} is not installed; pip install 'uniform-vit[{extra}]'") from None


def max_opset() -> int:
    """Newest opset the installed ``onnx`` package knows."""
    return int(_require('onnx').defs.onnx_opset_version())


def check_opset(opset: int | None) -> int | None:
    if opset is None:
        return None
    hi = max_opset()
    if not MIN_OPSET <= opset <= hi:
        raise UserError(f"unsupported opset {opset}: the torch.export-based ONNX exporter writes opsets "
                        f"{MIN_OPSET}..{hi} with the installed onnx")
    return opset


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, in one line, when ``path`` cannot be written (missing or read-only folder, or a folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path('.')
    if not parent.is_dir():
        raise UserError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"output {path} is not writable")
    return path


def ort_channel_block() -> int | None:
    """Channel block of onnxruntime's blocked (NCHWc) CPU convolutions on this machine: 16 with AVX-512, 8 with
    AVX2, None where onnxruntime does not block (ARM, older x86)."""
    import platform

    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    return 16 if cap.startswith('AVX512') else 8 if cap == 'AVX2' else None


_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Hardswish, nn.SiLU, nn.Identity)


def align_stem_channels(model: nn.Module, multiple: int) -> nn.Module:
    """Return a copy of ``model`` computing the same function whose stem convolutions have output widths rounded up
    to a multiple of ``multiple`` (zero filters, and zero input taps in the next conv), or ``model`` itself when it
    has no such stem or nothing to round.

    The stem is ``model.patch_embed`` when it is a plain Sequential of dense convs and activations with f(0) = 0:
    UniForm's, and EfficientViT-M's and SHViT's after fusing. Why: onnxruntime's x86 convolutions work in blocks of
    16 (AVX-512) or 8 (AVX2) channels; uniform_t's first conv has 8 outputs, so on an AVX-512 machine its result is
    reordered back to plain NCHW before the next conv. The extra zero channels cost a few MACs and save that reorder
    (see benchmarks/RESULTS.md); the exported graph is tuned for one machine, like onnxruntime's own NCHWc graphs.
    """
    stem = getattr(model, 'patch_embed', None)
    if multiple <= 1 or not isinstance(stem, nn.Sequential):
        return model
    layers = list(stem)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    if not convs or any(not isinstance(m, (nn.Conv2d, *_ZERO_PRESERVING)) for m in layers) \
            or any(layers[i].groups != 1 or layers[i].padding_mode != 'zeros' for i in convs):
        return model
    widen = [(-layers[i].out_channels) % multiple for i in convs[:-1]] + [0]
    if not any(widen):
        return model
    import copy

    new = copy.deepcopy(model)
    extra_in = 0
    for i, extra_out in zip(convs, widen):
        c = new.patch_embed[i]
        if extra_in or extra_out:
            w = F.pad(c.weight.detach(), (0, 0, 0, 0, 0, extra_in, 0, extra_out))
            b = c.bias.detach() if c.bias is not None else c.weight.new_zeros(c.out_channels)
            wide = nn.Conv2d(w.shape[1], w.shape[0], c.kernel_size, c.stride, c.padding, c.dilation,
                             device=w.device, dtype=w.dtype)
            with torch.no_grad():
                wide.weight.copy_(w)
                wide.bias.copy_(F.pad(b, (0, extra_out)))
            new.patch_embed[i] = wide
        extra_in = extra_out
    return new


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] = (3, 224, 224),
                opset: int | None = None, dynamic_batch: bool = True, align_channels: int | None = None) -> Path:
    """Export ``model`` (already fused and in eval mode) to one ``.onnx`` file; input 'input', output 'logits'.

    ``input_size`` is (C, H, W); the spatial size is fixed in the graph (window partitioning depends on it), the
    batch axis is symbolic unless ``dynamic_batch=False``. ``align_channels`` (e.g. :func:`ort_channel_block`)
    widens the stem's convs for onnxruntime's blocked layout (:func:`align_stem_channels`). Returns the path written.
    """
    _require('onnx')
    _require('onnxscript')
    path = check_output_path(path)
    opset = check_opset(opset)
    if model.training:
        raise ValueError("export_onnx needs a model in eval mode (fused with uniform_vit.layers.fuse.reparameterize)")
    if align_channels:
        model = align_stem_channels(model, align_channels)
    example = torch.randn(2 if dynamic_batch else 1, *input_size)  # batch 2: a batch of 1 would be specialised
    dynamic_shapes = ({0: torch.export.Dim('batch', min=1)},) if dynamic_batch else None
    with atomic_target(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # the exporter warns about internals users cannot act on
        try:
            # the exporter prints progress on stdout even when verbose=False on some versions
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, verbose=False, external_data=False,
                                  input_names=['input'], output_names=['logits'], opset_version=opset,
                                  dynamic_shapes=dynamic_shapes)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise UserError(f"ONNX export failed: {type(e).__name__}: {first}") from e
    return path


def check_onnx(path: str | os.PathLike) -> dict:
    """Run ``onnx.checker`` (full check, with shape inference); return opset and graph facts."""
    onnx = _require('onnx')
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise UserError(f"onnx.checker rejects {path}: {str(e).strip().splitlines()[0]}") from e
    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')), None)
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    return dict(opset=opset, nodes=len(m.graph.node), dynamic_batch=bool(dim.dim_param),
                size_mb=round(Path(path).stat().st_size / 1e6, 3))


def simplify_onnx(path: str | os.PathLike) -> str | None:
    """Simplify in place with onnxslim, else onnxsim, when one is installed; return the tool used (or None)."""
    import importlib.util

    onnx = _require('onnx')
    path = Path(path)
    if importlib.util.find_spec('onnxslim') is not None:
        import onnxslim

        slim = onnxslim.slim(str(path))
        with atomic_target(path) as tmp:
            onnx.save(slim, str(tmp))
        return 'onnxslim'
    if importlib.util.find_spec('onnxsim') is not None:
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(path)))
        if not ok:
            raise UserError(f"onnxsim could not validate the simplified {path}")
        with atomic_target(path) as tmp:
            onnx.save(simplified, str(tmp))
        return 'onnxsim'
    return None


class OrtRunner:
    """An onnxruntime CPU session that behaves like a model: ``runner(torch_tensor) -> torch_tensor``.

    ``threads`` sets both intra- and inter-op threads, with sequential execution, so single-threaded timings are
    really single-threaded (the default session would use every core).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, optimization: str = 'all'):
        ort = _require('onnxruntime')
        if not Path(path).is_file():
            raise UserError(f"ONNX file not found: {path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            'none': ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        so.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=['CPUExecutionProvider'])
        except Exception as e:
            raise UserError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from e
        self.path, self.threads = Path(path), threads
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().numpy()))


@torch.no_grad()
def max_abs_diff(model: nn.Module, runner, inputs: Iterable[torch.Tensor]) -> float:
    """Largest |model(x) - runner(x)| over all inputs (both given the same float32 batch)."""
    worst = 0.0
    for x in inputs:
        ref = model(x).float()
        got = runner(x).float()
        if got.shape != ref.shape:
            raise UserError(f"exported model returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((ref - got).abs().max()))
    return worst
