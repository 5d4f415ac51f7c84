"""The whole TReX flow behind ``uniform-vit trex``: build/load, score layers, search under a latency budget with
measured latency, verify, evaluate before/after a short fine-tune, and estimate crossbar IMC cost."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from ..layers.flops import count_flops
from .imc_cost import attention_costs, summarize
from .reuse import MODES, TRANSFORMS, apply_reuse, attention_layers, resolve_plan
from .search import LatencyMeter, greedy_search, layer_similarity, loss_score, plan_score


def build_model(model: str, checkpoint: str | None, num_classes: int, in_chans: int, img_size: int,
                patch_size: int | None, attn_type: str | None) -> tuple[nn.Module, dict]:
    """Train-form model (weights from ``checkpoint`` if given) and the checkpoint's metadata."""
    import timm

    import uniform_vit  # noqa: F401  (registers uniform_*)

    from ..cli._common import check_model_name

    check_model_name(model)
    kwargs: dict = {}
    if model.startswith('uniform_'):
        if attn_type:
            kwargs['attn_type'] = attn_type
    else:
        kwargs['img_size'] = img_size
        if patch_size:
            kwargs['patch_size'] = patch_size
    if checkpoint:
        from ..utils.checkpoint import model_from_checkpoint, read_checkpoint

        meta = read_checkpoint(checkpoint)[1]
        if meta.get('fused'):
            raise UserError(f"{checkpoint} holds fused (deploy-form) weights; TReX converts the train form")
        net, meta = model_from_checkpoint(checkpoint, model=model, **kwargs)
        return net.eval(), meta
    try:
        net = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot build {model}: {str(e).splitlines()[0]}") from e
    return net.eval(), {}


def environment() -> dict:
    from ..hardware import cpu_name

    return dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__, precision='fp32', fused=True,
                traced=True, device='cpu', date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec='seconds'))


