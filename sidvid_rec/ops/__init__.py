"""Tensor ops, each fast path with a plain PyTorch reference.

* :mod:`sidvid_rec.ops.jagged`: offsets/lengths, per-token indices, jagged <-> padded,
  time buckets, length chunking of a jagged batch.
* :mod:`sidvid_rec.ops.hstu_attention`: the jagged HSTU attention (relative bias, causal mask).
"""
