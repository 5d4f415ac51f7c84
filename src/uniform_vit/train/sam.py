"""Sharpness-aware minimisation (SAM; Foret et al., ICLR 2021, arXiv 2010.01412) as a wrapper of one training step.

SAM descends with the gradient taken at the worst nearby point rather than at the weights themselves: after the
usual backward pass it moves every weight by ``rho * g / ||g||`` (the whole model's gradient norm), takes the
gradient there, moves the weights back and lets the optimiser step with that second gradient. It costs a second
forward and backward pass per step, which is why ``uniform-vit train`` can confine it to the last epochs
(``--sam-epochs``): Zhou et al. (arXiv 2410.10373) found SAM in the final phase of training alone reaches about the
flat minima and test accuracy of SAM throughout.

The second pass leaves BatchNorm's running statistics as the first pass left them (they are restored), so the
evaluated model sees only the real weights' batch statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class SharpnessAware:
    """``with sam.ascended(): loss(model(x), y).backward()`` after a normal backward pass: inside, the weights sit at
    ``w + rho * g / ||g||`` with their gradients cleared; on exit they are ``w`` again (copied back bit for bit,
    not ``w + e - e``), holding the gradient taken at the perturbed point, and the BatchNorm running statistics are
    those from before the block. Gradients should be whole (after accumulation and, under DDP, after the
    all-reduce), so that every process moves its weights alike."""

    def __init__(self, model: nn.Module, rho: float):
        if not rho > 0:
            raise ValueError(f"SAM's rho must be positive, got {rho}")
        self.model, self.rho = model, float(rho)
        # the norms whose running statistics the second pass must not move: found once, not at every step
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]

    @contextmanager
    def ascended(self) -> Iterator[None]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        stats = [(b, b.detach().clone()) for m in self.norms for b in m.buffers()]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            if params:
                grads = [p.grad for p in params]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                scale = self.rho / (norm + 1e-12)
                for p, g in zip(params, grads):
                    p.add_(g * scale.to(g.dtype))
                    p.grad = None
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
                for b, old in stats:
                    b.copy_(old)


__all__ = ['SharpnessAware']
