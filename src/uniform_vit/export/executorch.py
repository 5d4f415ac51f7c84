"""ExecuTorch export (``.pte``) with the XNNPACK backend, for phones and boards.

``executorch`` is not a dependency of uniform-vit (it pulls in torchao, pandas, coremltools, ...): install it next
to torch yourself (``pip install executorch``; 1.5.1 from PyPI has no torch pin and worked with torch 2.15 here,
see docs/deploy.md). After constant folding, everything but the q/k splits and the final mean runs in XNNPACK.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..utils.checkpoint import atomic_target
from .onnx import check_output_path


def _executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    except ImportError as e:
        raise UserError(f"ExecuTorch is not installed or does not load with torch {torch.__version__} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pip install executorch"
                        ) from None
    return XnnpackPartitioner, to_edge_transform_and_lower, constant_prop_pass


def export_executorch(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] = (3, 224, 224)) -> Path:
    """Lower ``model`` (fused, eval) with XNNPACK and write an ExecuTorch program for batch 1.

    Batch 1 only: with a symbolic batch, XNNPACK (executorch 1.5.1) keeps some reshaped intermediate tensors at the
    example batch and fails at run time on any other; on-device inference is one image at a time anyway.
    """
    XnnpackPartitioner, to_edge_transform_and_lower, constant_prop_pass = _executorch()
    path = check_output_path(path)
    example = torch.randn(1, *input_size)
    try:
        with torch.no_grad():
            # fold the relative-position index arithmetic (arange/abs/...) into constants: left in, it would run
            # outside XNNPACK on every call and split the graph into more delegate segments
            program = constant_prop_pass(torch.export.export(model, (example,)))
            pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:
        raise UserError(f"ExecuTorch lowering failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    with atomic_target(path) as tmp:
        tmp.write_bytes(pte.buffer)
    return path


class ExecuTorchRunner:
    """Run a ``.pte`` program with ExecuTorch's Python runtime: ``runner(torch_tensor) -> torch_tensor``."""

    def __init__(self, path: str | os.PathLike):
        _executorch()
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method('forward')

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x.contiguous()])[0]
