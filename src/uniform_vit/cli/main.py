"""``uniform-vit``: one entry point, one module per subcommand.

Each command module defines ``HELP`` (one line), ``EXAMPLES`` (shown in --help), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports stay inside ``run`` so ``uniform-vit --help`` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# command name -> module under uniform_vit.cli
COMMANDS: dict[str, str] = {
    'models': 'models',
    'predict': 'predict',
    'bench': 'bench',
    'bench-attn': 'bench_attn',
    'train': 'train',
    'val': 'val',
    'export': 'export',
    'cam': 'cam',
    'trex': 'trex',
}

EXAMPLES = """examples:
  uniform-vit bench                          quick benchmark: UniForm vs its peers on this machine
  uniform-vit models                         the UniForm variants: params, GMACs, published top-1
  uniform-vit predict shoe.png --model uniform_t
  uniform-vit train --model uniform_t --dataset fashion-mnist --recipe small --output runs/fm
  uniform-vit export --model uniform_s --format onnx --output uniform_s.onnx
run 'uniform-vit COMMAND --help' for the options of one command."""


def _load_commands() -> dict[str, object]:
    mods = {}
    for name, mod in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(f'uniform_vit.cli.{mod}')
        except ModuleNotFoundError as e:
            if e.name != f'uniform_vit.cli.{mod}':
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    from uniform_vit import __version__

    parser = argparse.ArgumentParser(
        prog='uniform-vit', description='UniForm (Reuse Attention) vision transformers for edge devices.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'uniform-vit {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, mod in _load_commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=getattr(mod, 'EXAMPLES', None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    known = set(_load_commands())
    if not argv[0].startswith('-') and argv[0] not in known:
        close = difflib.get_close_matches(argv[0], sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; commands: {', '.join(sorted(known))}"
        print(f"uniform-vit: error: unknown command '{argv[0]}'{hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, '_run', None) is None:
        parser.print_help()
        return 0
    from uniform_vit.errors import UserError
    from uniform_vit.utils.malloc import tune_allocator

    tune_allocator()  # before any model or batch exists: keeps freed tensors' pages (utils/malloc.py)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"uniform-vit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uniform-vit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
