"""Shared helpers: checkpoints (checkpoint.py)."""
