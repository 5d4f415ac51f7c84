"""The training loop: timm's optimiser, scheduler, Mixup/CutMix, losses and EMA; DDP; atomic, resumable checkpoints.

Reproducibility: every epoch reseeds all RNGs (python, numpy, torch, the sampler) from (seed, epoch, rank), so an epoch
depends only on the state at its start. A run killed at any point and resumed from the last end-of-epoch checkpoint
therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.batch_aug import BatchedSource
from ..errors import UserError
from ..utils.checkpoint import atomic_target
from ..utils.tta import log_probs
from .config import TrainConfig, config_dict, config_from_dict, validate
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed

CHECKPOINT = 'checkpoint.pth'  # full training state, rewritten atomically after every epoch
BEST = 'model_best.safetensors'  # best validation top-1 weights (EMA when it won), with label meta
LAST = 'model_last.safetensors'


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


# ---- small pieces -------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    return cfg.seed * 1_000_003 + epoch * 1009 + rank


def rng_state() -> dict:
    """All RNG states as tensors and plain values (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached])
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def atomic_copy(src: Path, dst: Path) -> None:
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous setting restored after it.
    'medium' lets oneDNN run fp32 products on bf16 inputs with fp32 sums: PyTorch then sends fp32 ``torch.mm`` to
    oneDNN instead of MKL where oneDNN can take bf16, whose AMX kernels ran it on the Intel Xeon this was measured on
    (benchmarks/RESULTS.md, section 3, session 36)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), where oneDNN runs bf16 products on them."""
    probe = getattr(torch.cpu, '_is_amx_tile_supported', None)  # private in torch 2.x: without it, say no
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def resolve_matmul_precision(precision: str, device: torch.device) -> str:
    """``--matmul-precision``'s value for this run: 'auto' is 'medium' on a CPU with AMX (bf16 products, 1.09-1.16x
    a uniform_t step with no accuracy lost over 20 epochs on two seeds; benchmarks/RESULTS.md, section 3, sessions
    36-37), else 'highest' (CPUs without AMX were not measured; on GPUs --amp is the speed switch)."""
    if precision != 'auto':
        return precision
    return 'medium' if device.type == 'cpu' and cpu_has_amx() else 'highest'


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == 'none' or (cfg.amp == 'auto' and device.type != 'cuda'):
        return None
    if cfg.amp == 'fp16' or (cfg.amp == 'auto' and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def default_workers(cfg: TrainConfig, world: int) -> int:
    if cfg.workers is not None:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    # On a small machine a loader process only steals cores from the model; the in-memory readers are cheap.
    return 0 if cpus <= 4 else min(8, max(1, cpus // world - 1))


# timm's names for torch.optim's Adam, AdamW and SGD, which have fused kernels (one pass over all parameters instead
# of a dozen ops per tensor) on CPUs and GPUs: uniform_t's AdamW step 2.5x faster on 2 CPU threads, 1.05x the whole
# training step at 112 px (benchmarks/RESULTS.md, section 3, session 33); the same update, deterministic
FUSED_OPTIMIZERS = ('adam', 'adamw', 'sgd', 'nesterov', 'momentum')


def fused_optimizer_kwargs(opt: str, device: torch.device) -> dict:
    """``fused=True`` for the optimisers that have a fused step on this device, else nothing."""
    return {'fused': True} if opt.lower() in FUSED_OPTIMIZERS and device.type in ('cpu', 'cuda') else {}


def _subset(ds: torch.utils.data.Dataset, n: int | None) -> torch.utils.data.Dataset:
    if n is None or n >= len(ds):
        return ds
    sub = torch.utils.data.Subset(ds, range(n))
    for attr in ('classes', 'mean', 'std', 'img_size', 'name'):
        setattr(sub, attr, getattr(ds, attr))
    sub.targets = [ds.targets[i] for i in range(n)]
    return sub


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- data ---------------------------------------------------------------------------------------------------------

def batched_source(cfg: TrainConfig, ds: torch.utils.data.Dataset, device: torch.device) -> BatchedSource | str:
    """The training set prepared for batched augmentation (``--batch-aug``), or why it stays per image."""
    if cfg.batch_aug == 'off':
        return 'off (--batch-aug off)'
    src = BatchedSource.from_dataset(ds, device)
    if isinstance(src, str) and cfg.batch_aug == 'on':
        raise UserError(f"--batch-aug on, but this training set has no batched augmentation: {src}")
    return src


def train_aug(cfg: TrainConfig, plain: bool = False) -> dict:
    """The training transform's augmentation settings (``aug`` of ``data.create_dataset``) from ``cfg``. ``plain``:
    those of the last ``no_aug_epochs``, the evaluation view (the whole image resized) with only the flips kept."""
    if plain:
        return dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=cfg.hflip, auto_augment=None, re_prob=0.0,
                    color_jitter=0.0, translate=0.0)
    return dict(scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, auto_augment=cfg.aa, re_prob=cfg.reprob,
                color_jitter=cfg.color_jitter, translate=cfg.translate)


def plain_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) is one of the last ``no_aug_epochs``: no crops, erasing or mixing."""
    return epoch >= cfg.epochs - cfg.no_aug_epochs


