"""Batched, cached embedding of item texts.

:func:`embed_dataset` is the one entry point from a config (``sids`` encoder settings, the
cache under ``data.cache_dir``): ``sidvid-rec embed``, ``sids build`` and COBRA's text
projection all call it.

Example::

    encoder = build_encoder("minilm")
    vectors, identity = embed_items(data.item_text, encoder, cache_dir="~/.cache/sidvid_rec/embeddings")
    vectors  # [N+1, D] float32, row 0 (padding item) all zeros, rows 1..N unit norm
"""

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from sidvid_rec import storage
from sidvid_rec.config import Config, SidsConfig
from sidvid_rec.data import SequenceData
from sidvid_rec.errors import UserError
from sidvid_rec.text.cache import EmbeddingCache
from sidvid_rec.text.encoders import TextEncoder, build_encoder, l2_normalize, text_key


def _encode_missing(texts: List[str], encoder: TextEncoder, batch_size: int,
                    progress: bool) -> np.ndarray:
    """``[len(texts), D]``: texts sorted by length so each batch pads little, then put back."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts: List[np.ndarray] = []
    with tqdm(total=len(texts), desc="embedding item texts", unit="text", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            parts.append(np.asarray(encoder.encode(batch), dtype=np.float32))
            bar.update(len(batch))
    encoded = np.concatenate(parts)
    out = np.empty_like(encoded)
    out[order] = encoded
    return l2_normalize(out)


def embed_texts(texts: Sequence[str], encoder: TextEncoder, cache_dir: Optional[str] = None,
                batch_size: int = 64, progress: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Embeds ``texts`` into ``[n, D]`` float32 unit vectors, encoding only texts not cached.

    Returns the vectors and the encoder identity (the cache key, recorded in artifacts).
    Identical texts are encoded once.
    """
    if batch_size < 1:
        raise UserError(f"text batch size must be positive, got {batch_size}")
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object), return_inverse=True)
    unique_texts = [str(t) for t in unique]
    if not unique_texts:
        raise UserError("no item texts to embed (the item set is empty)")
    encoder.prepare(unique_texts)
    identity = encoder.identity()
    keys = np.frombuffer(b"".join(text_key(t) for t in unique_texts), dtype=np.uint8).reshape(-1, 32)
    cache = EmbeddingCache(cache_dir, identity) if cache_dir else None
    found, cached = cache.lookup(keys) if cache else (np.zeros(len(unique_texts), bool), None)
    missing = np.flatnonzero(~found)
    if missing.size:
        fresh = _encode_missing([unique_texts[i] for i in missing], encoder, batch_size, progress)
        if cache is not None:
            cache.add(keys[missing], fresh)
        vectors = np.zeros((len(unique_texts), fresh.shape[1]), dtype=np.float32)
        vectors[missing] = fresh
        if found.any():
            if cached.shape[1] != fresh.shape[1]:
                raise UserError(f"embedding cache {cache.dir} holds dim {cached.shape[1]} vectors but the "
                                f"encoder gives dim {fresh.shape[1]}; delete that directory")
            vectors[found] = cached[found]
    else:
        vectors = cached
    return vectors[inverse.reshape(-1)], identity


def embed_items(item_text: Sequence[str], encoder: TextEncoder, cache_dir: Optional[str] = None,
                batch_size: int = 64, progress: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Embeddings ``[N+1, D]`` of items 1..N of ``item_text`` (index 0 = padding item).

    Row 0 stays all zeros; it is never encoded.
    """
    if len(item_text) < 2:
        raise UserError("no items to embed (the item set is empty)")
    vectors, identity = embed_texts(item_text[1:], encoder, cache_dir, batch_size, progress)
    padded = np.zeros((vectors.shape[0] + 1, vectors.shape[1]), dtype=np.float32)
    padded[1:] = vectors
    return padded, identity


def encoder_from_config(sids: SidsConfig) -> TextEncoder:
    """The configured text encoder (flat arguments out of the ``sids`` section)."""
    return build_encoder(sids.encoder, pooling=sids.pooling, max_tokens=sids.max_tokens,
                         device=sids.text_device, tfidf_dim=sids.tfidf_dim, seed=sids.seed)


def embed_cache_dir(cfg: Config) -> str:
    """``sids.embed_cache_dir``, or ``<data.cache_dir>/embeddings`` when empty."""
    return storage.expand(cfg.sids.embed_cache_dir or os.path.join(cfg.data.cache_dir, "embeddings"))


def embed_dataset(cfg: Config, data: SequenceData, progress: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Embeddings ``[N+1, D]`` of ``data``'s items and their manifest (without file hashes)."""
    vectors, identity = embed_items(data.item_text, encoder_from_config(cfg.sids), embed_cache_dir(cfg),
                                    cfg.sids.text_batch_size, progress)
    manifest = {"encoder": identity, "pooling": identity.get("pooling"), "data_fingerprint": data.fingerprint,
                "data_format": data.format}
    return vectors, manifest
