"""Nearest-neighbour retrieval over item vectors with FAISS (flat / HNSW / IVF, GPU when present)."""

from sidvid_rec.retrieval.faiss_index import MISSING_ID, IndexKind, SearchResult, VidIndex, excluded_mask, gpu_available

__all__ = ["MISSING_ID", "IndexKind", "SearchResult", "VidIndex", "excluded_mask", "gpu_available"]