def sam_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) takes sharpness-aware steps: ``sam_rho`` set, and in the last ``sam_epochs``
    (every epoch when that is unset)."""
    return cfg.sam_rho > 0 and epoch >= cfg.epochs - (cfg.sam_epochs or cfg.epochs)


BUDGET_WARM_STEPS = 3  # --time-budget times the first epoch's steps after these (a kernel build, first-call set-up)


def epochs_in_budget(cfg: TrainConfig, epoch_s: float) -> tuple[int, int]:
    """(the epochs to train, the epochs that fit) for ``cfg.time_budget`` minutes at ``epoch_s`` seconds an epoch
    with its validation: as many as fit, at most ``cfg.epochs``, and never fewer than the run's shape needs (its
    first epoch already trained as an augmented one before the plain last ``no_aug_epochs``, and ``sam_epochs`` of
    SAM) nor than the one already trained."""
    fit = int(cfg.time_budget * 60 // max(epoch_s, 1e-9))
    need = max(1, cfg.no_aug_epochs + (cfg.no_aug_epochs < cfg.epochs), cfg.sam_epochs or 0)
    return max(min(fit, cfg.epochs), need), fit


def epoch_img_size(cfg: TrainConfig, epoch: int) -> int:
    """The training resolution of ``epoch`` (0-based). Progressive resizing (``min_img_size``): linear from
    ``min_img_size`` at the first epoch to ``img_size`` at ``resize_ramp_end`` of the run, rounded down to whole
    16-px stem tokens (never below the minimum); ``img_size`` from then on. Without it, always ``img_size``."""
    lo, hi = cfg.min_img_size, cfg.img_size
    if not lo or lo >= hi:
        return hi
    end = max(1.0, cfg.resize_ramp_end * cfg.epochs - 1)  # the first epoch at full size
    size = lo + (hi - lo) * min(1.0, epoch / end)
    return hi if size >= hi else max(lo, int(size) // 16 * 16)


def set_train_transform(ds: torch.utils.data.Dataset, cfg: TrainConfig, in_chans: int, size: int,
                        batched: BatchedSource | None, plain: bool = False) -> None:
    """Point the training set's transform (and its batched form) at another output size, or at the plain view of
    the last ``no_aug_epochs``."""
    from ..data import build_transform

    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    base.transform = build_transform(size, in_chans, True, tuple(ds.mean), tuple(ds.std), train_aug(cfg, plain),
                                     cfg.interpolation)
    if batched is not None:
        batched.set_transform(base.transform)


def build_datasets(cfg: TrainConfig, in_chans: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    from ..data import create_dataset

    name = cfg.dataset or 'folder'
    aug = train_aug(cfg)
    common = dict(data_dir=cfg.data_dir, img_size=cfg.img_size, in_chans=in_chans, interpolation=cfg.interpolation,
                  strict=cfg.strict, seed=cfg.seed, num_classes=cfg.num_classes or 10)
    train_ds = create_dataset(name, 'train', train=True, aug=aug, num_samples=cfg.train_samples, **common)
    val_ds = create_dataset(name, 'val', train=False, classes=train_ds.classes if name == 'folder' else None,
                            num_samples=cfg.val_samples, **common)
    return _subset(train_ds, cfg.train_samples), _subset(val_ds, cfg.val_samples)


class GlobalBatchSampler(torch.utils.data.Sampler[int]):
    """One seeded permutation per epoch, cut into global batches of ``batch_size x world``; rank r takes the r-th
    contiguous slice of each. N processes with batch b therefore see exactly the micro-batches that one process with
    batch b and ``--grad-accum N`` sees: same gradients, same BatchNorm statistics."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int, drop_last: bool):
        self.n, self.b, self.world, self.rank, self.seed, self.epoch = n, batch_size, world, rank, seed, epoch
        self.drop_last = drop_last
        g = self.b * self.world
        self.num_batches = n // g if drop_last else math.ceil(n / g)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.num_batches * self.b * self.world
        if total > self.n:  # pad by wrapping, as DistributedSampler does
            perm = torch.cat([perm, perm[:total - self.n]])
        chunks = perm[:total].view(self.num_batches, self.world, self.b)[:, self.rank]
        return iter(chunks.flatten().tolist())

    def __len__(self) -> int:
        return self.num_batches * self.b


