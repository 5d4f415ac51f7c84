"""``uniform-vit models``: the UniForm variants with their size, cost and published accuracy."""

from __future__ import annotations

import argparse
import fnmatch
import json

HELP = 'List UniForm variants: params, GMACs at 224 px, tokens per stage, published top-1.'
EXAMPLES = """examples:
  uniform-vit models
  uniform-vit models 'uniform_[tl]' --json
  uniform-vit models --attn-type mha"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('pattern', nargs='?', default='uniform_*', help='glob over variant names (default: uniform_*)')
    p.add_argument('--img-size', type=int, default=224, help='input size for GMACs and tokens (default 224)')
    p.add_argument('--attn-type', default='reuse', help="attention kind: 'reuse' (default) or 'mha'")
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')


def model_rows(pattern: str = 'uniform_*', img_size: int = 224, attn_type: str = 'reuse') -> list[dict]:
    import math

    import timm
    import torch

    from ..bench.published import published_top1
    from ..errors import UserError
    from ..layers.attention import ATTENTION_KINDS
    from ..layers.flops import count_flops
    from ..models.uniform import VARIANTS

    if attn_type not in ATTENTION_KINDS:
        raise UserError(f"unknown attention kind {attn_type!r}; choose one of {sorted(ATTENTION_KINDS)}")
    if img_size < 32:
        raise UserError(f"--img-size must be at least 32, got {img_size}")
    names = [n for n in VARIANTS if fnmatch.fnmatch(n, pattern)]
    if not names:
        raise UserError(f"pattern {pattern!r} matches no variant; variants: {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        cfg = VARIANTS[name]
        model = timm.create_model(name, attn_type=attn_type).eval()
        flops = count_flops(model, torch.zeros(1, 3, img_size, img_size))
        tokens, side = [], math.ceil(img_size / 16)
        for i in range(3):
            if i:
                side = (side - 1) // 2 + 1
            tokens.append(side * side)
        top1, source = published_top1(name)
        rows.append(dict(
            model=name, embed_dim=list(cfg.embed_dim), depth=list(cfg.depth), num_heads=list(cfg.num_heads),
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            gmacs=round(flops / 2e9, 4), img_size=img_size, tokens_per_stage=tokens,
            attn_type=attn_type, top1=top1, top1_source=source))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.pattern, args.img_size, args.attn_type)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from ._common import print_table

    for r in rows:
        r['dims'] = '/'.join(map(str, r['embed_dim']))
        r['depths'] = '/'.join(map(str, r['depth']))
        r['heads'] = '/'.join(map(str, r['num_heads']))
        r['tokens'] = '/'.join(map(str, r['tokens_per_stage']))
    print_table(rows, [('model', 'model'), ('dims', 'embed dims'), ('depths', 'depths'), ('heads', 'heads'),
                       ('params_m', 'params (M)'), ('gmacs', f'GMACs @{args.img_size}'), ('tokens', 'tokens/stage'),
                       ('top1', 'IN-1k top-1 (published)')],
                title=f'UniForm variants ({args.attn_type} attention)')
    return 0
