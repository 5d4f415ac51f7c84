"""Nominal FLOP counts (``torch.utils.flop_counter``: 2 per multiply-accumulate) that do not depend on the PyTorch
version.

Some PyTorch releases count no FLOPs for the CPU flash-attention op that ``F.scaled_dot_product_attention`` dispatches
to (torch 2.14 counts zero for DeiT-Tiny's attention: 1.07 instead of 1.25 GMACs), so every count in this project
goes through :func:`count_flops`, which registers the formulas it needs first (and loads the C++ kernels, which
register theirs). The oneDNN matmul of the Reuse core registers its own in :mod:`uniform_vit.layers.gemm`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn


@functools.cache
def register_missing_formulas() -> None:
    """Give the CPU flash-attention op the same formula PyTorch uses for its CUDA flash op, where it has none."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    from . import gemm  # noqa: F401  (registers the oneDNN matmul)

    op = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if op is None or op in flop_registry or op.default in flop_registry:
        return

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    with contextlib.suppress(RuntimeError, ValueError):  # registered meanwhile by another import
        register_flop_formula(op)(sdpa_cpu)


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)`` as it stands (call ``.eval()`` first for inference counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_missing_formulas()
    # the C++ kernels register their formulas when they load, and a FlopCounterMode only knows the formulas that
    # existed when it was made: loaded first, a model whose first call loads them (eval-mode Reuse Attention takes
    # the C++ core) is not counted short
    from . import cpu_kernels

    if cpu_kernels.enabled() and x.device.type == 'cpu':
        cpu_kernels.status()
    with FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


__all__ = ['count_flops', 'register_missing_formulas']
