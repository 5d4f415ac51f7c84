"""What a training run is: one dataclass, two recipes, and the precedence defaults < recipe < YAML < typed flags.

From Python::

    from uniform_vit.train.config import make_config
    from uniform_vit.train.engine import train
    cfg = make_config(model='uniform_t', dataset='fashion-mnist', recipe='small', epochs=10, img_size=64,
                      output='runs/fm')
    summary = train(cfg)            # or train(cfg, model=my_model) to train a model built elsewhere
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = 'uniform_t'
    attn_type: str = 'reuse'  # 'reuse' (UniForm) or 'mha' (the paper's ablation)
    dataset: str | None = None  # fashion-mnist | cifar10 | cifar100 | synthetic | folder (None: folder if data_dir)
    data_dir: str | None = None
    num_classes: int | None = None  # None: from the dataset
    in_chans: int | None = None  # None: 1 for Fashion-MNIST, else 3 (or the fine-tune checkpoint's)
    img_size: int = 224
    min_img_size: int | None = None  # progressive resizing: first epochs at this size, growing to img_size
    resize_ramp_end: float = 0.75  # ... by this fraction of the epochs (in steps of 16 px, whole stem tokens)
    train_samples: int | None = None  # use only the first N training images (quick trials, tests)
    val_samples: int | None = None
    strict: bool = False  # unreadable image -> error instead of warning
    # schedule and optimiser (paper: AdamW, lr 1e-3 per 512 images, wd 0.025, 5 warm-up epochs, cosine to 1e-5)
    recipe: str = 'paper'
    epochs: int = 300
    time_budget: float | None = None  # minutes: as many epochs as fit (at most epochs), from the first epoch's time
    batch_size: int = 256  # per process and per step; total = batch_size x processes x grad_accum
    grad_accum: int = 1
    lr: float | None = None  # None: base_lr x total batch / 512
    base_lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.025
    opt: str = 'adamw'
    opt_eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD's and Muon's momentum (timm's default; AdamW and the like ignore it)
    ns_steps: int | None = None  # Muon's Newton-Schulz iterations per step (None: timm's 5); muon-family --opt only
    sched: str = 'cosine'
    clip_grad: float | None = 5.0
    # regularisation and augmentation (timm)
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    aa: str | None = 'rand-m9-mstd0.5'  # RandAugment; timm's '-inc1' posterize breaks on Pillow >= 11 (bits 0)
    reprob: float = 0.25
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0  # random shift of up to this fraction of the image size, zero fill (after the crop)
    hflip: float = 0.5
    color_jitter: float = 0.4
    interpolation: str = 'bicubic'
    drop_path: float = 0.0
    no_aug_epochs: int = 0  # the last N epochs on the evaluation view: whole image, flips only, no mixing (YOLOX)
    sam_rho: float = 0.0  # sharpness-aware minimisation's radius (Foret et al. 2021); 0: off
    sam_epochs: int | None = None  # SAM in the last N epochs only (late-phase SAM, Zhou et al. 2024); None: all
    self_distill: float = 0.0  # PS-KD (Kim et al. 2021): last epoch's own predictions' final weight in the targets
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # machinery
    output: str = 'runs/train'
    checkpoint: str | None = None  # initial weights (fine-tuning); another class count re-initialises the head
    resume: bool | str = False  # True: <output>/checkpoint.pth; a path: that checkpoint
    seed: int = 0
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    amp: str = 'auto'  # auto (bf16 on GPUs that have it, else fp16; none on CPU) | bf16 | fp16 | none
    channels_last: bool = True
    # fp32 products while training: auto (medium on CPUs with AMX, else highest) | highest | high | medium (bf16)
    matmul_precision: str = 'auto'
    compile: bool = False  # torch.compile the training forward/backward (one-time compile cost, faster steps)
    threads: int | None = None  # torch intra-op threads (CPU)
    workers: int | None = None  # data-loader processes; None: 0 on small machines, else up to 8
    batch_aug: str = 'auto'  # augment in-memory datasets a batch at a time: auto (when the transform allows) | on | off
    val_every: int = 1
    keep_every: int = 0  # also keep every Nth epoch's checkpoint as checkpoint_epoch<E>.pth (0: only the latest)
    progress: bool = True
    config: str | None = None  # the YAML file the values came from (informational)


RECIPES: dict[str, dict[str, Any]] = {
    'paper': {},  # the dataclass defaults are the paper's recipe
    # Short runs on small, tightly framed datasets (measured on Fashion-MNIST, see benchmarks/train.md): a short
    # warm-up, light crops, no RandAugment (its Invert/Solarize destroy 28 px clothing silhouettes), weak mixing.
    'small': dict(epochs=30, batch_size=128, base_lr=1.6e-2, warmup_epochs=0.5, min_lr=1e-5, weight_decay=0.05,
                  mixup=0.0, cutmix=0.0, smoothing=0.1, aa=None, reprob=0.25, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                  hflip=0.5, color_jitter=0.0, drop_path=0.0, clip_grad=5.0),
}

_TUPLE_FIELDS = {'betas', 'scale', 'ratio'}
MUON_OPTIMIZERS = {'muon', 'nmuon', 'adamuon', 'nadamuon'}  # timm's optimisers that orthogonalise by Newton-Schulz


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, value: Any) -> Any:
    if name in _TUPLE_FIELDS and value is not None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{name} must be two numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"{p} must hold a mapping of option: value")
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(u, field_names(), n=1)) else u
                 for u in unknown]
        raise UserError(f"{p}: unknown option(s) {', '.join(hints)}")
    return data


def make_config(config: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe's values, then the YAML file, then ``overrides`` (what the user typed) win."""
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(unknown)}")
    file_values = load_yaml(config) if config else {}
    recipe = overrides.get('recipe') or file_values.get('recipe') or 'paper'
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values: dict[str, Any] = dict(RECIPES[recipe])
    values.update(file_values)
    values.update(overrides)
    values['recipe'] = recipe
    if config:
        values['config'] = str(config)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    cfg._typed = set(overrides)  # what the caller set explicitly: on --resume these win over the saved config
    validate(cfg, merged=not cfg.resume)
    return cfg


