"""Each model's TorchScript deploy forms against each other (session 32): plain ``torch.jit.trace``, the trace
frozen (``torch.jit.freeze``), and frozen + ``torch.jit.optimize_for_inference`` (oneDNN's blocked layouts for
convs and linears, fused adds and activations). Fused deploy form (``reparameterize``), one thread, batch 16, each
model's default input size, the three forms interleaved round by round (uniform_vit.bench.harness), medians;
speed-ups are medians of per-round ratios against the plain trace. The outputs are checked to agree.

    python benchmarks/scripts/script_forms.py --models uniform_t,efficientvit_m0,mobilenetv3_small_100 --rounds 7

``uniform-vit bench`` (backend jit) runs each model in the faster of the two frozen forms since session 32
(``uniform_vit.bench.models.best_script_form``); this script shows what that choice is worth per model.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from uniform_vit.bench.harness import interleaved_timing, median, spread
from uniform_vit.bench.models import FULL_MODELS, create, quiet
from uniform_vit.layers.fuse import reparameterize
from uniform_vit.utils.malloc import tune_allocator


def forms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.jit.ScriptModule]:
    with quiet(), torch.no_grad():
        model(x)  # the modules' inference caches, built outside the tracer (as the bench does)
        out = {'traced': torch.jit.trace(model, x, check_trace=False)}
        out['frozen'] = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False).eval())
        out['frozen+oneDNN'] = torch.jit.optimize_for_inference(
            torch.jit.freeze(torch.jit.trace(model, x, check_trace=False).eval()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', default=','.join(FULL_MODELS))
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--rounds', type=int, default=7)
    args = ap.parse_args()
    tune_allocator()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    print(f'batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}, '
          f'{torch.backends.cpu.get_cpu_capability()}, {args.rounds} interleaved rounds')
    print('| model | traced ms | frozen / traced | frozen+oneDNN / traced | max diff |')
    print('|---|---|---|---|---|')
    for name in args.models.split(','):
        model, size = create(name)
        model = reparameterize(model).eval()
        x = torch.randn(args.batch_size, *size)
        fs = forms(model, x)
        with torch.inference_mode():
            ref = fs['traced'](x)
            diff = max((f(x) - ref).abs().max().item() for f in fs.values())
            t = interleaved_timing({k: (lambda f=f, x=x: f(x)) for k, f in fs.items()}, rounds=args.rounds, warmup=1,
                                   rewarm=1)
        cells = []
        for k in ('frozen', 'frozen+oneDNN'):
            r = [a / b for a, b in zip(t['traced'], t[k])]
            cells.append(f'{median(r):.3f}x ({100 * spread(r):.0f}%)')
        print(f"| {name} | {1e3 * median(t['traced']):.2f} | {' | '.join(cells)} | {diff:.1e} |", flush=True)


if __name__ == '__main__':
    main()
