"""``uniform-vit train``: train or fine-tune a model (one process, or many under torchrun)."""

from __future__ import annotations

import argparse

HELP = 'Train or fine-tune a model (paper recipe or a short one), on one CPU or many GPUs with torchrun.'
EXAMPLES = """examples:
  uniform-vit train --model uniform_t --dataset fashion-mnist --recipe small --img-size 64 --epochs 12 --output runs/fm
  uniform-vit train --data-dir /data/imagenet --model uniform_s --epochs 300 --batch-size 256 --output runs/in1k
  uniform-vit train --config configs/fashion_mnist.yaml --epochs 3        (typed flags win over the file)
  uniform-vit train --config configs/fashion_mnist.yaml --time-budget 60  (the epochs that fit an hour here)
  uniform-vit train --output runs/fm --resume                             (continue a killed run)
  uniform-vit train --data-dir pets --checkpoint runs/in1k/model_best.safetensors --recipe small --output runs/pets
  torchrun --nproc_per_node=8 -m uniform_vit.cli.main train --data-dir /data/imagenet --output runs/in1k
options not shown by name below can also be set in the YAML file (see docs/training.md)."""

# flag help; every TrainConfig field becomes a flag, typed from its annotation
_HELP = {
    'model': 'timm model name (default uniform_t)',
    'attn_type': "UniForm attention: 'reuse' (default) or 'mha' (ablation)",
    'dataset': 'built-in reader: fashion-mnist, cifar10, cifar100, synthetic, folder (default: folder with --data-dir)',
    'data_dir': 'DIR/train/<class>/*, DIR/val/<class>/*; or where the built-in set lives',
    'img_size': 'training and validation resolution (default 224; small images are resized)',
    'recipe': "'paper' (ImageNet recipe, default) or 'small' (short runs on small datasets)",
    'batch_size': 'images per process and step (total = this x processes x --grad-accum)',
    'grad_accum': 'micro-batches per optimiser step (for small memory)',
    'momentum': "momentum of the optimisers that have one (--opt sgd, muon, nmuon, ...; default 0.9); AdamW's "
                'first moment is --betas A',
    'ns_steps': "Newton-Schulz iterations of Muon's orthogonalisation per step (--opt muon, nmuon, adamuon, "
                "nadamuon; default timm's 5); 3 make a uniform_t step 1.10x faster on a 2-core CPU",
    'time_budget': 'minutes for the whole run (training and validation) on this machine: the first epoch is timed '
                   'and the run holds as many epochs as fit, at most --epochs (the schedule is set to that count '
                   'from the second epoch; a resume keeps it). e.g. 60',
    'lr': 'peak learning rate (default: --base-lr x total batch / 512)',
    'output': 'run folder: checkpoint.pth, metrics.csv, summary.json, curves.png, model_best.safetensors',
    'checkpoint': 'initial weights; another class count re-initialises the head (fine-tuning)',
    'resume': 'continue the run in --output (or from the given checkpoint.pth)',
    'config': 'YAML file of options; flags typed on the command line win',
    'threads': 'torch CPU threads',
    'workers': 'data-loader processes for per-image loading (default: 0 on machines with <= 4 cores); batched '
               'in-memory sets do not use them',
    'min_img_size': 'progressive resizing: train the first epochs at this size, growing linearly in steps of 16 px '
                    'to --img-size by --resize-ramp-end of the run (validation always at --img-size)',
    'resize_ramp_end': 'fraction of the epochs after which progressive resizing reaches --img-size (default 0.75)',
    'batch_aug': "augment a whole batch at once as tensor products (in-memory sets: Fashion-MNIST, CIFAR, synthetic; "
                 "same crops, shifts, flips and erasing as per-image Pillow, ~8x cheaper): auto (default: when the "
                 "transform has a batched form, e.g. not with RandAugment), on (error if not), off",
    'train_samples': 'train on the first N images only (quick trials)',
    'val_samples': 'validate on the first N images only',
    'strict': 'stop at the first unreadable image instead of skipping it with a warning',
    'model_ema': 'keep an EMA of the weights and validate it too',
    'amp': 'mixed precision: auto (GPU: bf16, else fp16; CPU: off), bf16, fp16, none',
    'matmul_precision': "fp32 matrix products in the training step, as torch.set_float32_matmul_precision: auto "
                        "(default: medium on CPUs with AMX, else highest), highest (IEEE fp32), high (TF32 on NVIDIA "
                        "GPUs; no change on CPUs), medium (bf16 products with fp32 sums through oneDNN on CPUs: a "
                        "uniform_t step 1.09-1.15x as fast on an Intel Xeon with AMX). Validation always runs at "
                        "highest",
    'compile': 'torch.compile the training step (about a minute to compile; then ~1.15x faster on a 2-core CPU)',
    'channels_last': 'model and batches in channels-last memory format (default on: faster on GPUs and CPUs)',
    'translate': 'random shift of up to this fraction of the image size (zero fill), after the crop; e.g. 0.1',
    'no_aug_epochs': 'train the last N epochs on the evaluation view: the whole image, flips only (no crops, '
                     'shifts, erasing, RandAugment, jitter, Mixup or CutMix), as YOLOX does (default 0)',
    'keep_every': 'also keep every Nth epoch\'s checkpoint as checkpoint_epoch<E>.pth, to resume or fork a variant '
                  'from that epoch later (default 0: only the latest, checkpoint.pth)',
    'sam_rho': 'sharpness-aware minimisation (SAM): each step also takes the gradient at the weights moved this far '
               'along the gradient and steps with that one; a second forward and backward pass per step. '
               'e.g. 0.05 (default 0: off)',
    'sam_epochs': 'take SAM steps in the last N epochs only (late-phase SAM, about as good as SAM throughout); '
                  'default: every epoch when --sam-rho is set',
    'self_distill': "progressive self-distillation (PS-KD): each image's target mixes its label with the model's own "
                    "prediction for it in the previous epoch, the prediction's weight rising linearly to this value "
                    "at the last epoch; no extra compute. e.g. 0.8 (default 0: off; not with Mixup/CutMix)",
    'aa': "timm RandAugment string, e.g. rand-m9-mstd0.5; 'none' to disable",
}


def _type_of(annotation: str):
    base = annotation.replace(' | None', '')
    return {'int': int, 'float': float, 'str': str}.get(base)


def add_arguments(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from uniform_vit.cli._common import positive_int
    from uniform_vit.train.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        kw: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=_HELP.get(f.name, f'(default {f.default})'))
        if f.name == 'resume':
            p.add_argument(flag, nargs='?', const=True, metavar='CHECKPOINT', **kw)
        elif f.type == 'bool':
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type.startswith('tuple'):
            p.add_argument(flag, nargs=2, type=float, metavar=('A', 'B'), **kw)
        elif f.name in ('epochs', 'batch_size', 'grad_accum', 'val_every', 'threads', 'train_samples', 'val_samples'):
            p.add_argument(flag, type=positive_int, **kw)
        else:
            p.add_argument(flag, type=_type_of(f.type) or str, **kw)


def run(args: argparse.Namespace) -> int:
    from uniform_vit.cli._common import check_model_name
    from uniform_vit.train.config import field_names, make_config
    from uniform_vit.train.engine import train

    typed = {k: v for k, v in vars(args).items() if k in field_names() and k != 'config'}
    if typed.get('aa') in ('none', 'None', ''):
        typed['aa'] = None
    cfg = make_config(getattr(args, 'config', None), **typed)
    check_model_name(cfg.model)
    summary = train(cfg)
    return 0 if summary else 1
