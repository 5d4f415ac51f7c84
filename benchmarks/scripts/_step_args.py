"""What the training-speed scripts (train_layout_speed, train_paths, loader_speed, train_step_ab, bn_route_speed)
share: the flags of a timed training step, the process set-up that ``uniform-vit train`` does before its first step,
one such step, and the table of arms against a baseline."""

from __future__ import annotations

import argparse
import warnings

import timm
import torch
import torch.nn.functional as F

from uniform_vit.bench.harness import median, spread
from uniform_vit.utils.malloc import tune_allocator


def step_parser(doc: str, img_size: int, in_chans: bool = True) -> argparse.ArgumentParser:
    """``--img-size --batch-size [--in-chans --num-classes] --threads --rounds``; add the script's own after."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument('--img-size', type=int, default=img_size)
    p.add_argument('--batch-size', type=int, default=128)
    if in_chans:
        p.add_argument('--in-chans', type=int, default=1)
        p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=7, help='interleaved rounds')
    return p


def set_up(args: argparse.Namespace) -> None:
    """glibc's malloc tuned (as every uniform-vit command does), warnings off, ``--threads`` torch threads."""
    tune_allocator()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)


def step_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``--model`` (seed 0) in training mode and a random batch of ``--batch-size`` images and labels, both
    channels-last, as ``uniform-vit train`` feeds a CPU step."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    x = x.contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(0, args.num_classes, (args.batch_size,))


def adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """What a training step of ``uniform-vit train`` does, less the data: forward, label-smoothed loss, backward,
    gradient clipping at 5, the optimiser's step (scripts pass AdamW at learning rate 0 so the weights stay put)."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()


def print_ratios(times: dict[str, list[float]], base: str, batch_size: int, first: str = 'arm') -> None:
    """A markdown table of each arm's img/s and the median of its per-round speed ratios to ``base``."""
    print(f'| {first} | img/s | / {base} (spread) |\n|---|---|---|')
    for k, t in times.items():
        r = [a / b for a, b in zip(times[base], t)]
        print(f'| {k} | {batch_size / median(t):.0f} | {median(r):.3f}x ({spread(r) * 100:.0f}%) |')
