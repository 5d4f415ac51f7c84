"""int8 post-training static quantization of an exported ONNX model with onnxruntime's tools.

Why onnxruntime rather than PyTorch's PT2E flow with X86InductorQuantizer: on torch 2.15 PT2E has left ``torch.ao``
for the separate ``torchao`` package, and its int8 kernels are only used through ``torch.compile`` (Inductor and a C++
compiler at run time). Measured on the Fashion-MNIST uniform_t (torchao 0.18): same accuracy, but the compiled int8
model was no faster than compiled fp32 and about 10x slower than onnxruntime at batch 1 (benchmarks/export.md).

Format: QDQ (QuantizeLinear/DequantizeLinear pairs around each op, which onnxruntime fuses into int8 kernels),
unsigned 8-bit activations, signed 8-bit per-output-channel weights - the combination onnxruntime recommends for
x86 CPUs with VNNI and for ARM.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.checkpoint import atomic_target
from .onnx import _require, check_output_path

CALIBRATION_METHODS = ('minmax', 'entropy', 'percentile')
DEFAULT_METHOD = 'percentile'  # best on the shipped Fashion-MNIST model (all within 0.13 pt): benchmarks/export.md


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of NCHW float32 batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.count += 1
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_batches: Iterable[np.ndarray],
                  method: str = DEFAULT_METHOD, per_channel: bool = True, exclude_ops: tuple[str, ...] = ()) -> Path:
    """Quantize the fp32 ONNX model at ``fp32_path`` to int8 (QDQ) at ``out_path``, calibrating activation ranges on
    ``calib_batches`` (real, already normalised NCHW float32 images). Returns ``out_path``.

    ``method``: 'minmax' | 'entropy' | 'percentile' (99.999th percentile of |activation|).
    ``exclude_ops``: ONNX op types to keep in float (e.g. ('Softmax',)).
    """
    onnx = _require('onnx')
    _require('onnxruntime')
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    fp32_path, out_path = Path(fp32_path), check_output_path(out_path)
    if not fp32_path.is_file():
        raise UserError(f"ONNX file not found: {fp32_path}")
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    ops = sorted({n.op_type for n in model.graph.node} - set(exclude_ops))
    batches = iter(calib_batches)
    first = next(batches, None)
    if first is None:
        raise UserError("no calibration batches: int8 calibration needs real images (--calib-data DIR)")
    reader = _Reader(input_name, itertools.chain([first], batches))
    with tempfile.TemporaryDirectory() as tmpdir:
        # symbolic shape inference + graph optimisation first, as onnxruntime's docs recommend for static quantization
        pre = Path(tmpdir) / 'pre.onnx'
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        extra = {'CalibTensorRangeSymmetric': False}
        if method == 'percentile':
            extra['CalibPercentile'] = 99.999
        # the histogram calibrators print progress on stdout, which would corrupt `export --json`
        with atomic_target(out_path) as tmp, contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                calibrate_method={'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy,
                                  'percentile': CalibrationMethod.Percentile}[method],
                extra_options=extra)
    return out_path
