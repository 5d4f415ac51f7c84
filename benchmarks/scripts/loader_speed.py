"""Training-batch augmentation, per image (timm's Pillow pipeline in a DataLoader) against batched
(uniform_vit.data.batch_aug), alone and inside a whole training step.

    python benchmarks/scripts/loader_speed.py --img-size 96 --threads 2

Arms, interleaved round by round (uniform_vit.bench.harness), each call producing ``--batches`` batches of
``--batch-size`` Fashion-MNIST training images with the ``small`` recipe's augmentation (crops 0.6-1, flips, random
erasing 0.25) and the engine's batch sampler:
  * ``per-image``: ``torch.utils.data.DataLoader`` over the dataset's Pillow transform, no worker processes (what
    ``uniform-vit train --batch-aug off`` runs on machines with at most 4 cores);
  * ``batched``: the same sampler through ``BatchedSource`` (``--batch-aug auto``, the default);
  * ``... + step``: the same, each batch followed by one uniform_t AdamW step (channels-last, as the engine runs it):
    the training throughput a run sees, loading included.
Ratios are medians of per-round ratios against the per-image arms.

``--eval``: the same comparison for validation, on the test set's evaluation view (the whole image resized, no
random draw) through the engine's ``eval_loader`` with and without its batched form, and ``+ step`` is then one
forward pass in eval mode under ``no_grad`` (what every epoch's validation and ``uniform-vit val`` run).

    python benchmarks/scripts/loader_speed.py --img-size 96 --threads 2 --eval
"""

from __future__ import annotations

import timm
import torch
from _step_args import set_up, step_parser  # this folder's shared flags and set-up

import uniform_vit  # noqa: F401
from uniform_vit.bench.harness import interleaved_timing, median, spread
from uniform_vit.data import create_dataset
from uniform_vit.data.batch_aug import BatchedLoader, BatchedSource
from uniform_vit.train.config import make_config
from uniform_vit.train.distributed import DistInfo
from uniform_vit.train.engine import GlobalBatchSampler, eval_loader, train_aug
from uniform_vit.utils.malloc import allocator_label


def main() -> None:
    p = step_parser(__doc__, img_size=96, in_chans=False)  # Fashion-MNIST: one channel, ten classes
    p.add_argument('--batches', type=int, default=4, help='batches per timed call')
    p.add_argument('--model', default='uniform_t', help="model for the '+ step' arms; 'none' skips them")
    p.add_argument('--eval', action='store_true', help='validation loading (test set, evaluation view) instead')
    args = p.parse_args()
    set_up(args)
    n = args.batches * args.batch_size
    if args.eval:
        test = create_dataset('fashion-mnist', 'val', img_size=args.img_size, in_chans=1)
        ds = torch.utils.data.Subset(test, range(n))
        # made once, as the engine makes them once a run; both are iterated afresh on every call
        per_image, batched = (eval_loader(ds, args.batch_size, DistInfo(), 0, batched=b) for b in (False, True))
        if not isinstance(batched, BatchedLoader):
            raise SystemExit("no batched evaluation view")

        def loaders():
            return {'per-image': lambda: per_image, 'batched': lambda: batched}
    else:
        cfg = make_config(dataset='fashion-mnist', recipe='small', img_size=args.img_size, output='unused')
        ds = create_dataset('fashion-mnist', 'train', img_size=args.img_size, in_chans=1, train=True,
                            aug=train_aug(cfg))
        src = BatchedSource.from_dataset(ds)
        if isinstance(src, str):
            raise SystemExit(f"no batched form: {src}")
        epoch = [0]

        def sampler():  # a fresh permutation every call, as every epoch has one
            epoch[0] += 1
            return GlobalBatchSampler(n, args.batch_size, 1, 0, seed=0, epoch=epoch[0], drop_last=True)

        def loaders():
            return {'per-image': lambda: torch.utils.data.DataLoader(ds, args.batch_size, sampler=sampler()),
                    'batched': lambda: src.loader(sampler(), args.batch_size)}

    fns = {name: (lambda make=make: [None for _ in make()]) for name, make in loaders().items()}
    if args.model != 'none':
        model = timm.create_model(args.model, num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # the weights stay the same

        def train_on(make):
            for x, y in make():
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
                opt.step()

        @torch.no_grad()
        def evaluate_on(make):
            model.eval()
            for x, _ in make():
                model(x.contiguous(memory_format=torch.channels_last))

        step = evaluate_on if args.eval else train_on
        fns.update({f'{name} + step': (lambda make=make: step(make)) for name, make in loaders().items()})
    print(f'Fashion-MNIST {"test set, evaluation view" if args.eval else "training set"}, {args.img_size} px, '
          f'batch {args.batch_size}, {args.batches} batches per call, '
          f'{args.threads} threads, torch {torch.__version__}, malloc {allocator_label()}, '
          f'{args.rounds} interleaved rounds')
    t = interleaved_timing(fns, rounds=args.rounds, warmup=1)
    print('| arm | ms per batch | img/s | vs per-image |')
    print('|---|---|---|---|')
    for k in fns:
        ref = 'per-image + step' if k.endswith('step') else 'per-image'
        r = [a / b for a, b in zip(t[ref], t[k])]
        ms = median(t[k]) / args.batches * 1e3
        print(f'| {k} | {ms:.1f} | {n / median(t[k]):.0f} | {median(r):.2f}x ({spread(r) * 100:.0f}%) |', flush=True)


if __name__ == '__main__':
    main()
