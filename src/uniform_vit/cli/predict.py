"""``uniform-vit predict``: top-5 classes for each image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = 'Classify images: top-5 classes per image.'
EXAMPLES = """examples:
  uniform-vit predict shoe.png                       uniform_t with the bundled Fashion-MNIST weights
  uniform-vit predict a.jpg b.jpg --model uniform_s --checkpoint runs/s/model.safetensors --labels labels.txt
  uniform-vit predict shoe.png --json"""

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('images', nargs='+', help='image files (PNG, JPEG, ...)')
    p.add_argument('--model', default=None, help='timm model name (default: from the checkpoint, else uniform_t)')
    p.add_argument('--checkpoint', default=None,
                   help='weights (.safetensors/.pth); default: the bundled Fashion-MNIST weights for uniform_t')
    p.add_argument('--num-classes', type=int, default=None, help='class count when there is no checkpoint')
    p.add_argument('--labels', default=None, help='class names: a text file (one per line) or a JSON list')
    p.add_argument('--top', type=int, default=5, help='how many classes to show (default 5)')
    p.add_argument('--tta', default='none',
                   help="test-time augmentation: 'none' (default) or 'flip' (mean of the image's and its mirror "
                        "image's probabilities)")
    p.add_argument('--json', action='store_true', help='print JSON instead of text')


def bundled_checkpoint(model: str) -> Path | None:
    """The checkpoint shipped in the package for ``model`` (uniform_t: Fashion-MNIST), if any."""
    from ..weights import default_checkpoint

    return default_checkpoint() if model == 'uniform_t' else None


def read_labels(path: str | None, meta_labels: list | None, num_classes: int) -> list[str]:
    from ..errors import UserError

    labels = meta_labels
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"labels file not found: {p}")
        text = p.read_text()
        try:
            labels = json.loads(text) if p.suffix == '.json' else [ln.strip() for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"labels file {p} is not valid JSON: {e}") from None
        if isinstance(labels, dict):  # {"0": "cat", ...}
            labels = [labels[k] for k in sorted(labels, key=int)]
    if labels is None and num_classes == 1000:
        from timm.data import ImageNetInfo

        labels = ImageNetInfo().label_descriptions()
    if labels is None:
        return [f'class {i}' for i in range(num_classes)]
    if len(labels) != num_classes:
        raise UserError(f"{len(labels)} labels given but the model has {num_classes} classes")
    return [str(x) for x in labels]


def load_image(path: str, in_chans: int):
    """Open an image and bring it to the model's channel count (RGB <-> grayscale), or explain why not."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {p}: {str(e).splitlines()[0]}") from None
    if in_chans == 3:
        return img.convert('RGB')
    if in_chans == 1:
        return img.convert('L')
    bands = len(img.getbands())
    if bands != in_chans:
        raise UserError(f"image {p} has {bands} channel(s) ({img.mode}) but the model expects {in_chans}")
    return img


def predict(images: list[str], model_name: str | None = None, checkpoint: str | None = None,
            num_classes: int | None = None, labels: str | None = None, top: int = 5,
            tta: str | None = None) -> list[dict]:
    """Top-k predictions per image (pure function behind the command); ``tta='flip'`` averages each image's and
    its mirror image's probabilities."""
    import sys

    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from ..errors import UserError
    from ..export.images import eval_stats
    from ..export.model import default_img_size, input_channels
    from ..utils.checkpoint import model_from_checkpoint
    from ..utils.tta import check_tta, log_probs
    from ._common import check_model_name

    tta = check_tta(tta)
    if model_name:
        check_model_name(model_name)
    ckpt = checkpoint or (bundled_checkpoint(model_name or 'uniform_t') if num_classes is None else None)
    if ckpt:
        model, meta = model_from_checkpoint(ckpt, model=model_name, num_classes=num_classes)
    else:
        model_name = model_name or 'uniform_t'
        print(f"warning: no checkpoint for {model_name}: predicting with RANDOM weights", file=sys.stderr)
        model = timm.create_model(model_name, num_classes=num_classes or 1000)
        meta = {}
    model.eval()
    in_chans = input_channels(model)
    n_cls = model.num_classes
    names = read_labels(labels, meta.get('labels'), n_cls)
    # the checkpoint's preprocessing where it says, else the model config's (crop_pct, interpolation)
    cfg = resolve_data_config({}, model=model)
    size = default_img_size(model, meta)
    cfg['input_size'] = (in_chans, size, size)
    cfg['mean'], cfg['std'] = eval_stats(meta, model, in_chans)
    for k in ('interpolation', 'crop_pct'):
        if meta.get(k) is not None:
            cfg[k] = meta[k]
    transform = create_transform(**cfg)
    k = max(1, min(top, n_cls))
    out = []
    for path in images:
        x = transform(load_image(path, in_chans)).unsqueeze(0)
        if x.shape[1] != in_chans:
            raise UserError(f"image {path} gives {x.shape[1]} channels, model expects {in_chans}")
        with torch.no_grad():
            prob = log_probs(model, x, tta).exp()[0]
        p, idx = prob.topk(k)
        out.append({'image': path, 'top': [{'class': int(i), 'label': names[i], 'prob': round(float(v), 4)}
                                           for v, i in zip(p, idx)]})
    return out


def run(args: argparse.Namespace) -> int:
    rows = predict(args.images, args.model, args.checkpoint, args.num_classes, args.labels, args.top, args.tta)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(r['image'])
        for t in r['top']:
            print(f"  {t['prob'] * 100:6.2f}%  {t['label']}  (class {t['class']})")
    return 0
