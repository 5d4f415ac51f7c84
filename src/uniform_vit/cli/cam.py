"""``uniform-vit cam``: Grad-CAM heat map of what the model looks at, for Reuse Attention and (side by side) MHA.

Target layer: the output of the last stage (``model.stages[-1]``). It is the last spatial feature map, the one the
head average-pools into the logits, so Grad-CAM's channel weights (pooled gradients of the class score) explain the
prediction directly, and it is the same module for ``attn_type='reuse'`` and ``'mha'`` (only the attention inside
the blocks differs), so the two maps compare like for like. The last stage has stride 64: 4x4 cells at 224 px, but a
single cell (no "where" at all) below 128 px. So the deepest stage whose map is at least 4x4 is used (the last one
at 224 px, stage 0 for 64 px Fashion-MNIST models), and the report names it; ``--stage`` picks one explicitly.
"""

from __future__ import annotations

import argparse
import json

HELP = "Grad-CAM heat map of an image (last stage), optionally Reuse Attention vs MHA side by side."
EXAMPLES = """examples:
  uniform-vit cam shoe.png --output shoe_cam.png                 uniform_t with the bundled Fashion-MNIST weights
  uniform-vit cam shoe.png --target Sneaker --output cam.png
  uniform-vit cam shoe.png --compare --compare-checkpoint runs/mha/model.safetensors --output cmp.png"""

MIN_CAM_CELLS = 4  # the last stage's map side at 224 px, the paper's setting
MIN_DISPLAY = 224  # small images (Fashion-MNIST is 28 px) are upscaled so the overlay is visible


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('image', help='image file (PNG, JPEG, ...)')
    p.add_argument('--model', default=None, help='timm model name (default: from the checkpoint, else uniform_t)')
    p.add_argument('--checkpoint', default=None,
                   help='weights; default: the bundled Fashion-MNIST weights for uniform_t, else random')
    p.add_argument('--attn-type', default=None, help="attention kind when there is no checkpoint: 'reuse' or 'mha'")
    p.add_argument('--target', default=None, help='class index or label to explain (default: the predicted class)')
    p.add_argument('--stage', type=int, default=None, help='stage whose output is the CAM layer (default: auto)')
    p.add_argument('--img-size', type=int, default=None, help='model input size (default: the checkpoint\'s)')
    p.add_argument('--output', '-o', required=True, help='PNG to write')
    p.add_argument('--compare', action='store_true', help="also run the other attention kind; both in one image")
    p.add_argument('--compare-checkpoint', default=None, help='weights of the other attention kind for --compare')
    p.add_argument('--json', action='store_true', help='print the report as JSON')


def _load(model_name: str | None, checkpoint: str | None, attn_type: str | None, quiet: bool = False):
    import sys

    from ..export.model import build_model
    from .predict import bundled_checkpoint

    if checkpoint is None and (model_name or 'uniform_t') == 'uniform_t' and attn_type in (None, 'reuse'):
        checkpoint = bundled_checkpoint('uniform_t')
        if checkpoint is not None and not quiet:
            print(f"using the bundled Fashion-MNIST weights {checkpoint.name}", file=sys.stderr)
    model, meta = build_model(model_name or ('uniform_t' if checkpoint is None else None),
                              str(checkpoint) if checkpoint else None, attn_type=attn_type, quiet=True)
    if checkpoint is None:
        print(f"warning: no checkpoint for {meta['model']} ({attn_type or 'reuse'}): the heat map shows RANDOM weights",
              file=sys.stderr)
    meta.setdefault('attn_type', getattr(model, 'attn_type', attn_type or 'reuse'))
    meta['checkpoint'] = str(checkpoint) if checkpoint else None
    return model, meta


def _pick_stage(model, img_size: int, stage: int | None) -> int:
    import torch

    from ..errors import UserError

    n = len(model.stages)
    if stage is not None:
        if not -n <= stage < n:
            raise UserError(f"--stage must be 0..{n - 1}, got {stage}")
        return stage % n
    from ..export.model import input_channels

    with torch.no_grad():
        _, feats = model.forward_intermediates(torch.zeros(1, input_channels(model), img_size, img_size))
    for i in range(n - 1, -1, -1):
        if min(feats[i].shape[-2:]) >= MIN_CAM_CELLS:
            return i
    return 0  # the largest map there is


def _target_index(target: str | None, labels: list[str], pred: int) -> int:
    from ..errors import UserError

    if target is None:
        return pred
    if target.lstrip('-').isdigit():
        t = int(target)
        if not 0 <= t < len(labels):
            raise UserError(f"--target {t} is outside the model's {len(labels)} classes 0..{len(labels) - 1}")
        return t
    low = [x.lower() for x in labels]
    if target.lower() in low:
        return low.index(target.lower())
    import difflib

    close = difflib.get_close_matches(target, labels, n=1)
    raise UserError(f"unknown class {target!r}" + (f"; did you mean {close[0]!r}?" if close else ''))


