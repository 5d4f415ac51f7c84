"""Helpers shared by the commands: model-name checks with suggestions, threads, tables."""

from __future__ import annotations

import difflib
import fnmatch

from ..errors import UserError


def all_model_names() -> list[str]:
    import timm

    import uniform_vit  # noqa: F401  (registers uniform_*)

    return timm.list_models()


def check_model_name(name: str) -> str:
    """Return ``name`` if timm knows it, else raise UserError with the closest names."""
    names = all_model_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    raise UserError(f"unknown model {name!r}{hint}")


def expand_models(spec: str) -> list[str]:
    """Comma list of names or glob patterns ('uniform_*,efficientvit_m0') -> names, order kept, each checked."""
    out: list[str] = []
    names = None
    for part in (p.strip() for p in spec.split(',')):
        if not part:
            continue
        if any(c in part for c in '*?['):
            names = names or all_model_names()
            hits = [n for n in names if fnmatch.fnmatch(n, part)]
            if not hits:
                raise UserError(f"pattern {part!r} matches no model")
            out += [h for h in hits if h not in out]
        elif part not in out:
            out.append(check_model_name(part))
    if not out:
        raise UserError("no models given")
    return out


def _int_at_least(text: str, low: int) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (counts of things that must happen)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (warm-up and re-warm calls, which may be skipped)."""
    return _int_at_least(text, 0)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    """Print rows as a table for people. ``columns``: (key, header) pairs; the first column (model or mechanism
    names) is left-aligned and never wraps, the others are right-aligned numbers."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style='bold')
    for i, (_, header) in enumerate(columns):
        table.add_column(header, justify='left' if i == 0 else 'right', no_wrap=i == 0)
    for r in rows:
        table.add_row(*('' if r.get(k) is None else str(r.get(k)) for k, _ in columns))
    Console(width=max(140, Console().width)).print(table)
