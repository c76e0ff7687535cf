"""Every switch of the package, defined once: the ``Literal`` types of config values and the
questions asked of a model mode.

Config fields (:mod:`sidvid_rec.config`), modules and the CLI all take these types, so a
value's spelling lives in one place; ``typing.get_args(ModelMode)`` lists the choices.
Nothing here imports torch: the module is read by the cheap CLI start-up path too.
"""

from typing import Literal

DataFormat = Literal["auto", "ml-100k", "ml-1m", "ml-20m", "ml-latest", "amazon", "interactions"]
"""Input file format (``auto``: detected from the file names; ``interactions``: your own Parquet/CSV
table of user id, item id, timestamp, see ``data.user_col`` ...)."""
InteractionsFile = Literal[".parquet", ".csv"]
"""File name endings of the ``interactions`` format (and of ``data convert --out``)."""
RecommendOutput = Literal[".parquet", ".jsonl"]
"""File name endings ``sidvid-rec recommend --out`` writes."""
SplitProtocol = Literal["loo", "gr"]
"""``loo``: leave-one-out with a validation split; ``gr``: generative-recommenders (no validation)."""
ModelMode = Literal["id", "sid", "sid_id", "cobra", "sid_gen"]
"""Which item tables the model has and how it ranks (see :func:`uses_sids`, :func:`decodes`,
:func:`generates_sids`)."""
Fusion = Literal["sum", "fc", "mlp", "gate"]
"""How ``sid_id`` combines the SID and ID vectors of an item."""
Balance = Literal["balanced", "none"]
"""Balanced (size-constrained) or plain residual k-means."""
SidMethod = Literal["rqkmeans", "rqvae"]
"""How semantic IDs are learned: residual (balanced) k-means on the embeddings, or an RQ-VAE
(encoder, residual codebooks and decoder trained together; codes live in its latent space)."""
Pooling = Literal["auto", "mean", "last"]
"""Token pooling of a Hugging Face text encoder (``auto``: by model type)."""
ResolvedPooling = Literal["mean", "last"]
"""A :data:`Pooling` after ``auto`` is resolved."""
DecoderKind = Literal["direct", "neighbor", "soft", "beam"]
"""COBRA decoder."""
CobraSidHead = Literal["whole", "codes"]
"""COBRA's next-SID head: one softmax over the valid SIDs (``whole``), or ``L`` next-code
softmaxes, level ``l`` conditioned on the codes before it (``codes``: ``L x K`` per position,
whatever the catalogue size; decoded by a trie-constrained beam over codes)."""
BeamFuse = Literal["prod", "sum", "softmax"]
"""How the ``beam`` decoder fuses SID and VID scores."""
VidNegatives = Literal["in_batch", "in_batch_global", "queue", "all"]
"""COBRA VID negative pool (``all``: every item, the exact softmax over the catalogue)."""
ItemNegatives = Literal["uniform", "all", "mixed"]
"""Negatives of the HSTU item softmax: R uniform ones (reference), every item (exact softmax),
or the batch's targets plus R uniform ones (logQ-corrected)."""
LrSchedule = Literal["constant", "cosine"]
"""Learning-rate schedule after the linear warm-up: constant, or cosine decay to ``train.min_lr_ratio``."""
SidSoftmax = Literal["auto", "full", "sampled"]
"""COBRA SID loss: exact softmax over the valid SIDs, sampled, or by catalogue size."""
IndexKind = Literal["flat", "hnsw", "ivf"]
"""FAISS index type."""
Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]
"""TorchRec sharding of the tables (``auto``: the planner's choice)."""
EmbeddingOptimizer = Literal["auto", "rowwise_adagrad", "adagrad", "sgd", "adam"]
"""Fused in-backward optimizer of the tables."""
TrainPipelineKind = Literal["plain", "sparse_dist"]
"""How the training steps run: the plain loop (the reference), or through torchrec's
``TrainPipelineSparseDist`` (batch copy and the tables' input distribution one batch ahead of
compute; needs batch-side lookups, so modes ``id``/``sid``/``sid_id`` with uniform negatives)."""
Device = Literal["auto", "cpu", "cuda"]
"""Where a computation runs (``auto``: CUDA when available)."""
Precision = Literal["fp32", "tf32", "bf16"]
"""Training/inference arithmetic: float32; float32 with TF32 matmuls (CUDA); bfloat16 autocast of the encoder."""
ATTENTION_BLOCK: int = 64
"""Query rows per block of the block-causal HSTU attention kernel (``train.attention_block``'s
default). Smaller blocks skip more of the masked upper triangle but run more, thinner matmuls;
64 was the fastest of 32 / 64 / 128 / whole chunks on ML-100k batches (benchmarks/RESULTS.md,
"Block-causal attention")."""
AttentionScale = Literal["length", "max_len"]
"""HSTU attention is divided by each sequence's true length or by the fixed ``max_len``."""
QueryTime = Literal["target", "own"]
"""COBRA time-bias query time of a token: that of the step it generates, or its own."""
CheckpointChoice = Literal["best", "latest"]
"""Which checkpoint of a run directory export/evaluate read."""

MISSING_ID = -1
"""Item id of an empty slot in a top-K list (the catalogue ran out); never a real item."""


def uses_sids(mode: ModelMode) -> bool:
    """Whether ``mode`` reads semantic IDs (``sids.dir``): every mode but ``id``."""
    return mode != "id"


def decodes(mode: ModelMode) -> bool:
    """Whether ``mode`` ranks through a COBRA decoder (SID first, then VID retrieval) rather
    than by the inner product of one encoder state with every item vector."""
    return mode == "cobra"


def generates_sids(mode: ModelMode) -> bool:
    """Whether ``mode`` generates an item's SID code by code (``sid_gen``: the HSTU over the
    history's code tokens, a trie-constrained beam search ranks the items) rather than scoring
    item vectors or decoding through COBRA. Its SIDs always carry the disambiguation level, so
    a SID names one item."""
    return mode == "sid_gen"


def ranks_by_inner_product(mode: ModelMode) -> bool:
    """Whether ``mode``'s top-K is the encoder state against every item vector (``id``, ``sid``,
    ``sid_id``): neither a COBRA decoder nor SID generation."""
    return not decodes(mode) and not generates_sids(mode)
