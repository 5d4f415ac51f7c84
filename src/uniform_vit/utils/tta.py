"""Test-time augmentation: average the class probabilities of an image and its mirror image.

Mirroring is the augmentation both training recipes apply (``hflip=0.5``), so the mirrored view is one the model was
trained on; it is wrong for data whose meaning flips with the image (digits, text), which is why it is off unless asked
for. Shifted or scaled views are not offered: on Fashion-MNIST adding four 4-pixel shifts to the mirror lowered top-1
(benchmarks/train.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UserError

TTA_MODES = ('none', 'flip')


def check_tta(mode: str | None) -> str:
    """Return the mode ('none' for None); a clear error for anything else."""
    mode = mode or 'none'
    if mode not in TTA_MODES:
        raise UserError(f"unknown test-time augmentation {mode!r}; choose one of: {', '.join(TTA_MODES)}")
    return mode


def log_probs(model: nn.Module, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Log class probabilities of a batch (N, C, H, W), averaged over the views of ``mode`` in probability space.

    With ``mode`` 'none' this is ``log_softmax(model(x))``; 'flip' averages the softmax of ``x`` and of ``x``
    mirrored left to right (one extra forward pass). ``cross_entropy`` and ``topk`` take the result like logits.
    """
    mode = check_tta(mode)
    out = model(x).float().log_softmax(-1)
    if mode == 'flip':
        mirrored = model(x.flip(-1)).float().log_softmax(-1)
        out = torch.logaddexp(out, mirrored) - math.log(2.0)
    return out