def validate(cfg: TrainConfig, merged: bool = True) -> None:
    """Raise a UserError for the first bad value. ``merged=False``: the typed values of a ``--resume`` before the
    saved run's settings fill in the rest; a check that would hold a typed option against a default the saved run
    need not share (``--self-distill`` against the paper recipe's Mixup) waits for the merge, which ``train``
    validates again."""
    checks = [
        (cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (cfg.time_budget is None or cfg.time_budget > 0,
         f"time_budget must be a positive number of minutes (or unset), got {cfg.time_budget}"),
        (cfg.batch_size >= 1, f"batch size must be at least 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"grad_accum must be at least 1, got {cfg.grad_accum}"),
        (cfg.img_size >= 32, f"img_size must be at least 32 (UniForm downsamples 64x), got {cfg.img_size}"),
        (cfg.lr is None or cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (cfg.amp in ('auto', 'bf16', 'fp16', 'none'), f"amp must be auto, bf16, fp16 or none, got {cfg.amp!r}"),
        (cfg.matmul_precision in ('auto', 'highest', 'high', 'medium'),
         f"matmul_precision must be auto, highest, high or medium, got {cfg.matmul_precision!r}"),
        (0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.ns_steps is None or cfg.ns_steps >= 1, f"ns_steps must be at least 1, got {cfg.ns_steps}"),
        (cfg.ns_steps is None or cfg.opt.lower() in MUON_OPTIMIZERS,
         f"ns_steps (Newton-Schulz iterations) applies to --opt {', '.join(sorted(MUON_OPTIMIZERS))} only, "
         f"not {cfg.opt!r}"),
        (0 <= cfg.smoothing < 1, f"smoothing must be in [0, 1), got {cfg.smoothing}"),
        (0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1) (the last block's rate), got {cfg.drop_path}"),
        (0 <= cfg.no_aug_epochs <= cfg.epochs,
         f"no_aug_epochs must be in [0, epochs {cfg.epochs}], got {cfg.no_aug_epochs}"),
        (0 <= cfg.translate < 0.5, f"translate must be in [0, 0.5) (a share of the image size), got {cfg.translate}"),
        (cfg.min_img_size is None or 32 <= cfg.min_img_size <= cfg.img_size,
         f"min_img_size must be in [32, img_size {cfg.img_size}], got {cfg.min_img_size}"),
        (0 < cfg.resize_ramp_end <= 1, f"resize_ramp_end must be in (0, 1], got {cfg.resize_ramp_end}"),
        (cfg.batch_aug in ('auto', 'on', 'off'), f"batch_aug must be auto, on or off, got {cfg.batch_aug!r}"),
        (cfg.val_every >= 1, f"val_every must be at least 1, got {cfg.val_every}"),
        (cfg.sam_rho >= 0, f"sam_rho must be 0 (off) or positive, got {cfg.sam_rho}"),
        (cfg.sam_epochs is None or 1 <= cfg.sam_epochs <= cfg.epochs,
         f"sam_epochs must be in [1, epochs {cfg.epochs}] (or unset: every epoch), got {cfg.sam_epochs}"),
        (cfg.sam_rho == 0 or cfg.grad_accum == 1,
         "SAM (--sam-rho) takes its second gradient on the same batch, so it does not combine with --grad-accum; "
         "use a smaller --batch-size or drop --grad-accum"),
        (cfg.sam_rho == 0 or cfg.amp != 'fp16',
         "SAM (--sam-rho) does not combine with --amp fp16 (its loss scaling); use --amp bf16 or none"),
        (0 <= cfg.self_distill <= 1, f"self_distill must be in [0, 1] (0: off), got {cfg.self_distill}"),
        (cfg.self_distill == 0 or not merged or (cfg.mixup == 0 and cfg.cutmix == 0),
         "self-distillation (--self-distill) does not combine with Mixup/CutMix (their mixed targets replace the "
         "labels it mixes with); set --mixup 0 --cutmix 0 (the 'small' recipe does)"),
        (cfg.keep_every >= 0, f"keep_every must be 0 (off) or a number of epochs, got {cfg.keep_every}"),
        # a resumed run takes its data from the saved config (checked again after the merge)
        (cfg.dataset is not None or cfg.data_dir is not None or bool(cfg.resume), "give --dataset or --data-dir"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    from timm.optim import list_optimizers

    name = cfg.opt.lower().split('_')[-1]  # as timm reads it: 'lookahead_adamw' is AdamW inside Lookahead
    if name not in (known := list_optimizers()):
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        raise UserError(f"unknown optimiser {cfg.opt!r} (timm's names: adamw, sgd, lamb, lion, ...)"
                        + (f"; did you mean {', '.join(close)}?" if close else ''))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain, JSON/YAML-friendly dict (tuples as lists) for checkpoints and summaries."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    names = set(field_names())
    return TrainConfig(**{k: _coerce(k, v) for k, v in d.items() if k in names})


__all__ = ['RECIPES', 'TrainConfig', 'config_dict', 'config_from_dict', 'load_yaml', 'make_config']
