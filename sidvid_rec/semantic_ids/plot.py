"""``code_usage.png``: per layer, items per code sorted by count (Agg backend, no pyplot state)."""

import io as _bytes_io
from typing import Optional

import numpy as np

from sidvid_rec import storage
from sidvid_rec.semantic_ids.kmeans import SizeBounds
from sidvid_rec.semantic_ids.report import code_usage


def code_usage_png(codes: np.ndarray, codebook_size: int, bounds: Optional[SizeBounds] = None) -> bytes:
    """PNG bytes: one panel per layer of ``codes [N, L]``; dashed lines at the size bounds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib loads only when a report is drawn
    from matplotlib.figure import Figure  # lazy: matplotlib loads only when a report is drawn

    usage = code_usage(codes, codebook_size)
    fig = Figure(figsize=(4.0 * len(usage), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    mean = codes.shape[0] / codebook_size
    for layer, counts in enumerate(usage):
        ax = fig.add_subplot(1, len(usage), layer + 1)
        ax.bar(np.arange(codebook_size), np.sort(counts)[::-1], width=1.0, color="tab:blue")
        ax.axhline(mean, color="black", linewidth=0.8, label="n/K")
        if bounds is not None:
            for value in (bounds.lower, bounds.upper):
                ax.axhline(value, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer + 1}: {int((counts > 0).sum())}/{codebook_size} codes used")
        ax.set_xlabel("code (sorted by count)")
        ax.set_ylabel("items")
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_code_usage_png(path: str, codes: np.ndarray, codebook_size: int,
                         bounds: Optional[SizeBounds] = None) -> None:
    """Writes :func:`code_usage_png` to ``path`` atomically."""
    blob = code_usage_png(codes, codebook_size, bounds)
    with storage.atomic_open(path, "wb") as f:
        f.write(blob)
