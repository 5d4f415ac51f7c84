"""Shared helpers: checkpoints (checkpoint.py), test-time augmentation (tta.py), glibc malloc tuning (malloc.py)."""
