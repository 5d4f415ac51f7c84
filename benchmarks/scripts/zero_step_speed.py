"""Training-step speed of plain DistributedDataParallel against ZeRO stage 1 (torch's ZeroRedundancyOptimizer around
the same timm optimiser, with per-parameter broadcasts and with bucketed ones), in the same processes.

    torchrun --nproc_per_node=2 benchmarks/scripts/zero_step_speed.py --opt muon --threads 1 --batch-size 64

Each arm is a uniform_t at 112 px (seed 0, channels-last) with its own DDP wrapper and optimiser (timm's
``create_optimizer_v2`` at learning rate 0, so the weights stay put); a step is what a training step of
``uniform-vit train`` does less the data (``_step_args.adamw_step`` on the DDP module): forward, label-smoothed loss,
backward (DDP's all-reduce), gradient clipping at 5, the optimiser's step (under ZeRO each process steps its share of
the weights, then broadcasts it). The arms run interleaved round by round (uniform_vit.bench.harness; each step
ends at a barrier); rank 0 prints the img/s of the global batch and the median of the per-round ratios to plain DDP.
Session 42 measured it on a 2-core CPU with Muon, whose Newton-Schulz products ZeRO splits between the processes
(benchmarks/train.md). bf16 products where the CPU has AMX, as the trainer's ``--matmul-precision auto``.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from _step_args import adamw_step, print_ratios, set_up, step_inputs, step_parser
from timm.optim import create_optimizer_v2
from torch.distributed.optim import ZeroRedundancyOptimizer

import uniform_vit  # noqa: F401  (registers the models)
from uniform_vit.bench.harness import interleaved_timing
from uniform_vit.train.engine import fused_optimizer_kwargs, resolve_matmul_precision


def main() -> None:
    p = step_parser(__doc__, img_size=112)
    p.set_defaults(batch_size=64, threads=1, rounds=5)  # per process
    p.add_argument('--model', default='uniform_t')
    p.add_argument('--opt', default='muon')
    p.add_argument('--steps', type=int, default=6, help='steps per arm and round')
    args = p.parse_args()
    set_up(args)
    torch.set_float32_matmul_precision(resolve_matmul_precision('auto', torch.device('cpu')))
    dist.init_process_group('gloo')

    def make(kind: str):
        model, x, y = step_inputs(args)  # seed 0 each time: the same weights and batch in every arm
        opt = create_optimizer_v2(model, args.opt, lr=0.0, weight_decay=0.05, betas=(0.9, 0.999),
                                  **fused_optimizer_kwargs(args.opt, torch.device('cpu')))
        if kind != 'ddp':
            accepted = inspect.signature(type(opt).__init__).parameters
            opt = ZeroRedundancyOptimizer([dict(g) for g in opt.param_groups], type(opt),
                                          parameters_as_bucket_view=kind == 'zero_bucketed',
                                          **{k: v for k, v in opt.defaults.items() if k in accepted})
        return model, torch.nn.parallel.DistributedDataParallel(model), opt, x, y

    arms = {k: make(k) for k in ('ddp', 'zero', 'zero_bucketed')}

    def step(model, ddp, opt, x, y) -> None:  # every process in step with the others before the clock reads
        adamw_step(ddp, opt, x, y)
        dist.barrier()

    times = interleaved_timing({k: (lambda a=a: step(*a)) for k, a in arms.items()}, rounds=args.rounds, warmup=2,
                               inner=args.steps)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f'{args.opt}, {world} processes x {args.threads} thread(s), batch {args.batch_size} x {world}')
        print_ratios(times, 'ddp', args.batch_size * world)
        convs = [q for q in arms['zero_bucketed'][0].parameters() if q.ndim == 4 and q.shape[1] > 1 and q.shape[-1] > 1]
        kept = all(q.is_contiguous(memory_format=torch.channels_last) for q in convs)
        print(f'bucketed: dense conv weights still channels-last: {kept}')
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
