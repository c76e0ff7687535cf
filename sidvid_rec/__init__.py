"""sidvid_rec: generative sequential recommendation with semantic IDs (SID) and vector IDs (VID).

HSTU (a jagged causal sequence transducer) over TorchRec embedding tables, TIGER/OneRec-style
semantic IDs (balanced residual k-means over item text embeddings) and COBRA (interleaved
SID/VID generation decoded by beam search + FAISS). Importing the package is cheap; torch,
torchrec and fbgemm load with the modules that need them (see :mod:`sidvid_rec.stack`).
"""

__version__ = "0.1.0"