def train_loader(ds: torch.utils.data.Dataset, cfg: TrainConfig, info: DistInfo, epoch: int,
                 workers: int, batched: BatchedSource | None = None) -> Iterable:
    """The epoch's training batches: a ``DataLoader`` over the per-image transform, or, given ``batched``, the
    same sampler's batches augmented a batch at a time (Python's ``random``, seeded per epoch by the caller)."""
    drop_last = len(ds) >= cfg.batch_size * info.world_size
    sampler = GlobalBatchSampler(len(ds), cfg.batch_size, info.world_size, info.rank, cfg.seed, epoch, drop_last)
    if batched is not None:
        return batched.loader(sampler, cfg.batch_size)
    g = torch.Generator()
    g.manual_seed(epoch_seed(cfg, epoch, info.rank))  # seeds the loader processes' RNGs
    return torch.utils.data.DataLoader(ds, cfg.batch_size, sampler=sampler, num_workers=workers, generator=g,
                                       drop_last=False, pin_memory=info.device.type == 'cuda')


def eval_loader(ds: torch.utils.data.Dataset, batch_size: int, info: DistInfo, workers: int,
                batched: bool = True) -> Iterable:
    """The evaluation batches in dataset order (this rank's shard under DDP): resized a batch at a time for in-memory
    datasets of square images (Fashion-MNIST, CIFAR) unless ``batched`` is False, else a ``DataLoader`` over the
    per-image transform."""
    # disjoint shards without padding, so summed counts are exact
    index = range(info.rank, len(ds), info.world_size) if info.enabled else range(len(ds))
    src = BatchedSource.from_dataset(ds, info.device) if batched else None
    if isinstance(src, BatchedSource) and src.augment.whole:
        return src.loader(index, batch_size)
    if info.enabled:
        ds = torch.utils.data.Subset(ds, index)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=info.device.type == 'cuda')


# ---- evaluation ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, num_classes: int, device: torch.device,
             dtype: torch.dtype | None = None, info: DistInfo | None = None, channels_last: bool = False,
             progress: bool = False, desc: str = 'val', tta: str | None = None) -> dict:
    """Loss, top-1/top-5 (percent) and the confusion matrix (rows: true class, columns: predicted).

    ``tta='flip'`` scores the average of each image's and its mirror image's class probabilities
    (:mod:`uniform_vit.utils.tta`); the loss is then the cross-entropy of that average.
    """
    info = info or DistInfo(device=device)
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    top5 = torch.zeros((), dtype=torch.int64)
    k = min(5, num_classes)
    bar = _bar(len(loader.sampler), desc, progress and info.main)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = log_probs(model, x, tta)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction='sum').double().cpu()
        pred = logits.topk(k, 1).indices
        top5 += (pred == y[:, None]).any(1).sum().cpu()
        conf += torch.bincount((y * num_classes + pred[:, 0]).cpu(), minlength=num_classes ** 2).view_as(conf)
        if bar:
            bar.update(len(y))
    if bar:
        bar.close()
    for t in (conf, loss_sum, top5):
        all_reduce_sum(t, info)
    n = int(conf.sum())
    return dict(loss=float(loss_sum) / max(n, 1), top1=100.0 * float(conf.diag().sum()) / max(n, 1),
                top5=100.0 * float(top5) / max(n, 1), n=n, confusion=conf)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    # img/s and ETA come from tqdm's rate; in a log file, one refresh every 30 s instead of a stream of \r.
    return tqdm(total=total, desc=desc, unit='img', unit_scale=False, dynamic_ncols=tty, leave=False,
                mininterval=0.5 if tty else 30, file=sys.stderr)


# ---- reporting ----------------------------------------------------------------------------------------------------

# plain: 1 for the last --no-aug-epochs (evaluation view, no mixing), else 0; sam: 1 for the epochs that took
# sharpness-aware steps (--sam-rho, --sam-epochs), else 0; distill_alpha: the weight of last epoch's own predictions
# in the targets (--self-distill), else 0
CSV_FIELDS = ['epoch', 'lr', 'train_loss', 'val_loss', 'top1', 'top5', 'top1_ema', 'img_per_s', 'epoch_seconds',
              'img_size', 'plain', 'sam', 'distill_alpha']


def write_metrics(out: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction='ignore')
    w.writeheader()
    for row in history:
        w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / 'metrics.csv', buf.getvalue())