def grad_cam(model, meta: dict, image_path: str, target: str | None, stage: int | None, img_size: int | None
             ) -> dict:
    """Run Grad-CAM; return the heat map (H, W in [0, 1], at the model input size) and what it explains."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from ..data.factory import build_transform
    from ..errors import UserError
    from ..export.images import eval_stats
    from ..export.model import default_img_size, input_channels
    from ..models.uniform import UniForm
    from .predict import load_image, read_labels

    if not isinstance(model, UniForm):  # the layer choice below is specific to UniForm's three stages
        raise UserError(f"cam supports UniForm models (uniform_t/s/m/l), not {meta.get('model')}")
    chans = input_channels(model)
    size = img_size or default_img_size(model, meta)
    if size < 32:
        raise UserError(f"--img-size must be at least 32, got {size}")
    mean, std = eval_stats(meta, model, chans)
    img = load_image(image_path, chans)
    x = build_transform(size, chans, False, mean, std)(img).unsqueeze(0)
    labels = read_labels(None, meta.get('labels'), model.num_classes)
    model.eval()
    with torch.no_grad():
        prob = model(x).softmax(-1)[0]
    pred = int(prob.argmax())
    t = _target_index(target, labels, pred)
    s = _pick_stage(model, size, stage)
    with GradCAM(model=model, target_layers=[model.stages[s]]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(t)])[0]  # (H, W) in [0, 1]
    return dict(heat=np.asarray(heat, np.float32), image=img, stage=s, target=t, target_label=labels[t],
                pred=pred, pred_label=labels[pred], prob_target=round(float(prob[t]), 4), input_size=size)


def _overlay(img, heat, display: tuple[int, int]):
    import numpy as np
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(img.convert('RGB').resize(display, Image.BICUBIC), np.float32) / 255.0
    mask = np.asarray(Image.fromarray(heat).resize(display, Image.BILINEAR), np.float32).clip(0, 1)
    return show_cam_on_image(rgb, mask, use_rgb=True)  # (H, W, 3) uint8


def make_cam(image: str, output: str, model_name: str | None = None, checkpoint: str | None = None,
             attn_type: str | None = None, target: str | None = None, stage: int | None = None,
             img_size: int | None = None, compare: bool = False, compare_checkpoint: str | None = None) -> dict:
    """Write the Grad-CAM overlay PNG (or, with ``compare``, Reuse Attention and MHA side by side); return a report."""
    from pathlib import Path

    from PIL import Image

    from ..errors import UserError
    from ..export.onnx import check_output_path

    out = check_output_path(output)
    if out.suffix.lower() != '.png':
        raise UserError(f"--output must be a .png file, got {out.name}")
    if not Path(image).is_file():
        raise UserError(f"image not found: {image}")
    if attn_type is not None and attn_type not in ('reuse', 'mha'):
        raise UserError(f"--attn-type must be 'reuse' or 'mha', got {attn_type!r}")
    model, meta = _load(model_name, checkpoint, attn_type)
    first = grad_cam(model, meta, image, target, stage, img_size)
    w, h = first['image'].size
    k = max(1, -(-MIN_DISPLAY // min(w, h)))  # integer upscale of small images
    display = (w * k, h * k)
    panels = [(meta, first)]
    if compare:
        other = 'mha' if meta['attn_type'] == 'reuse' else 'reuse'
        name = meta['model']
        # a given checkpoint says its own attention kind; checked below so a mix-up gets a clear message
        model2, meta2 = _load(name, compare_checkpoint, None if compare_checkpoint else other,
                              quiet=compare_checkpoint is None)
        if meta2['attn_type'] != other:
            raise UserError(f"--compare-checkpoint holds a {meta2['attn_type']} model; --compare needs {other}")
        # explain the same class in both panels, so the maps answer the same question
        panels.append((meta2, grad_cam(model2, meta2, image, str(first['target']), stage, first['input_size'])))
    if not compare:
        Image.fromarray(_overlay(first['image'], first['heat'], display)).save(out)
    else:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6), dpi=100)
        axes[0].imshow(first['image'].convert('RGB').resize(display, Image.BICUBIC))
        axes[0].set_title('input', fontsize=10)
        for ax, (m, r) in zip(axes[1:], panels):
            ax.imshow(_overlay(r['image'], r['heat'], display))
            kind = 'Reuse Attention' if m['attn_type'] == 'reuse' else 'multi-head attention'
            weights = '' if m.get('checkpoint') else ' (random weights)'
            label = r['target_label'] if len(r['target_label']) <= 24 else r['target_label'][:23] + '…'
            ax.set_title(f"{kind}{weights}\n{label}: p={r['prob_target']:.2f}, stage {r['stage']}",
                         fontsize=9)
        for ax in axes:
            ax.axis('off')
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    rows = []
    for m, r in panels:
        rows.append(dict(model=m['model'], attn_type=m['attn_type'], checkpoint=m.get('checkpoint'), stage=r['stage'],
                         target=r['target'], target_label=r['target_label'], prob_target=r['prob_target'],
                         predicted=r['pred_label'], input_size=r['input_size']))
    return dict(output=str(out), image=image, panels=rows)


def run(args: argparse.Namespace) -> int:
    report = make_cam(args.image, args.output, args.model, args.checkpoint, args.attn_type, args.target, args.stage,
                      args.img_size, args.compare, args.compare_checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for p in report['panels']:
        print(f"{p['model']} ({p['attn_type']}): explains '{p['target_label']}' (p={p['prob_target']:.3f}, "
              f"predicted '{p['predicted']}') at stage {p['stage']}, input {p['input_size']} px")
    print(f"wrote {report['output']}")
    return 0
