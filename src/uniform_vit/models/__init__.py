"""One model family per file. ``uniform.py``: UniForm-T/S/M/L."""