def plot_curves(out: Path, history: list[dict], title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'uniform-vit[train]'): no curves.png", file=sys.stderr)
        return None
    ep = [h['epoch'] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    plain = [h['epoch'] for h in history if h.get('plain')]
    for ax in (a, b) if plain else ():  # the plain last epochs, shaded: the loss drops there by design
        ax.axvspan(min(plain) - 0.5, max(plain) + 0.5, color='0.9', zorder=0,
                   label=f'plain view ({len(plain)} epochs)' if ax is b else None)
    a.plot(ep, [h['train_loss'] for h in history], label='train loss')
    a.plot(ep, [h.get('val_loss') for h in history], label='val loss')
    a.set_xlabel('epoch')
    a.set_ylabel('loss')
    a.legend()
    a.grid(alpha=0.3)
    b.plot(ep, [h.get('top1') for h in history], label='val top-1')
    if any(h.get('top1_ema') is not None for h in history):
        b.plot(ep, [h.get('top1_ema') for h in history], label='val top-1 (EMA)')
    b.set_xlabel('epoch')
    b.set_ylabel('top-1 (%)')
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / 'curves.png'
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- model --------------------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    import timm

    import uniform_vit  # noqa: F401  (registers uniform_*)

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg.drop_path)
    if cfg.model.startswith('uniform_'):
        kwargs['attn_type'] = cfg.attn_type
    try:
        return timm.create_model(cfg.model, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"cannot build {cfg.model}: {str(e).splitlines()[0]}") from e


def _checkpoint_in_chans(path: str | None) -> int | None:
    if not path:
        return None
    from ..utils.checkpoint import read_checkpoint

    state, meta = read_checkpoint(path)
    if meta.get('in_chans'):
        return int(meta['in_chans'])
    first = next((v for v in state.values() if v.dim() == 4), None)
    return int(first.shape[1]) if first is not None else None


# ---- the run ------------------------------------------------------------------------------------------------------

def _load_resume(cfg: TrainConfig) -> tuple[Path, dict] | None:
    if not cfg.resume:
        return None
    path = Path(cfg.output) / CHECKPOINT if cfg.resume is True or cfg.resume == 'True' else Path(str(cfg.resume))
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (a run writes {CHECKPOINT} after its first epoch)")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or 'optimizer' not in state or 'epoch' not in state:
        raise UserError(f"--resume: {path} is not a training checkpoint (no optimizer state); use --checkpoint")
    return path, state


