"""Load and save model weights: plain state dicts (.pth/.pt) and safetensors, with errors that name the mismatch.

Files written by :func:`save_checkpoint` carry metadata (model name, class count, in_chans, attn_type, label names,
fused or not) so ``model_from_checkpoint`` can rebuild the right network without being told. Training checkpoints
(dicts with ``model`` / ``state_dict`` / ``model_ema`` entries) load too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why in one line."""


_META_KEYS = ('model', 'num_classes', 'in_chans', 'attn_type', 'labels', 'fused', 'img_size', 'mean', 'std',
              'interpolation', 'crop_pct', 'dataset')


def read_checkpoint(path: str | os.PathLike, prefer_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state_dict, metadata) from a .safetensors or torch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), 'pt') as f:
                raw = f.metadata() or {}
            meta = {k: json.loads(v) for k, v in raw.items() if k in _META_KEYS}
            return state, meta
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    meta = dict(obj.get('meta') or {})
    cfg = obj.get('config') or obj.get('args') or {}
    if isinstance(cfg, dict):
        for k in ('model', 'num_classes', 'in_chans', 'attn_type', 'img_size'):
            if k in cfg and k not in meta:
                meta[k] = cfg[k]
    for key in (('model_ema', 'state_dict_ema') if prefer_ema else ()) + ('model', 'state_dict'):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix('module.'): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return state, meta


@contextlib.contextmanager
def atomic_target(path: Path):
    """Yield a temporary file next to ``path``; rename it onto ``path`` only if the block succeeds. Readers see the
    old file or the whole new one, never half of it; a failed block removes its temporary (a SIGKILL may leave one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write the model's weights (atomically: temp file + rename). ``.safetensors`` or any torch suffix."""
    path = Path(path)
    if not path.parent.exists():
        raise CheckpointError(f"output directory does not exist: {path.parent}")
    meta = dict(meta or {})
    meta.setdefault('num_classes', getattr(model, 'num_classes', None))
    meta.setdefault('fused', not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))
    if getattr(model, 'attn_type', None):
        meta.setdefault('attn_type', model.attn_type)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_target(path) as tmp:
        if path.suffix == '.safetensors':
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items() if k in _META_KEYS})
        else:
            torch.save({'model': state, 'meta': meta}, tmp)
    return path


def _classifier_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cls = cfg.get('classifier', 'head')
    names = [cls] if isinstance(cls, str) else list(cls)
    prefixes = {n.rsplit('.', 1)[0] if n.endswith('.linear') else n for n in names}
    return {k for k in model.state_dict() if any(k == p or k.startswith(p + '.') for p in prefixes)}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, reset_head: bool = False, prefer_ema: bool = False,
                    name: str | None = None) -> dict:
    """Load weights into ``model``; return the checkpoint's metadata.

    A checkpoint for another variant or class count raises :class:`CheckpointError` naming the mismatch.
    ``reset_head=True`` keeps the model's freshly initialised classifier when the class count differs (fine-tuning).
    """
    state, meta = read_checkpoint(path, prefer_ema=prefer_ema)
    name = name or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    own = model.state_dict()
    own_fused = not any('.bn.' in k for k in own)
    ck_fused = not any('.bn.' in k for k in state)
    if own_fused != ck_fused:
        want = 'fused (deploy-form)' if own_fused else 'unfused (train-form)'
        got = 'fused' if ck_fused else 'unfused'
        raise CheckpointError(f"{path} holds {got} weights but {name} is {want}; "
                              f"{'build the model with deploy=True' if ck_fused else 'load before fusing'}")
    head = _classifier_keys(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    body_problems = [k for k in missing + unexpected + shape_bad if k not in head]
    if body_problems:
        ck_name = meta.get('model', 'another architecture')
        first = body_problems[0]
        if first in shape_bad:
            detail = f"{first}: checkpoint {tuple(state[first].shape)} vs model {tuple(own[first].shape)}"
        else:
            detail = f"{first} {'missing from checkpoint' if first in missing else 'unexpected'}"
        raise CheckpointError(f"{path} does not fit {name} (it looks like {ck_name}): {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(shape_bad)} mis-shaped tensors; first: {detail}")
    head_bad = [k for k in head if k in shape_bad or k in missing]
    if head_bad:
        ck_classes = next((state[k].shape[0] for k in head if k in state and k.endswith('weight')), None)
        ck_classes = meta.get('num_classes', ck_classes)
        if not reset_head:
            raise CheckpointError(
                f"{path} has {ck_classes} classes but {name} was built with {getattr(model, 'num_classes', '?')}; "
                f"use --num-classes {ck_classes} to match it, or reset the head on purpose to fine-tune")
        state = {k: v for k, v in state.items() if k not in head}
    model.load_state_dict(state, strict=not head_bad)
    return meta


def model_from_checkpoint(path: str | os.PathLike, model: str | None = None, num_classes: int | None = None,
                          in_chans: int | None = None, prefer_ema: bool = True, **kwargs) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint was saved from (metadata fills what the caller leaves out) and load it.

    ``num_classes`` different from the checkpoint's re-initialises the head on purpose.
    """
    import timm

    import uniform_vit  # noqa: F401  (registers models)

    state, meta = read_checkpoint(path, prefer_ema=prefer_ema)
    name = model or meta.get('model')
    if not name:
        raise CheckpointError(f"{path} does not say which model it holds; pass --model")
    ck_classes = meta.get('num_classes')
    if ck_classes is None:
        ck_classes = next((v.shape[0] for k, v in state.items() if k.endswith(('head.linear.weight', 'head.weight'))),
                          None)
    classes = num_classes if num_classes is not None else ck_classes
    if in_chans is None:
        first = next((v for k, v in state.items() if v.dim() == 4), None)
        in_chans = meta.get('in_chans') or (first.shape[1] if first is not None else 3)
    if meta.get('attn_type') and 'attn_type' not in kwargs and name.startswith('uniform_'):
        kwargs['attn_type'] = meta['attn_type']
    if meta.get('fused'):
        kwargs['deploy'] = True
    try:
        net = timm.create_model(name, num_classes=classes if classes is not None else 1000, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        raise CheckpointError(str(e)) from e
    meta = load_checkpoint(net, path, reset_head=num_classes is not None and num_classes != ck_classes,
                           prefer_ema=prefer_ema, name=name)
    meta.setdefault('model', name)
    return net, meta
