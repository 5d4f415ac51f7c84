"""Training-step speed of session 33's two changes, each alone and together, against the step before them.

    python benchmarks/scripts/train_step_ab.py --img-size 112 --batch-size 128 --threads 2

  * ``wgrad``: the 1x1 convs' weight gradients (``uniform_vit.layers.gemm.weight_grad``) computed as
    ``(x^T @ g)^T`` when the layer expands its channels, so that oneDNN's product has the smaller side as its rows
    (before: always ``g^T @ x``);
  * ``fused``: the optimiser's fused step (``torch.optim.AdamW(fused=True)``, what ``uniform-vit train`` asks timm
    for) instead of its per-tensor loop.
One uniform_t, one batch, one AdamW step at learning rate 0 with gradient clipping per call (what a training step
of ``uniform-vit train`` does, less the data), the arms interleaved round by round; ratios are medians of per-round
ratios against 'before'. The weight-gradient products only take the oneDNN path where the GEMM policy sends them
(AMD CPUs with AVX-512); elsewhere 'wgrad' measures nothing and should read 1.00x.
"""

from __future__ import annotations

import torch
from _step_args import (  # this folder's shared flags and set-up
    adamw_step,
    print_ratios,
    set_up,
    step_inputs,
    step_parser,
)
from timm.optim import create_optimizer_v2

import uniform_vit  # noqa: F401
import uniform_vit.layers.gemm as gemm
from uniform_vit.bench.harness import interleaved_timing


def main() -> None:
    p = step_parser(__doc__, img_size=112)
    p.add_argument('--model', default='uniform_t')
    args = p.parse_args()
    set_up(args)
    model, x, y = step_inputs(args)
    opts = {f: create_optimizer_v2(model, opt='adamw', lr=0.0, weight_decay=0.05, **({'fused': True} if f else {}))
            for f in (False, True)}
    new_wgrad = gemm.weight_grad

    def old_wgrad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear_nt(g.t(), x.t())

    arms = {'before': (old_wgrad, False), 'wgrad': (new_wgrad, False), 'fused': (old_wgrad, True),
            'both': (new_wgrad, True)}
    fns = {}
    for arm, (wgrad, fused) in arms.items():
        def step(wgrad=wgrad, opt=opts[fused]):
            gemm.weight_grad = wgrad
            adamw_step(model, opt, x, y)
        fns[arm] = step
    print(f'{args.model}, {args.img_size} px, batch {args.batch_size}, in_chans {args.in_chans}, {args.threads} '
          f'threads, torch {torch.__version__}, GEMM on oneDNN: {gemm.onednn_preferred()}, {args.rounds} rounds')
    try:
        t = interleaved_timing(fns, rounds=args.rounds, warmup=1, inner=3)
    finally:
        gemm.weight_grad = new_wgrad
    print_ratios(t, 'before', args.batch_size)


if __name__ == '__main__':
    main()