def train(cfg: TrainConfig, model: nn.Module | None = None) -> dict:
    """Train (or fine-tune) and return the summary written to ``<output>/summary.json``.

    ``model``: an already built network (e.g. a converted one) to train instead of ``timm.create_model(cfg.model)``;
    its classifier is reset when the class count differs from the dataset's. Raises glibc's malloc thresholds for
    this process first (:func:`uniform_vit.utils.malloc.tune_allocator`; ``UNIFORM_VIT_MALLOC=default`` keeps them).
    """
    from ..utils.malloc import tune_allocator

    tune_allocator()
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, model, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, model: nn.Module | None, info: DistInfo) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from ..data import check_labels
    from ..utils.checkpoint import load_checkpoint, save_checkpoint
    from .sam import SharpnessAware
    from .self_distill import SelfDistill

    resumed = _load_resume(cfg)
    saved_opt, typed = None, _typed_keys(cfg)
    if resumed:  # the run's own settings, with what the user typed now (kept in cfg) on top
        saved = config_from_dict(resumed[1]['config'])
        saved_opt = saved.opt
        cfg = config_from_dict({**config_dict(saved), **{k: v for k, v in config_dict(cfg).items()
                                                          if k in typed}})
        validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = info.device
    out = Path(cfg.output)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)

    in_chans = cfg.in_chans or _checkpoint_in_chans(cfg.checkpoint) or (1 if cfg.dataset == 'fashion-mnist' else 3)
    seed_everything(epoch_seed(cfg, -1, 0))  # same initial weights on every rank
    train_ds, val_ds = build_datasets(cfg, in_chans)
    classes = list(train_ds.classes)
    num_classes = cfg.num_classes or len(classes)
    check_labels(train_ds.targets, num_classes, f"{cfg.dataset or cfg.data_dir} (train)")
    check_labels(val_ds.targets, num_classes, f"{cfg.dataset or cfg.data_dir} (val)")

    if model is None:
        model = build_model(cfg, num_classes, in_chans)
    elif getattr(model, 'num_classes', num_classes) != num_classes:
        model.reset_classifier(num_classes)
    if cfg.checkpoint and not resumed:
        load_checkpoint(model, cfg.checkpoint, reset_head=True)  # another class count: fresh head (fine-tuning)
    model.to(device)
    # channels-last on CPU too: a uniform_t training step at 96 px runs 1.4-1.7x faster (uniform_s 1.5-1.6x,
    # efficientvit_m0 1.3x; benchmarks/RESULTS.md, section 3)
    cl = cfg.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())

    total_batch = cfg.batch_size * info.world_size * cfg.grad_accum
    lr = cfg.lr or cfg.base_lr * total_batch / 512
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
                                    betas=cfg.betas, momentum=cfg.momentum, **fused_optimizer_kwargs(cfg.opt, device),
                                    **({'ns_steps': cfg.ns_steps} if cfg.ns_steps else {}))
    # (no decay on 1-d params (norms, biases) or what the model's no_weight_decay() names)
    workers = default_workers(cfg, info.world_size)
    batched = batched_source(cfg, train_ds, device)
    aug_note = 'batched' if isinstance(batched, BatchedSource) else f'per image: {batched}'
    if isinstance(batched, str):
        batched = None
    steps_per_epoch = len(train_loader(train_ds, cfg, info, 0, 0))
    if steps_per_epoch == 0:
        raise UserError(f"the training set ({len(train_ds)} images) is smaller than one batch per process")
    updates_per_epoch = math.ceil(steps_per_epoch / cfg.grad_accum)

    def make_scheduler(epochs: int):
        return create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=min(cfg.warmup_lr, lr), min_lr=min(cfg.min_lr, lr),  # a peak below them must not ramp upwards
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)[0]

    scheduler = make_scheduler(cfg.epochs)
    mixup = None
    # hard labels (with smoothing); Mixup/CutMix batches carry soft targets instead, except in the plain epochs
    hard: nn.Module = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    criterion = hard
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise UserError(f"Mixup/CutMix need an even batch size, got {cfg.batch_size}")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    dtype = amp_dtype(cfg, device)
    precision = resolve_matmul_precision(cfg.matmul_precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if cfg.sam_rho and dtype == torch.float16:  # --amp auto on a GPU without bf16
        raise UserError("SAM (--sam-rho) does not combine with fp16 mixed precision (this GPU has no bf16); "
                        "use --amp none")
    sam = SharpnessAware(model, cfg.sam_rho) if cfg.sam_rho else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True) if cfg.model_ema else None
    # PS-KD: last epoch's own predictions mixed into the targets (--self-distill); a soft-target loss then
    distill = SelfDistill(len(train_ds), num_classes, cfg.self_distill, cfg.smoothing) if cfg.self_distill else None

    start_epoch, history, train_seconds = 0, [], 0.0
    best: dict[str, Any] = dict(top1=-1.0, epoch=-1, top5=None)
    if resumed:
        path, st = resumed
        _unwrap(model).load_state_dict(st['model'])
        if cfg.opt.lower() == str(saved_opt).lower():
            # the saved moments, but the settings this run was built with: load_state_dict would bring back the
            # saved groups' momentum, weight decay, betas, ns_steps..., silently undoing what a fork typed (the
            # learning rate is the scheduler's, from cfg, whatever the groups hold)
            own = [{k: v for k, v in g.items() if k not in ('params', 'lr', 'initial_lr')}
                   for g in optimizer.param_groups]
            optimizer.load_state_dict(st['optimizer'])
            for group, settings in zip(optimizer.param_groups, own):
                group.update(settings)
        elif info.main:  # another optimiser's moments mean nothing to this one
            print(f"--opt {cfg.opt} at a resume of a {saved_opt} run: its optimiser starts fresh", flush=True)
        if ema is not None:  # EMA turned on at a resume (a variant forked from a run without one): start it from the
            # resumed weights, not from the fresh initialisation it was copied from above
            ema.module.load_state_dict(st['model_ema'] if st.get('model_ema') is not None else st['model'])
        if st.get('scaler'):
            scaler.load_state_dict(st['scaler'])
        if distill is not None and st.get('self_distill') is not None:  # else (a fork): from the labels again
            distill.load_state_dict(st['self_distill'])
        set_rng_state(st['rng'][info.rank] if info.rank < len(st['rng']) else st['rng'][0])
        start_epoch, history, train_seconds = st['epoch'] + 1, list(st['history']), float(st['train_seconds'])
        # the learning rate where this run's schedule stands (what the saved groups hold, on a plain resume; a fork
        # with another --lr or --opt would otherwise take its first step at the saved or the warm-up rate)
        scheduler.step_update(start_epoch * updates_per_epoch)
        best = dict(st['best'])
        if info.main:
            print(f"resuming from {path}: epoch {start_epoch} of {cfg.epochs}", flush=True)
            if 'time_budget' in typed:
                print(f"--time-budget sets the epochs after a run's first; this resume keeps {cfg.epochs}", flush=True)
        if start_epoch >= cfg.epochs:
            raise UserError(f"{path} already finished {start_epoch} epochs; raise --epochs to train longer")

    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg.compile and device.type == 'cpu' and not any(shutil.which(c) for c in (os.environ.get('CXX'), 'g++',
                                                                                   'clang++', 'c++') if c):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) for torch.compile's generated "
                        "kernels; install one or drop --compile")
    # only the training step is compiled: evaluation, EMA and checkpoints keep using the plain modules (same keys)
    fwd = torch.compile(ddp) if cfg.compile else ddp

    meta = dict(model=cfg.model, num_classes=num_classes, in_chans=in_chans,
                attn_type=getattr(model, 'attn_type', None), labels=classes, img_size=cfg.img_size,
                mean=list(train_ds.mean), std=list(train_ds.std),
                interpolation=cfg.interpolation, crop_pct=1.0, dataset=cfg.dataset or 'folder', fused=False)
    if info.main:
        _banner(cfg, info, params, len(train_ds), len(val_ds), total_batch, lr, in_chans, dtype, workers, aug_note,
                precision)

    # always at the final size, whatever the epoch trains at; Pillow per image with --batch-aug off
    vl = eval_loader(val_ds, cfg.batch_size, info, workers, batched=cfg.batch_aug != 'off')
    size, plain = cfg.img_size, False

    def forward_loss(x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                     idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss, and 1.0 when it is not finite on any process (else 0.0). ``idx`` (the batch's image
        indices): record the predictions for self-distillation."""
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = fwd(x)
            loss = loss_fn(logits, y)
        if idx is not None:
            distill.record(idx, logits)
        bad = (~torch.isfinite(loss.detach())).float().cpu()
        if info.enabled:
            all_reduce_sum(bad, info)
        return loss, bad

    epoch = start_epoch
    while epoch < cfg.epochs:  # (--time-budget sets cfg.epochs after the first)
        budget_epoch = cfg.time_budget is not None and epoch == 0
        seed_everything(epoch_seed(cfg, epoch, info.rank))
        if (view := (epoch_img_size(cfg, epoch), plain_epoch(cfg, epoch))) != (size, plain):
            size, plain = view
            set_train_transform(train_ds, cfg, in_chans, size, batched, plain)
        mix, loss_fn = (None, hard) if plain else (mixup, criterion)
        sharp = sam if sam_epoch(cfg, epoch) else None
        loader = train_loader(train_ds, cfg, info, epoch, workers, batched)
        order = None
        if distill is not None:  # the images of each batch, in the sampler's order (both loaders follow it)
            order = torch.as_tensor(list(loader.sampler), dtype=torch.int64)
            alpha, loss_fn = distill.alpha_at(epoch, cfg.epochs), SoftTargetCrossEntropy()
        t0 = time.perf_counter()
        t_warm, warm_steps = t0, 0
        ddp.train()
        loss_sum, seen, bad = torch.zeros((), dtype=torch.float64), 0, torch.zeros(())
        bar = _bar(len(loader) * cfg.batch_size * info.world_size, f'epoch {epoch + 1}/{cfg.epochs}',
                   cfg.progress and info.main)
        optimizer.zero_grad(set_to_none=True)
        with matmul_precision(precision):  # the steps only; evaluation stays at full precision
            for step, (x, y) in enumerate(loader):
                if budget_epoch and step == BUDGET_WARM_STEPS and len(loader) > 2 * BUDGET_WARM_STEPS:
                    t_warm, warm_steps = time.perf_counter(), step
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                if mix is not None:
                    x, y = mix(x, y)
                idx = None
                if order is not None:
                    idx = order[step * cfg.batch_size:step * cfg.batch_size + len(x)]
                    y = distill.targets(idx, y, alpha)
                last_micro = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader)
                sync = nullcontext() if last_micro or not info.enabled else ddp.no_sync()
                with sync:
                    loss, bad = forward_loss(x, y, loss_fn, idx)
                    if bad.item():
                        break
                    scaler.scale(loss / cfg.grad_accum).backward()
                if sharp is not None:  # SAM: the step's gradient is taken again at w + rho g / |g| (grad_accum is 1)
                    with sharp.ascended():
                        second, bad = forward_loss(x, y, loss_fn)
                        if not bad.item():
                            second.backward()
                    if bad.item():
                        loss = second
                        break
                if last_micro:
                    if cfg.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    num_updates = epoch * updates_per_epoch + (step // cfg.grad_accum) + 1
                    scheduler.step_update(num_updates)
                    if ema is not None:
                        ema.update(model, step=num_updates)
                loss_sum += loss.detach().double().cpu() * len(x)
                seen += len(x)
                if bar:
                    bar.update(len(x) * info.world_size)
                    bar.set_postfix(loss=f'{loss.item():.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    refresh=False)
        if bar:
            bar.close()
        if bad.item():
            good = out / CHECKPOINT
            where = f"last good checkpoint: {good} (epoch {history[-1]['epoch']})" if history and good.is_file() \
                else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: training stopped; "
                                   f"{where}. Lower --lr or raise --warmup-epochs")
        if info.enabled:  # DDP syncs gradients, not BN running stats: average them so every rank evaluates alike
            from timm.utils import distribute_bn

            distribute_bn(model, info.world_size, reduce=True)
        if distill is not None:
            distill.end_epoch(info)
        epoch_time = time.perf_counter() - t0
        train_seconds += epoch_time
        totals = all_reduce_sum(torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64), info)
        row: dict[str, Any] = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]['lr'],
                                   train_loss=float(totals[0] / max(totals[1], 1)),
                                   img_per_s=float(totals[1]) / epoch_time, epoch_seconds=epoch_time, img_size=size,
                                   plain=int(plain), sam=int(sharp is not None),
                                   distill_alpha=alpha if distill is not None else 0.0)
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs or budget_epoch:
            res = evaluate(model, vl, num_classes, device, dtype, info, cl, cfg.progress, 'val')
            row.update(val_loss=res['loss'], top1=res['top1'], top5=res['top5'])
            winner, top1, top5 = model, res['top1'], res['top5']
            if ema is not None:
                res_ema = evaluate(ema.module, vl, num_classes, device, dtype, info, cl, cfg.progress, 'val (EMA)')
                row['top1_ema'] = res_ema['top1']
                if res_ema['top1'] > top1:
                    winner, top1, top5 = ema.module, res_ema['top1'], res_ema['top5']
            if top1 > best['top1']:
                best = dict(top1=top1, top5=top5, epoch=epoch + 1, ema=winner is not model)
                if info.main:
                    save_checkpoint(winner, out / BEST, meta)
        if budget_epoch:  # the epochs the budget holds at this one's pace (the ranks' mean), the schedule to match:
            # its steps past the first few, scaled to the whole epoch, and its validation
            t_trained = t0 + epoch_time
            steps = len(loader)
            per_epoch = (t_trained - t_warm) * steps / (steps - warm_steps) + time.perf_counter() - t_trained
            per_epoch = float(all_reduce_sum(torch.tensor([per_epoch], dtype=torch.float64), info)[0])
            per_epoch /= info.world_size
            n, fit = epochs_in_budget(cfg, per_epoch)
            if info.main:
                over = f"; {n} is the fewest this run's shape allows, over the budget" if fit < n else ''
                cap = f" (at most --epochs {cfg.epochs})" if fit > n else ''
                print(f"time budget {cfg.time_budget:g} min: an epoch takes {per_epoch:.0f} s with its validation "
                      f"(timed on the first), so the run holds {n} epochs{cap}{over}", flush=True)
            if n != cfg.epochs:
                cfg = dataclasses.replace(cfg, epochs=n)
                scheduler = make_scheduler(n)
                scheduler.step_update(updates_per_epoch)
        history.append(row)
        if info.main:
            rngs = [rng_state()]
            atomic_torch_save(dict(
                model=model.state_dict(), model_ema=ema.module.state_dict() if ema is not None else None,
                optimizer=optimizer.state_dict(), scheduler=_plain(scheduler.state_dict()),
                scaler=scaler.state_dict() if scaler.is_enabled() else None, epoch=epoch, rng=rngs,
                self_distill=distill.state_dict() if distill is not None else None,
                config=config_dict(cfg), history=history, best=best, train_seconds=train_seconds, meta=meta),
                out / CHECKPOINT)
            if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0:  # a point to resume or fork a variant from
                atomic_copy(out / CHECKPOINT, out / f'checkpoint_epoch{epoch + 1}.pth')
            write_metrics(out, history)
            _epoch_line(row, cfg.epochs)
        barrier(info)
        epoch += 1

    rank_diff = _rank_weight_diff(model, info)
    summary = dict(
        model=cfg.model, attn_type=meta['attn_type'], params=params, dataset=meta['dataset'], img_size=cfg.img_size,
        in_chans=in_chans, num_classes=num_classes, epochs=len(history), best_top1=round(best['top1'], 3),
        best_top5=None if best['top5'] is None else round(best['top5'], 3), best_epoch=best['epoch'],
        best_is_ema=bool(best.get('ema')), final_top1=history[-1].get('top1'), final_top5=history[-1].get('top5'),
        train_seconds=round(train_seconds, 1),
        train_img_per_s=round(sum(h['img_per_s'] for h in history) / len(history), 1),
        total_batch=total_batch, lr=lr, world_size=info.world_size, rank_weight_max_diff=rank_diff, device=str(device),
        threads=torch.get_num_threads(), torch=torch.__version__, recipe=cfg.recipe,
        unreadable_images=len(getattr(getattr(train_ds, 'dataset', train_ds), 'bad_files', [])) +
        len(getattr(getattr(val_ds, 'dataset', val_ds), 'bad_files', [])),
        best_checkpoint=str(out / BEST), last_checkpoint=str(out / LAST), config=config_dict(cfg))
    if info.main:
        save_checkpoint(ema.module if ema is not None and best.get('ema') else model, out / LAST, meta)
        atomic_write_text(out / 'summary.json', json.dumps(summary, indent=2) + '\n')
        plot_curves(out, history, f"{cfg.model} ({meta['attn_type'] or ''}) on {meta['dataset']}, {cfg.img_size} px")
        if summary['unreadable_images']:
            print(f"warning: {summary['unreadable_images']} unreadable image(s) were skipped (named above)",
                  file=sys.stderr)
        print(f"done: best top-1 {summary['best_top1']:.2f} % at epoch {summary['best_epoch']}, "
              f"{summary['train_seconds']:.0f} s training; {out / 'summary.json'}", flush=True)
    barrier(info)
    return summary


def _rank_weight_diff(model: nn.Module, info: DistInfo) -> float | None:
    """Largest |weight - rank 0's weight| over all ranks (0.0 when DDP kept them in step); None for one process."""
    if not info.enabled:
        return None
    import torch.distributed as dist

    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values() if t.is_floating_point()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _plain(d: dict) -> dict:
    """Keep only what torch.load(weights_only=True) can read back."""
    ok = (int, float, str, bool, type(None), list, tuple, torch.Tensor)
    return {k: v for k, v in d.items() if isinstance(v, ok)}


def _typed_keys(cfg: TrainConfig) -> set[str]:
    return set(getattr(cfg, '_typed', ())) | {'resume', 'output'}


def _banner(cfg: TrainConfig, info: DistInfo, params: int, n_train: int, n_val: int, total_batch: int, lr: float,
            in_chans: int, dtype: torch.dtype | None, workers: int, aug_note: str, precision: str) -> None:
    from ..utils.malloc import allocator_label

    dev = torch.cuda.get_device_name(info.device) if info.device.type == 'cuda' else f'CPU x{torch.get_num_threads()}'
    print(f"uniform-vit train | torch {torch.__version__} | {dev} | processes {info.world_size} | "
          f"amp {str(dtype).replace('torch.', '') if dtype else 'off'} | loader workers {workers} | "
          f"augmentation {aug_note}"
          f"{' | torch.compile' if cfg.compile else ''}"
          f"{f' | fp32 matmul precision {precision}' if precision != 'highest' else ''}"
          f"{' (auto: AMX)' if precision != 'highest' and cfg.matmul_precision == 'auto' else ''}"
          f" | malloc {allocator_label()}", flush=True)
    kind = f"{cfg.attn_type}, " if cfg.model.startswith('uniform_') else ''  # attn_type only applies to UniForm
    sizes = [epoch_img_size(cfg, e) for e in range(cfg.epochs)]
    grow = ''
    if sizes[0] != cfg.img_size:  # progressive resizing (a run too short may never reach the full size)
        full = f", at {cfg.img_size} px from epoch {sizes.index(cfg.img_size) + 1}" if cfg.img_size in sizes else ''
        grow = f" (training from {sizes[0]} px{full})"
    span = f"up to {cfg.epochs} epochs, as many as fit {cfg.time_budget:g} min" if cfg.time_budget else \
        f"{cfg.epochs} epochs"
    print(f"{cfg.model} ({kind}{params / 1e6:.2f} M params, in_chans {in_chans}) | "
          f"{cfg.dataset or cfg.data_dir}: {n_train} train / {n_val} val at {cfg.img_size} px{grow} | "
          f"recipe {cfg.recipe} | "
          f"{span}{f' (the last {cfg.no_aug_epochs} plain)' if cfg.no_aug_epochs else ''}"
          f"{_sam_note(cfg)}"
          f"{f', self-distillation (PS-KD) alpha {cfg.self_distill:g}' if cfg.self_distill else ''}, "
          f"batch {total_batch} (= {cfg.batch_size} x {info.world_size} x {cfg.grad_accum}), "
          f"lr {lr:.3g} | output {cfg.output}", flush=True)


def _sam_note(cfg: TrainConfig) -> str:
    if not cfg.sam_rho:
        return ''
    n = cfg.sam_epochs or cfg.epochs
    return f", SAM rho {cfg.sam_rho:g} in {'every epoch' if n == cfg.epochs else f'the last {n}'}"


def _epoch_line(row: dict, epochs: int) -> None:
    val = '' if row.get('top1') is None else \
        f" | val loss {row['val_loss']:.4f} top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}"
    ema = '' if row.get('top1_ema') is None else f" (EMA {row['top1_ema']:.2f})"
    print(f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f}{val}{ema} | lr {row['lr']:.2e} | "
          f"{row['img_per_s']:.0f} img/s | {row['epoch_seconds']:.0f} s", flush=True)
