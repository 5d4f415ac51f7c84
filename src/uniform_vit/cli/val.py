"""``uniform-vit val``: top-1/top-5 of a checkpoint on a dataset, with a confusion-matrix PNG."""

from __future__ import annotations

import argparse
import json

HELP = 'Evaluate a checkpoint: top-1/top-5, per-class accuracy and a confusion-matrix PNG.'
EXAMPLES = """examples:
  uniform-vit val                                   the shipped uniform_t on the Fashion-MNIST test set
  uniform-vit val --checkpoint runs/fm/model_best.safetensors --dataset fashion-mnist
  uniform-vit val --checkpoint runs/pets/model_best.safetensors --data-dir pets --split val --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from uniform_vit.cli._common import positive_int

    p.add_argument('--checkpoint', help='weights (.safetensors/.pth from uniform-vit train); default: the shipped '
                                        'uniform_t Fashion-MNIST model')
    p.add_argument('--dataset', help="built-in reader (default: the checkpoint's dataset, or 'folder' with --data-dir)")
    p.add_argument('--data-dir', help='DIR/<split>/<class>/*, or where the built-in set lives')
    p.add_argument('--split', default='val', help="'val' (default; the test set of built-in sets), 'test' or 'train'")
    p.add_argument('--model', help="timm model name when the checkpoint does not say")
    p.add_argument('--img-size', type=int, help="resolution (default: the checkpoint's)")
    p.add_argument('--batch-size', type=positive_int, default=256)
    p.add_argument('--samples', type=positive_int, help='evaluate the first N images only')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    p.add_argument('--threads', type=positive_int, help='torch CPU threads')
    p.add_argument('--workers', type=int, default=0,
                   help='data-loader processes for image folders (default 0); in-memory sets (Fashion-MNIST, '
                        'CIFAR) are resized a batch at a time instead')
    p.add_argument('--plot', default='confusion_matrix.png', help="confusion-matrix PNG path ('' to skip)")
    p.add_argument('--strict', action='store_true', help='stop at the first unreadable image')
    p.add_argument('--tta', default='none',
                   help="test-time augmentation: 'none' (default) or 'flip', which averages each image's and its "
                        "mirror image's probabilities (2x the compute; for data the model was trained to see "
                        "mirrored)")
    p.add_argument('--json', action='store_true', help='print JSON instead of tables')


def validate(checkpoint: str | None = None, dataset: str | None = None, data_dir: str | None = None,
             split: str = 'val', model: str | None = None, img_size: int | None = None, batch_size: int = 256,
             samples: int | None = None, device: str = 'auto', workers: int = 0, plot: str | None = None,
             strict: bool = False, progress: bool = True, tta: str | None = None) -> dict:
    """Evaluate; return top1/top5 (percent), loss, n, per-class accuracy and the confusion matrix (list of rows).

    ``tta='flip'``: each image's score is the mean of its and its mirror image's probabilities.
    """
    import time

    import torch

    from uniform_vit.data import create_dataset
    from uniform_vit.errors import UserError
    from uniform_vit.export.model import input_channels
    from uniform_vit.train.distributed import DistInfo, pick_device
    from uniform_vit.train.engine import eval_loader, evaluate
    from uniform_vit.utils.checkpoint import model_from_checkpoint
    from uniform_vit.utils.tta import check_tta
    from uniform_vit.weights import default_checkpoint

    tta = check_tta(tta)
    if checkpoint is None:
        checkpoint = default_checkpoint()
        if checkpoint is None:
            raise UserError("no --checkpoint given and this install ships no default weights")
    net, meta = model_from_checkpoint(checkpoint, model=model)
    labels = meta.get('labels')
    dataset = dataset or ('folder' if data_dir else meta.get('dataset'))
    if not dataset:
        raise UserError(f"{checkpoint} does not say which dataset it was trained on; pass --dataset or --data-dir")
    size = img_size or meta.get('img_size') or 224
    in_chans = meta.get('in_chans') or input_channels(net)
    mean, std = meta.get('mean'), meta.get('std')
    ds = create_dataset(dataset, split, data_dir, size, in_chans, train=False, interpolation=meta.get('interpolation')
                        or 'bicubic', mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                        strict=strict, classes=labels if dataset == 'folder' else None,
                        num_classes=getattr(net, 'num_classes', 10))
    classes = list(ds.classes)
    num_classes = getattr(net, 'num_classes', len(classes))
    if len(classes) > num_classes:
        raise UserError(f"{dataset} has {len(classes)} classes but the model predicts {num_classes}")
    if samples:
        ds = torch.utils.data.Subset(ds, range(min(samples, len(ds))))
    dev = pick_device(device)
    net.to(dev)
    loader = eval_loader(ds, batch_size, DistInfo(device=dev), workers)  # in-memory sets: resized a batch at a time
    t0 = time.perf_counter()
    res = evaluate(net, loader, num_classes, dev, progress=progress, desc=f'val {dataset}', tta=tta)
    seconds = time.perf_counter() - t0
    conf = res['confusion']
    names = (labels or classes)[:num_classes] + [str(i) for i in range(len(labels or classes), num_classes)]
    per_class = {names[i]: round(100.0 * float(conf[i, i]) / float(conf[i].sum()), 2)
                 for i in range(num_classes) if conf[i].sum() > 0}
    out = dict(checkpoint=str(checkpoint), model=meta.get('model'), attn_type=meta.get('attn_type'),
               dataset=dataset, split=split, img_size=size, tta=tta, n=res['n'], top1=round(res['top1'], 3),
               top5=round(res['top5'], 3), loss=round(res['loss'], 5), seconds=round(seconds, 2),
               img_per_s=round(res['n'] / seconds, 1), per_class_top1=per_class, labels=names,
               confusion=conf.tolist(), plot=None)
    if plot:
        title = (f"{out['model']} on {dataset} ({split}): top-1 {out['top1']:.2f} %"
                 + (f" (TTA {tta})" if tta != 'none' else ''))
        out['plot'] = plot_confusion(conf, names, plot, title)
    return out


def plot_confusion(conf, names: list[str], path: str, title: str) -> str | None:
    import sys

    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'uniform-vit[train]'): no confusion-matrix PNG",
              file=sys.stderr)
        return None
    from pathlib import Path

    from uniform_vit.errors import UserError

    if not Path(path).resolve().parent.is_dir():
        raise UserError(f"folder for --plot does not exist: {Path(path).parent}")
    n = len(names)
    c = conf.double()
    rate = c / c.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rate.numpy(), cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of the true class')
    if n <= 30:  # beyond that, labels and counts are unreadable
        ax.set_xticks(range(n), names, rotation=45, ha='right')
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, int(conf[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if rate[i, j] > 0.5 else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def run(args: argparse.Namespace) -> int:
    import torch

    from uniform_vit.cli._common import print_table

    if args.threads:
        torch.set_num_threads(args.threads)
    res = validate(args.checkpoint, args.dataset, args.data_dir, args.split, args.model, args.img_size,
                   args.batch_size, args.samples, args.device, args.workers, args.plot or None, args.strict,
                   progress=not args.json, tta=args.tta)
    if args.json:
        print(json.dumps(res))
        return 0
    print_table([dict(cls=k, top1=f'{v:.2f}') for k, v in res['per_class_top1'].items()],
                [('cls', 'class'), ('top1', 'top-1 %')], title='per-class accuracy')
    tta = f", TTA {res['tta']}" if res['tta'] != 'none' else ''
    print(f"{res['model']} ({res['attn_type']}) on {res['dataset']} {res['split']} ({res['n']} images, "
          f"{res['img_size']} px{tta}): top-1 {res['top1']:.2f} %  top-5 {res['top5']:.2f} %  loss {res['loss']:.4f}  "
          f"[{res['img_per_s']:.0f} img/s]" + (f"  confusion matrix: {res['plot']}" if res['plot'] else ''))
    return 0
