"""Training-step speed of plain DistributedDataParallel against ZeRO stage 1 (torch's ZeroRedundancyOptimizer around
the same timm optimiser, with per-parameter broadcasts and with bucketed ones), in the same processes.

    torchrun --nproc_per_node=2 benchmarks/scripts/zero_step_speed.py --opt muon --threads 1 --batch-size 64

Each arm is a uniform_t at 112 px (seed 0, channels-last) with its own DDP wrapper and optimiser (timm's
``create_optimizer_v2`` at learning rate 0, so the weights stay put); a step is what a training step of
``uniform-vit train`` does less the data: forward, label-smoothed loss, backward (DDP's all-reduce), gradient
clipping at 5, the optimiser's step (under ZeRO: each process steps its share of the weights, then broadcasts it).
The arms run interleaved round by round between barriers; rank 0 prints the img/s of the global batch and the
median of the per-round ratios to plain DDP. Session 42 measured it on a 2-core CPU with Muon, whose Newton-Schulz
products ZeRO splits between the processes (benchmarks/train.md). bf16 products where the CPU has AMX, as the
trainer's ``--matmul-precision auto``.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.distributed.optim import ZeroRedundancyOptimizer

import uniform_vit  # noqa: F401  (registers the models)
from uniform_vit.train.engine import resolve_matmul_precision
from uniform_vit.utils.malloc import tune_allocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--opt', default='muon')
    p.add_argument('--img-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=64, help='per process')
    p.add_argument('--threads', type=int, default=1, help='per process')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=6, help='steps per arm and round')
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(resolve_matmul_precision('auto', torch.device('cpu')))
    dist.init_process_group('gloo')

    def make(kind: str):
        torch.manual_seed(0)
        model = timm.create_model('uniform_t', num_classes=10, in_chans=1)
        model = model.to(memory_format=torch.channels_last).train()
        extra = {'fused': True} if args.opt in ('adam', 'adamw') else {}
        opt = create_optimizer_v2(model, args.opt, lr=0.0, weight_decay=0.05, betas=(0.9, 0.999), **extra)
        if kind != 'ddp':
            accepted = inspect.signature(type(opt).__init__).parameters
            opt = ZeroRedundancyOptimizer([dict(g) for g in opt.param_groups], type(opt),
                                          parameters_as_bucket_view=kind == 'zero_bucketed',
                                          **{k: v for k, v in opt.defaults.items() if k in accepted})
        return model, torch.nn.parallel.DistributedDataParallel(model), opt

    arms = {k: make(k) for k in ('ddp', 'zero', 'zero_bucketed')}
    x = torch.randn(args.batch_size, 1, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))

    def step(model, ddp, opt) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y, label_smoothing=0.1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for arm in arms.values():  # warm-up
        for _ in range(2):
            step(*arm)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, arm in arms.items():
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(*arm)
            dist.barrier()
            times[k].append((time.perf_counter() - t) / args.steps)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f'| {args.opt}, {world} processes x {args.threads} thread(s), batch {args.batch_size} x {world} | '
              f'img/s | / ddp |\n|---|---|---|')
        for k, t in times.items():
            ratio = statistics.median(b / v for b, v in zip(times['ddp'], t))
            print(f'| {k} | {args.batch_size * world / statistics.median(t):.0f} | {ratio:.3f}x |')
        convs = [q for q in arms['zero_bucketed'][0].parameters() if q.ndim == 4 and q.shape[1] > 1 and q.shape[-1] > 1]
        kept = all(q.is_contiguous(memory_format=torch.channels_last) for q in convs)
        print(f'bucketed: dense conv weights still channels-last: {kept}')
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
