"""Building blocks: Reuse Attention and its peers (attention.py), Conv/BN blocks (conv.py), the fuse idiom (fuse.py)."""
