"""``uniform-vit trex``: reuse attention across layers (TReX) with the layers chosen to meet a latency budget."""

from __future__ import annotations

import argparse
import json
import sys

HELP = 'TReX: let chosen layers reuse an earlier layer\'s attention, picked to meet a measured latency budget.'
EXAMPLES = """examples:
  uniform-vit trex --model uniform_t --checkpoint src/uniform_vit/weights/uniform_t_fashion_mnist.safetensors \\
      --budget 0.9 --dataset fashion-mnist --finetune-epochs 1 --json trex.json
  uniform-vit trex --model deit_tiny_patch16_224 --img-size 32 --patch-size 4 --in-chans 1 --budget 0.8 --json t.json
  uniform-vit trex --model deit_small_patch16_224 --budget 0.7 --mode output --transform linear --json t.json
  uniform-vit trex --model uniform_t --img-size 64 --layers 2,4 --budget 1 --json t.json   (measure a given plan)
the latency ratio is MEASURED on this machine (BN-fused, traced, interleaved rounds); the IMC numbers are an
analytical ESTIMATE (see docs/trex.md)."""


def _layer_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (fraction of the original latency), got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from uniform_vit.cli._common import positive_int

    p.add_argument('--model', required=True, help='timm ViT/DeiT name or uniform_t/s/m/l')
    p.add_argument('--checkpoint', help='trained weights (train form) to convert')
    p.add_argument('--budget', type=_fraction, required=True, help='latency budget: fraction of the original, e.g. 0.8')
    p.add_argument('--dataset', help='fashion-mnist, cifar10, cifar100, synthetic, folder (default: folder with '
                                     '--data-dir; none: random calibration images, no accuracy)')
    p.add_argument('--data-dir', help='DIR/train/<class>/*, DIR/val/<class>/*; or where the built-in set lives')
    p.add_argument('--json', required=True, metavar='OUT', help='write the result as JSON here')
    p.add_argument('--mode', default='attn', choices=('attn', 'output'),
                   help="'attn': reuse the attention MAP (own V/proj kept; default); 'output': reuse the whole "
                        "attention-block output through a learned transform")
    p.add_argument('--transform', default='channel', choices=('channel', 'linear'),
                   help="output mode's transform: per-channel scale+shift (default) or a CxC linear map")
    p.add_argument('--proxy', default='similarity', choices=('similarity', 'loss'),
                   help="layer ranking: attention-map/output similarity (default) or calibration loss of each "
                        "candidate plan (needs data; slower)")
    p.add_argument('--layers', type=_layer_list, help='skip the search: measure this plan (e.g. 2,4)')
    p.add_argument('--img-size', type=positive_int, help="resolution (default: the checkpoint's, else 224)")
    p.add_argument('--patch-size', type=positive_int, help='ViT patch size (timm models; e.g. 4 at 32 px)')
    p.add_argument('--in-chans', type=positive_int, help='input channels (default: 1 for fashion-mnist, else 3)')
    p.add_argument('--num-classes', type=positive_int, help="classes (default: the checkpoint's, else 10)")
    p.add_argument('--attn-type', choices=('reuse', 'mha'), help='UniForm attention kind when building without a '
                                                                 'checkpoint (default reuse)')
    p.add_argument('--calib-images', type=positive_int, default=64, help='images for the similarity proxy (64)')
    p.add_argument('--val-samples', type=positive_int, help='evaluate on the first N validation images only')
    p.add_argument('--finetune-epochs', type=int, default=0, help='fine-tune the converted model (train engine)')
    p.add_argument('--finetune-samples', type=positive_int, help='fine-tune on the first N training images only')
    p.add_argument('--finetune-lr', type=float, default=2e-4, help='fine-tune learning rate (2e-4)')
    p.add_argument('--finetune-batch', type=positive_int, default=64, help='fine-tune batch size (64)')
    p.add_argument('--output', default='runs/trex', help='fine-tune run folder (runs/trex)')
    p.add_argument('--rounds', type=positive_int, default=15, help='timing rounds per search step (15)')
    p.add_argument('--verify-rounds', type=positive_int, default=30, help='timing rounds to verify a plan (30)')
    p.add_argument('--latency-batch', type=positive_int, default=1, help='images per timed call (1)')
    p.add_argument('--threads', type=positive_int, default=1, help='torch CPU threads for timing (1)')
    p.add_argument('--quiet', action='store_true', help='no progress lines or table')


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniform_vit.errors import UserError
    from uniform_vit.trex.pipeline import run_trex

    out = Path(args.json)
    if not out.resolve().parent.is_dir():
        raise UserError(f"folder for --json does not exist: {out.parent}")
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune-epochs must be 0 or more, got {args.finetune_epochs}")

    def log(s: str) -> None:
        if not args.quiet:
            print(s, file=sys.stderr, flush=True)

    res = run_trex(args.model, args.budget, checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                   img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                   num_classes=args.num_classes, attn_type=args.attn_type, mode=args.mode, transform=args.transform,
                   proxy=args.proxy,
                   layers=args.layers, calib_images=args.calib_images, val_samples=args.val_samples,
                   finetune_epochs=args.finetune_epochs, finetune_samples=args.finetune_samples,
                   finetune_lr=args.finetune_lr, finetune_batch=args.finetune_batch, output=args.output,
                   rounds=args.rounds, verify_rounds=args.verify_rounds, latency_batch=args.latency_batch,
                   threads=args.threads, log=log)
    res['command'] = 'uniform-vit ' + ' '.join(sys.argv[1:]) if sys.argv and 'trex' in sys.argv else None
    out.write_text(json.dumps(res, indent=2) + '\n')
    if not args.quiet:
        _print_summary(res)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _print_summary(res: dict) -> None:
    from uniform_vit.cli._common import print_table

    env = res['environment']
    met = 'met' if res['budget_met'] else 'NOT met (every allowed layer reuses)' if res['reuse_layers'] else 'NOT met'
    imc = res['imc_estimate']['ratio']
    rows = [
        dict(k='reuse layers', v=','.join(map(str, res['reuse_layers'])) or '(none)'),
        dict(k='sources', v=', '.join(f'{i}<-{s}' for i, s in res['sources'].items()) or '-'),
        dict(k='mode', v=res['mode'] + (f" ({res['transform']})" if res['transform'] else '')),
        dict(k='latency ratio (measured)', v=f"{res['latency_ratio']:.3f}  budget {res['budget']} {met}"),
        dict(k='ratio of median times (cross-check)', v=f"{res['ratio_of_medians']:.3f}"),
        dict(k='latency ms original / reused', v=f"{res['original_ms']:.3f} / {res['reuse_ms']:.3f}"),
        dict(k='FLOPs ratio', v=f"{res['flops_ratio']:.3f}"),
        dict(k='top-1 original / reused / fine-tuned',
             v=' / '.join('-' if res[k] is None else f'{res[k]:.2f}'
                          for k in ('top1_original', 'top1_reused', 'top1_finetuned'))),
        dict(k='IMC estimate: energy / delay / area / EDAP ratio',
             v=f"{imc['energy_nj']:.3f} / {imc['delay_us']:.3f} / {imc['area_mm2']:.3f} / {imc['edap']:.3f}"),
        dict(k='environment', v=f"{env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, fp32, BN-fused, "
                                "traced"),
    ]
    print_table(rows, [('k', 'model'), ('v', 'value')], title=f"TReX on {res['model']} ({res['img_size']} px)")
