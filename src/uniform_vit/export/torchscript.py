"""TorchScript export (``torch.jit.trace``) for C++ / LibTorch / PyTorch Mobile users.

Tracing, not scripting: the fused graph is static once the image size is fixed (the window partition depends only
on H and W), and tracing records exactly that graph. TorchScript is deprecated in favour of ``torch.export``
since torch 2.9 but still loads everywhere LibTorch runs; ONNX is the recommended edge format.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..layers.conv import aten_only
from ..utils.checkpoint import atomic_target
from .onnx import check_output_path


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] = (3, 224, 224)) -> Path:
    """Trace ``model`` (fused, eval) at ``input_size`` (C, H, W) and save it. Any batch size runs; H, W are fixed.
    The graph holds standard ATen ops only (:func:`~uniform_vit.layers.conv.aten_only`: 1x1 convs as convs, not
    oneDNN matmuls), so LibTorch and PyTorch Mobile builds without oneDNN load it."""
    path = check_output_path(path)
    if model.training:
        raise ValueError("export_torchscript needs a model in eval mode")
    example = torch.randn(2, *input_size)
    with warnings.catch_warnings(), torch.no_grad(), aten_only():
        warnings.simplefilter('ignore')  # deprecation and "tensor to bool" tracer warnings (H, W are constant)
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as e:
            raise UserError(f"TorchScript trace failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        with atomic_target(path) as tmp:
            torch.jit.save(traced, str(tmp))
    return path


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.load(str(path), map_location='cpu').eval()
