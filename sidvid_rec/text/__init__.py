"""Item text -> embeddings: HF encoders (mean / last-token pooling), a tfidf fallback, a disk cache."""

from sidvid_rec.text.embed import embed_dataset, embed_items, embed_texts
from sidvid_rec.text.encoders import AVAILABLE, HFEncoder, TextEncoder, TfidfEncoder, build_encoder
from sidvid_rec.text.store import EmbeddingSet, load_embeddings, save_embeddings

__all__ = ["AVAILABLE", "EmbeddingSet", "HFEncoder", "TextEncoder", "TfidfEncoder", "build_encoder",
           "embed_dataset", "embed_items", "embed_texts", "load_embeddings", "save_embeddings"]
