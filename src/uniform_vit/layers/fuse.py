"""The one reparameterization idiom: ``module.fuse()`` returns a new, BatchNorm-free module.

:func:`reparameterize` is the public entry point for whole networks. It deep-copies (the train form is never
mutated) and defers to ``timm.utils.model.reparameterize_model``, so timm peers and UniForm go through the same path.
"""

from __future__ import annotations

import copy

import torch.nn as nn


def fuse_children(module: nn.Module) -> nn.Module:
    """Return a deep copy of ``module`` whose children are replaced by their fused forms, recursively."""
    module = copy.deepcopy(module)
    fuse_inplace(module)
    return module


def fuse_inplace(module: nn.Module) -> None:
    """Replace, in place, every child that has ``fuse()`` by its fused form (recursing into the others)."""
    for name, child in module.named_children():
        if hasattr(child, 'fuse'):
            setattr(module, name, child.fuse())
        else:
            fuse_inplace(child)


def reparameterize(model: nn.Module) -> nn.Module:
    """Deploy form of any model (ours or timm's): BN folded, multi-branch convs merged. Returns a new eval model."""
    from timm.utils.model import reparameterize_model

    was_training = model.training
    model.eval()
    fused = reparameterize_model(model, inplace=False)
    model.train(was_training)
    fused.eval()
    return fused


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
