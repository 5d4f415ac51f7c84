"""What the training-speed scripts (train_layout_speed, train_paths, loader_speed) share: the flags of a timed
training step, and the process set-up that ``uniform-vit train`` does before its first step."""

from __future__ import annotations

import argparse
import warnings

import torch

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
