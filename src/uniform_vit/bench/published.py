"""Published ImageNet-1K figures with their sources (``published.yaml``)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def load_published() -> dict[str, dict]:
    import yaml

    return yaml.safe_load((Path(__file__).with_name('published.yaml')).read_text())


def published_top1(model: str) -> tuple[float | None, str | None]:
    """(top-1 %, source) for a timm model name; tags like '.r224_in1k' are ignored."""
    row = load_published().get(model.split('.')[0])
    return (row.get('top1'), row.get('source')) if row else (None, None)