def run_trex(model: str, budget: float, checkpoint: str | None = None, dataset: str | None = None,
             data_dir: str | None = None, img_size: int | None = None, patch_size: int | None = None,
             in_chans: int | None = None, num_classes: int | None = None, attn_type: str | None = None,
             mode: str = 'attn', transform: str = 'channel', proxy: str = 'similarity',
             layers: Sequence[int] | None = None,
             calib_images: int = 64, val_samples: int | None = None, finetune_epochs: int = 0,
             finetune_samples: int | None = None, finetune_lr: float = 2e-4, finetune_batch: int = 64,
             output: str = 'runs/trex', rounds: int = 15, verify_rounds: int = 30, latency_batch: int = 1,
             threads: int = 1, clock: Callable[[], float] = time.perf_counter, trace: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Search (or take ``layers``), measure, evaluate, fine-tune; return the JSON-ready result."""
    say = log or (lambda s: None)
    if not 0 < budget <= 1:
        raise UserError(f"--budget must be in (0, 1] (a fraction of the original latency), got {budget}")
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if transform not in TRANSFORMS:
        raise UserError(f"unknown --transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if proxy not in ('similarity', 'loss'):
        raise UserError(f"unknown --proxy {proxy!r}; choose similarity or loss")
    if (finetune_epochs or proxy == 'loss') and not (dataset or data_dir):
        raise UserError(f"{'--finetune-epochs' if finetune_epochs else '--proxy loss'} needs data: give --dataset or "
                        "--data-dir")
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    meta: dict = {}
    if checkpoint:
        from ..utils.checkpoint import read_checkpoint

        meta = read_checkpoint(checkpoint)[1]
    if dataset is None and data_dir:
        dataset = 'folder'
    if dataset is None and (finetune_epochs or val_samples):
        dataset = meta.get('dataset')
    chans = in_chans or meta.get('in_chans') or (1 if dataset == 'fashion-mnist' else 3)
    size = img_size or meta.get('img_size') or 224
    classes = num_classes or meta.get('num_classes') or 10
    net, meta = build_model(model, checkpoint, classes, chans, size, patch_size, attn_type)
    classes = getattr(net, 'num_classes', classes)
    attn_layers = attention_layers(net)
    say(f"{model}: {len(attn_layers)} attention layers, {size} px, {chans} channel(s), {threads} thread(s)")

    # data: calibration images from the TRAIN split (never the evaluation split), evaluation on 'val'
    val_ds = calib = None
    if dataset:
        from ..data import create_dataset

        kw = dict(img_size=size, in_chans=chans, num_classes=classes,
                  mean=tuple(meta['mean']) if meta.get('mean') else None,
                  std=tuple(meta['std']) if meta.get('std') else None)
        train_ds = create_dataset(dataset, 'train', data_dir, train=False, **kw)
        n = min(calib_images, len(train_ds))
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(train_ds), generator=g)[:n].tolist()
        calib = torch.stack([train_ds[i][0] for i in idx])
        calib_labels = torch.tensor([train_ds.targets[i] for i in idx])
        val_ds = create_dataset(dataset, 'val', data_dir, train=False, **kw)
        if val_samples:
            val_ds = torch.utils.data.Subset(val_ds, range(min(val_samples, len(val_ds))))
    else:
        say('no data given: calibration uses random images and accuracy is not measured')
        calib = torch.randn(calib_images, chans, size, size, generator=torch.Generator().manual_seed(0))
    batches = list(calib.split(16))

    sim = layer_similarity(net, batches)
    example = calib[:latency_batch].clone()
    meter = LatencyMeter(net, example, mode=mode, transform=transform, rounds=rounds, clock=clock, trace=trace)
    say(f"timing: {meter.rounds} interleaved rounds x {meter.inner} calls, batch {latency_batch}, BN-fused, traced")
    if layers is not None:
        plan = resolve_plan(attn_layers, list(layers))
        res = meter.measure(list(layers), rounds=verify_rounds)
        search = dict(reuse_layers=sorted(plan), sources=plan, latency_ratio=res['latency_ratio'],
                      budget_met=res['latency_ratio'] <= budget, original_ms=res['original_ms'],
                      reuse_ms=res['reuse_ms'], ratio_of_medians=res['ratio_of_medians'],
                      proxy_score=plan_score(plan, sim[mode]) if proxy == 'similarity' else
                      loss_score(net, calib, calib_labels, mode, transform)(plan), steps=[])
    else:
        score = sim[mode] if proxy == 'similarity' else loss_score(net, calib, calib_labels, mode, transform)
        r = greedy_search(net, budget, score, meter, verify_rounds=verify_rounds, log=say)
        search = dict(reuse_layers=r.reuse_layers, sources=r.sources, latency_ratio=r.latency_ratio,
                      budget_met=r.budget_met, original_ms=r.original_ms, reuse_ms=r.reuse_ms,
                      ratio_of_medians=r.ratio_of_medians,
                      proxy_score=r.proxy_score, steps=r.steps)
    reused = apply_reuse(net, search['reuse_layers'], mode, transform)

    one = example[:1]
    flops_o, flops_r = count_flops(net.eval(), one), count_flops(reused.eval(), one)
    imc = summarize(attention_costs(net, one), attention_costs(reused, one))
    params_o = sum(p.numel() for p in net.parameters())
    params_r = sum(p.numel() for p in reused.parameters())

    top1 = dict(original=None, reused=None, finetuned=None)
    finetune: dict | None = None
    if val_ds is not None:
        from ..train.distributed import DistInfo, pick_device
        from ..train.engine import eval_loader, evaluate

        dev = pick_device('cpu')
        loader = eval_loader(val_ds, 256, DistInfo(device=dev), workers=0)
        top1['original'] = round(evaluate(net, loader, classes, dev)['top1'], 2)
        top1['reused'] = round(evaluate(reused, loader, classes, dev)['top1'], 2)
        say(f"top-1 on {dataset} val ({len(val_ds)} images): original {top1['original']}, "
            f"reused (no fine-tune) {top1['reused']}")
        if finetune_epochs and search['reuse_layers']:
            from ..train.config import make_config
            from ..train.engine import train

            cfg = make_config(model=model, dataset=dataset, data_dir=data_dir, recipe='small', epochs=finetune_epochs,
                              img_size=size, in_chans=chans, num_classes=classes, lr=finetune_lr, warmup_epochs=0.0,
                              batch_size=finetune_batch, train_samples=finetune_samples, val_samples=val_samples,
                              output=output, threads=threads, device='cpu', progress=False, workers=0)
            t0 = time.perf_counter()
            summary = train(cfg, model=reused)
            reused.eval()
            top1['finetuned'] = round(evaluate(reused, loader, classes, dev)['top1'], 2)
            finetune = dict(epochs=finetune_epochs, samples=finetune_samples, lr=finetune_lr, batch=finetune_batch,
                            seconds=round(time.perf_counter() - t0, 1), output=output,
                            checkpoint=summary.get('last_checkpoint'))
            say(f"top-1 after {finetune_epochs} fine-tune epoch(s): {top1['finetuned']}")

    return dict(
        model=model, checkpoint=checkpoint, attn_type=getattr(net, 'attn_type', None), img_size=size,
        patch_size=patch_size, in_chans=chans, num_classes=classes, dataset=dataset, mode=mode,
        transform=transform if mode == 'output' else None, budget=budget, proxy_kind=proxy,
        num_attention_layers=len(attn_layers), reuse_layers=search['reuse_layers'],
        sources={str(k): v for k, v in sorted(search['sources'].items())},
        latency_ratio=round(search['latency_ratio'], 4), budget_met=bool(search['budget_met']),
        original_ms=round(search['original_ms'], 4), reuse_ms=round(search['reuse_ms'], 4),
        ratio_of_medians=round(search['ratio_of_medians'], 4),
        latency_batch=latency_batch, proxy_score=round(search['proxy_score'], 4), search_steps=search['steps'],
        proxy={'attn': {f'{i}<-{j}': round(v, 4) for (i, j), v in sim['attn'].items()},
               'output': {f'{i}<-{j}': round(v, 4) for (i, j), v in sim['output'].items()}},
        flops_original=flops_o, flops_reused=flops_r, flops_ratio=round(flops_r / flops_o, 4),
        params_original=params_o, params_reused=params_r,
        top1_original=top1['original'], top1_reused=top1['reused'], top1_finetuned=top1['finetuned'],
        val_images=len(val_ds) if val_ds is not None else None, finetune=finetune,
        imc_estimate=imc, environment=environment())
