"""Build the network a deployment command works on: from a checkpoint (strictly: a variant or class count that does
not match is an error, never a silent head reset), or a fresh one with random weights and a warning."""

from __future__ import annotations

import sys

import torch.nn as nn

from ..errors import UserError


def build_model(name: str | None, checkpoint: str | None = None, num_classes: int | None = None,
                in_chans: int | None = None, attn_type: str | None = None, quiet: bool = False
                ) -> tuple[nn.Module, dict]:
    """Return (model in eval mode, checkpoint metadata). ``attn_type`` only applies to uniform_* models."""
    import timm

    from ..cli._common import check_model_name
    from ..utils.checkpoint import CheckpointError, model_from_checkpoint

    if name:
        check_model_name(name)
    kwargs = {'attn_type': attn_type} if attn_type and (name or 'uniform_').startswith('uniform_') else {}
    if checkpoint:
        model, meta = model_from_checkpoint(checkpoint, model=name, **kwargs)
        if num_classes is not None and num_classes != model.num_classes:
            raise CheckpointError(f"{checkpoint} has {model.num_classes} classes but --num-classes is {num_classes}; "
                                  f"drop --num-classes or pass {model.num_classes}")
        got = input_channels(model)
        if in_chans is not None and in_chans != got:
            raise CheckpointError(f"{checkpoint} takes {got}-channel images but --in-chans is {in_chans}")
        return model.eval(), meta
    if not name:
        raise UserError("give --model (and --checkpoint for trained weights)")
    if not quiet:
        print(f"warning: no --checkpoint: {name} has RANDOM weights", file=sys.stderr)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes or 1000, in_chans=in_chans or 3,
                              **kwargs)
    return model.eval(), {'model': name}


def input_channels(model: nn.Module) -> int:
    """Channels the model takes: those of its first conv (works for train and fused forms alike)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def default_img_size(model: nn.Module, meta: dict) -> int:
    """The checkpoint's training size, else the model config's input size."""
    s = meta.get('img_size')
    if s:
        return int(s[-1] if isinstance(s, (list, tuple)) else s)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return int(cfg.get('input_size', (3, 224, 224))[-1])
