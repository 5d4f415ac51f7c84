"""Weights shipped with the package (safetensors with label names and preprocessing in their metadata)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
FASHION_MNIST_UNIFORM_T = WEIGHTS_DIR / 'uniform_t_fashion_mnist.safetensors'


def default_checkpoint() -> Path | None:
    """The shipped uniform_t Fashion-MNIST weights, or None where a trimmed install lacks them."""
    return FASHION_MNIST_UNIFORM_T if FASHION_MNIST_UNIFORM_T.is_file() else None


__all__ = ['FASHION_MNIST_UNIFORM_T', 'WEIGHTS_DIR', 'default_checkpoint']
