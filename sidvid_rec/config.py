"""Typed configuration: small dataclass sections, YAML files, ``section.key=value`` overrides.

Precedence: command-line overrides > YAML file > dataclass defaults. The defaults alone
describe the HSTU ``id`` model on the embedded ml-latest-small data. Modules never see
the whole :class:`Config`: the builders (``models/build.py``, ``train/``, ``eval/``,
``export/``) and the CLI hand each module its own section, or a small settings dataclass
that a section inherits (:class:`RqParams` of ``sids``, :class:`DecoderSettings` of
``eval``; :func:`narrow` cuts it out), so no setting is declared twice. The value types
(``Literal`` switches) live in :mod:`sidvid_rec.types`.

Example::

    cfg = load_config("configs/ml-100k/hstu.yaml", ["model.mode=sid_id", "train.epochs=3"])
"""

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from sidvid_rec import storage
from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.types import (AttentionScale, Balance, BeamFuse, DataFormat, DecoderKind, Device, EmbeddingOptimizer,
                              Fusion, IndexKind, ModelMode, Pooling, Precision, QueryTime, Sharding, SidMethod, SidSoftmax,
                              SplitProtocol, VidNegatives)

T = TypeVar("T")


@dataclass
class DataConfig:
    path: str = ""
    """Data directory; empty = the embedded MovieLens ml-latest-small."""
    format: DataFormat = "auto"
    """File format; ``auto`` detects it from the file names in ``path``."""
    protocol: SplitProtocol = "loo"
    """``loo``: leave-one-out with validation; ``gr``: generative-recommenders (no validation)."""
    max_len: int = 200
    """History cap: the most recent ``max_len`` items of a sequence are kept."""
    min_len: int = 5
    """Users with fewer interactions are dropped (and counted in the stats)."""
    cache_dir: str = "~/.cache/sidvid_rec"
    """Where preprocessed sequences are cached (keyed by a fingerprint of the input files)."""
    user_col: str = "user_id"
    """``interactions`` format: column of the user ids (integers)."""
    item_col: str = "item_id"
    """``interactions`` format: column of the item ids (integers), in ``path`` and ``items_path``."""
    time_col: str = "timestamp"
    """``interactions`` format: column of the times (integer seconds, or a Parquet timestamp)."""
    rating_col: str = "rating"
    """``interactions`` format: optional rating column (used when present; otherwise every rating is 1)."""
    items_path: str = ""
    """``interactions`` format: optional Parquet/CSV item table (``item_col`` + ``text_cols``) giving the
    item texts; empty = no item table (each item's text is ``item <id>``, enough for ``model.mode=id``)."""
    text_cols: List[str] = field(default_factory=lambda: ["title", "genres"])
    """``interactions`` format: item-table columns forming an item's text: ``<first>. <Col>: <value>. ...``
    (empty values skipped); the ``title`` column (else the first one) is the item's title."""
    read_batch_rows: int = 250_000
    """``interactions`` format: rows read per batch (bounds the reader's working memory)."""


@dataclass
class RqParams:
    """Residual k-means settings (the ``sids`` keys that :func:`~sidvid_rec.semantic_ids.residual.residual_kmeans` takes)."""

    layers: int = 3
    """Residual k-means layers L."""
    codebook_size: int = 256
    """Codes per layer K."""
    balance: Balance = "balanced"
    """``balanced``: OneRec-style size-constrained k-means; ``none``: plain RQ-KMeans."""
    tol: float = 0.1
    """Cluster sizes must lie in [ceil(n/K*(1-tol)), floor(n/K*(1+tol))]."""
    kmeans_iters: int = 25
    """Lloyd iterations of the initial (FAISS) k-means per layer."""
    balance_iters: int = 50
    """Maximum rebalancing rounds per layer."""
    max_points_per_code: int = 256
    """k-means and balancing rounds use at most this many points per code (a seeded sample); all items get codes."""
    seed: int = 0
    """Seed of the k-means initialisation."""


@dataclass
class RqVaeParams(RqParams):
    """RQ-VAE settings (:func:`~sidvid_rec.semantic_ids.rqvae.train_rqvae`): the ``rqvae_*`` keys on
    top of :class:`RqParams`, whose ``layers``, ``codebook_size``, ``kmeans_iters`` (codebook
    initialisation), ``max_points_per_code`` and ``seed`` it shares; ``balance``/``tol``/``balance_iters``
    do not apply to it."""

    rqvae_hidden: int = 256
    """Width of the encoder's and the decoder's hidden layer (embedding dim -> hidden -> latent)."""
    rqvae_latent: int = 32
    """Latent width, the dimension of the residual codebooks."""
    rqvae_epochs: int = 200
    """Maximum training epochs (early stopping on the held-out reconstruction loss may end sooner)."""
    rqvae_lr: float = 1e-3
    """Adam learning rate of the encoder, decoder and codebooks."""
    rqvae_beta: float = 0.25
    """Weight of the commitment loss ||r - sg[e]||^2 (the codebook loss ||sg[r] - e||^2 has weight 1)."""
    rqvae_patience: int = 20
    """Stop when the held-out reconstruction loss has not improved for this many epochs."""
    rqvae_batch_size: int = 512
    """Items per training step."""
    rqvae_val_fraction: float = 0.1
    """Share of the items held out (seeded) for early stopping; every item gets codes."""
    rqvae_restarts: bool = True
    """Re-seed codes unused for a whole epoch from random residuals of the epoch's last batch."""


@dataclass
class SidsConfig(RqVaeParams):
    """Text embedding and semantic-ID settings; the k-means ones are inherited from :class:`RqParams`,
    the RQ-VAE ones from :class:`RqVaeParams`."""

    method: SidMethod = "rqkmeans"
    """``rqkmeans``: residual (balanced) k-means on the embeddings; ``rqvae``: a trained RQ-VAE."""
    encoder: str = "minilm"
    """Text encoder: ``minilm`` (shipped weights), ``tfidf`` (no weights) or a local HF model dir."""
    pooling: Pooling = "auto"
    """Token pooling: ``mean`` (BERT-style), ``last`` (decoder LMs); ``auto`` picks by model type."""
    text_batch_size: int = 64
    """Items encoded per forward pass."""
    max_tokens: int = 128
    """Item texts are truncated to this many tokens."""
    tfidf_dim: int = 256
    """Width of the ``tfidf`` encoder (TruncatedSVD components; capped by vocabulary and corpus size)."""
    text_device: Device = "auto"
    """Where the HF text encoder runs; ``auto``: CUDA when available."""
    embed_cache_dir: str = ""
    """Embedding cache keyed by (encoder, text); empty = ``<data.cache_dir>/embeddings``."""
    dedup: bool = True
    """Whether the SIDs are meant with the TIGER disambiguation code (recorded in the manifest;
    the code is stored either way, and the models append it with ``model.sid_dedup``)."""
    threads: int = 0
    """FAISS threads of the k-means; 0 = library default (all cores). 1 is faster on an oversubscribed machine."""
    dir: str = ""
    """Semantic-ID artifact directory used by ``sid``/``sid_id``/``cobra`` models."""


@dataclass
class ModelConfig:
    mode: ModelMode = "id"
    """``id``: item-ID HSTU; ``sid``: prefixN SID only; ``sid_id``: fused; ``cobra``: SID/VID;
    ``sid_gen``: generates the SID code by code (HSTU over code tokens, trie-constrained beam)."""
    fusion: Fusion = "sum"
    """How SID and ID vectors are combined in ``sid_id`` mode."""
    dim: int = 50
    """Embedding / model width d."""
    num_blocks: int = 2
    """HSTU layers."""
    num_heads: int = 1
    """Attention heads."""
    dqk: int = 50
    """Query/key width per head."""
    dv: int = 50
    """Value width per head."""
    dropout: float = 0.2
    """Dropout on the input embeddings and each layer's output."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights."""
    num_time_buckets: int = 128
    """Relative time bias buckets: floor(ln(max(|dt|,1))/0.301) clamped to [0, this]."""
    attention_scale: AttentionScale = "length"
    """Attention is divided by each sequence's true length or by the fixed ``max_len``."""
    sid_table_size: int = 0
    """Rows of the SID-prefix table; 0 = one row per distinct prefix (no hash collisions)."""
    text_projection: bool = False
    """COBRA: add a projection of the item's text embedding to its VID token."""
    cobra_sid_layers: int = 0
    """COBRA: SID = the first this many code layers (coarser SIDs); 0 = all layers."""
    sid_dedup: bool = False
    """Append the TIGER disambiguation code (stored by every ``sids build``) as one more SID
    layer, so every item's SID is unique (SID models rank items, not item groups)."""
    cobra_query_time: QueryTime = "target"
    """COBRA time-bias query time: ``target`` (of the step a token generates) or ``own`` (the token's)."""
    cobra_sid_dropout: float = 0.0
    """COBRA training: share of SID tokens whose vector is zeroed (type and position stay), so the
    VID query also learns to predict the item from the history alone."""


@dataclass
class LossConfig:
    num_negatives: int = 128
    """R uniform negatives from the whole item set (sampled softmax)."""
    temperature: float = 0.05
    """Softmax temperature on cosine similarities."""
    vid_weight: float = 1.0
    """COBRA: lambda in L = L_sid + lambda * L_vid."""
    vid_negatives: VidNegatives = "in_batch_global"
    """COBRA VID negative pool: in-batch only, plus R global negatives, or a memory queue."""
    queue_size: int = 4096
    """COBRA: item vectors kept in the cross-batch memory queue."""
    vid_num_negatives: int = 0
    """COBRA ``in_batch_global``: R global VID negatives; 0 = ``num_negatives``."""
    vid_max_in_batch: int = 0
    """COBRA: cap on in-batch VID pool entries (a uniform subset); 0 = every position of the batch."""
    shared_negatives: bool = False
    """Sampled softmax: one set of R negatives for the whole batch (cheap) instead of R per position (reference)."""
    negatives_block: int = 0
    """Sampled softmax: one draw of R negatives per block of this many consecutive positions (same
    expected loss and gradient as per-position draws, far cheaper); 0 = per position (reference)."""
    fused: bool = True
    """Sampled softmax and InfoNCE through the chunked, hand-differentiated kernel
    (``sidvid_rec.ops.sampled_softmax``); false = plain autograd ops (same values, slower)."""
    sid_softmax: SidSoftmax = "auto"
    """COBRA SID loss: ``full`` softmax over every valid SID, ``sampled`` (R = ``num_negatives``
    items mapped to their SIDs), or ``auto``: full when there are at most ``num_negatives`` SIDs."""
    logq_correction: bool = True
    """COBRA: subtract from each sampled logit the log of its candidate's expected count (SIDs drawn
    through uniform items, in-batch/queue VIDs drawn by popularity): the sampling-bias correction
    that makes the sampled losses estimate full softmaxes, so decoders get calibrated scores."""


@dataclass
class TrainConfig:
    epochs: int = 101
    """Maximum epochs (early stopping may end sooner)."""
    batch_size: int = 128
    """Global batch size in sequences (split across ranks)."""
    lr: float = 1e-3
    """AdamW learning rate of the dense parameters."""
    betas: Tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    embedding_optimizer: EmbeddingOptimizer = "auto"
    """Fused optimizer of the TorchRec tables; ``auto``: row-wise Adagrad on every device (its
    learning rate is ``embedding_lr``); ``adam`` (CUDA only) wants an Adam rate there, e.g. 1e-3."""
    embedding_lr: float = 0.05
    """Learning rate of the fused table optimizer (Adagrad-family needs a larger one)."""
    seed: int = 42
    """Seed of initialisation, shuffling, dropout and negative sampling."""
    patience: int = 10
    """Stop when validation NDCG@10 has not improved for this many evaluations."""
    eval_every: int = 1
    """Validate every this many epochs."""
    resume: bool = False
    """Continue from the run directory's last checkpoint."""
    sharding: Sharding = "auto"
    """TorchRec sharding of the tables: planner's choice or forced."""
    device: Device = "auto"
    """``auto``: CUDA when available."""
    precision: Precision = "fp32"
    """Arithmetic of the encoder: ``fp32``; ``tf32`` (float32 with TF32 matmuls on CUDA, no effect
    on the CPU); ``bf16`` (the HSTU layers under bfloat16 autocast, CPU or CUDA; tables, losses and
    the optimizer state stay float32)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit); for smoke tests."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps inside an epoch (0 = at epoch ends only)."""


@dataclass
class DecoderSettings:
    """Knobs of the COBRA decoders (:mod:`sidvid_rec.decode`); the ``eval`` keys of the same names."""

    soft_k: int = 5
    """``soft``: top-k SIDs mixed."""
    soft_tau: float = 0.5
    """``soft``: weights are softmax(cosine / soft_tau)."""
    beam_size: int = 5
    """``beam``: SIDs kept."""
    beam_ann: int = 50
    """``beam``: items retrieved per SID (at least K are retrieved, so K distinct items exist)."""
    beam_fuse: BeamFuse = "prod"
    """``beam``: how SID and VID scores are fused."""
    alpha: float = 0.5
    """``beam``: SID weight (``prod``/``sum``) or SID logit multiplier (``softmax``)."""
    beta: float = 1.0
    """``beam`` with ``softmax`` fusion: VID logit multiplier (temperature of the ANN scores)."""
    kv_cache: bool = True
    """Decode from the encoder's KV cache: the history is encoded once and each appended token
    attends to it (equal to re-encoding; ``false`` re-encodes the history per query, the
    reference of the parity tests and the benchmark). COBRA decoders and ``sid_gen``'s beam."""


@dataclass
class EvalConfig(DecoderSettings):
    """Evaluation settings; the decoder knobs are inherited from :class:`DecoderSettings`."""

    ks: List[int] = field(default_factory=lambda: [1, 5, 10, 50, 200])
    """Cut-offs of HR@K (NDCG@K for every K > 1)."""
    batch_size: int = 256
    """Users scored per batch."""
    filter_history: bool = True
    """Remove items already in the history from the ranking."""
    decoder: DecoderKind = "direct"
    """COBRA decoder."""
    sid_gen_beam: int = 0
    """``sid_gen``: beam width of the trie-constrained beam search; 0 (or less than ``max(ks)``)
    = ``max(ks)``, so the beam always holds a full top-K list."""


@dataclass
class RetrievalConfig:
    index: IndexKind = "flat"
    """FAISS index: exact inner product, HNSW or IVF."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    ef_search: int = 256
    """HNSW search depth."""
    ivf_nlist: int = 0
    """IVF lists; 0 = 4 * sqrt(items)."""
    nprobe: int = 16
    """IVF lists visited per query."""
    use_gpu: bool = True
    """Use a GPU index when faiss-gpu and CUDA are present."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    sids: SidsConfig = field(default_factory=SidsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks ``value`` against a field annotation; converts int->float, list->tuple."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is typing.Union and type(None) in args:
        return None if value is None else _coerce(value, args[0], where)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _section_types(section_cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown config section {section!r} (sections: {', '.join(sections)})")
    obj = getattr(cfg, section)
    hints = _section_types(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown config key {section}.{key}")
    setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


# ----------------------------------------------------------------------------- validation

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# FAISS k-means takes its seed as a C int (sids.seed + layer must fit it); train.seed gets the same
# bound so that the trainer's derived torch seeds (seed * 1000 + 7919 * step) stay within 64 bits.
SEED_MAX = 2**31 - 1
SELECT_K = 10
"""Validation NDCG@K that selects checkpoints and drives early stopping (``SELECT_METRIC`` of
``train/trainer.py``), so ``eval.ks`` must include it."""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """Accepted values of a numeric field (of each element of a list/tuple field).

    Bounds left ``None`` are open; ``also`` lists values accepted outside them (a 0 that means
    "off" or "auto"); floats must be finite whatever the bounds (YAML ``.nan``/``.inf`` are floats).
    """

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    also: Tuple[int, ...] = ()
    why: str = ""

    def accepts(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self, is_float: bool) -> str:
        """The rule as the end of "``name`` must ...", e.g. ``be positive and finite``."""
        low = self.gt if self.gt is not None else self.ge
        high = self.lt if self.lt is not None else self.le
        if low is not None and high is not None:
            left, right = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            text = f"lie in {left}{_number(low)}, {_number(high)}{right}"
        elif self.gt is not None:
            text = "be positive" if self.gt == 0 else f"be greater than {_number(self.gt)}"
        elif self.ge is not None:
            text = "be >= 0" if self.ge == 0 else f"be at least {_number(self.ge)}"
        elif high is not None:
            text = f"be below {_number(high)}" if self.lt is not None else f"be at most {_number(high)}"
        else:
            text = "be a number"
        if is_float and high is None:  # a bounded interval already excludes nan and inf
            text += " and finite"
        if self.also:
            text = f"be {' or '.join(_number(v) for v in self.also)} or {text.removeprefix('be ')}"
        return f"{text} ({self.why})" if self.why else text


_POSITIVE, _NON_NEGATIVE = Range(gt=0), Range(ge=0)
_UNIT, _UNIT_OPEN = Range(ge=0, le=1), Range(ge=0, lt=1)
_SEED = Range(ge=0, le=SEED_MAX)

_RANGES: Dict[str, Range] = {
    "data.max_len": _POSITIVE,
    "data.min_len": Range(ge=3, why="train, valid and test items"),
    "data.read_batch_rows": _POSITIVE,
    "sids.text_batch_size": _POSITIVE,
    "sids.max_tokens": _POSITIVE,
    "sids.tfidf_dim": _POSITIVE,
    "sids.layers": _POSITIVE,
    "sids.codebook_size": _POSITIVE,
    "sids.tol": _UNIT_OPEN,
    "sids.kmeans_iters": _POSITIVE,
    "sids.balance_iters": _NON_NEGATIVE,
    "sids.max_points_per_code": _POSITIVE,
    "sids.threads": _NON_NEGATIVE,  # 0 = the FAISS default
    "sids.seed": _SEED,
    "sids.rqvae_hidden": _POSITIVE,
    "sids.rqvae_latent": _POSITIVE,
    "sids.rqvae_epochs": _POSITIVE,
    "sids.rqvae_lr": _POSITIVE,
    "sids.rqvae_beta": _NON_NEGATIVE,  # 0: codebook loss only (the encoder is not pulled to its codes)
    "sids.rqvae_patience": _POSITIVE,
    "sids.rqvae_batch_size": _POSITIVE,
    "sids.rqvae_val_fraction": Range(gt=0, lt=1, why="held-out share of the items"),
    "model.dim": _POSITIVE,
    "model.num_blocks": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.dqk": _POSITIVE,
    "model.dv": _POSITIVE,
    "model.dropout": _UNIT,
    "model.attn_dropout": _UNIT,
    "model.num_time_buckets": _NON_NEGATIVE,  # 0: one bucket, i.e. no time bias signal
    "model.sid_table_size": Range(ge=2, also=(0,)),  # a 1-row table holds only the padding row
    "model.cobra_sid_layers": _NON_NEGATIVE,  # the upper bound (the SIDs' layers) is checked by the builder
    "model.cobra_sid_dropout": _UNIT_OPEN,
    "loss.num_negatives": _POSITIVE,
    "loss.temperature": _POSITIVE,
    "loss.vid_weight": _NON_NEGATIVE,  # 0 trains the SID loss alone
    "loss.queue_size": _POSITIVE,
    "loss.vid_num_negatives": _NON_NEGATIVE,
    "loss.vid_max_in_batch": _NON_NEGATIVE,
    "loss.negatives_block": _NON_NEGATIVE,
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.betas": _UNIT_OPEN,
    "train.weight_decay": _NON_NEGATIVE,
    "train.embedding_lr": _POSITIVE,
    "train.seed": _SEED,
    "train.patience": _POSITIVE,
    "train.eval_every": _POSITIVE,
    "train.max_steps": _NON_NEGATIVE,
    "train.checkpoint_every": _NON_NEGATIVE,
    "eval.ks": _POSITIVE,
    "eval.batch_size": _POSITIVE,
    "eval.soft_k": _POSITIVE,
    "eval.soft_tau": _POSITIVE,
    "eval.beam_size": _POSITIVE,
    "eval.beam_ann": _POSITIVE,
    "eval.sid_gen_beam": _NON_NEGATIVE,  # 0 = max(eval.ks)
    "eval.alpha": _UNIT,
    # A multiplier of the ANN logits (beam.fuse_scores): 0 drops them, as eval.alpha=0 drops the
    # SID part; a negative one would rank the least similar items first.
    "eval.beta": _NON_NEGATIVE,
    "retrieval.hnsw_m": Range(ge=2, why="links per HNSW node"),
    "retrieval.ef_search": _POSITIVE,
    "retrieval.ivf_nlist": _NON_NEGATIVE,  # 0 = 4 * sqrt(items)
    "retrieval.nprobe": _POSITIVE,
}
"""Accepted values of every numeric config field, checked once at load by :func:`_validate`."""

_ANY_VALUE: Dict[str, str] = {}
"""Numeric fields that accept every value of their type, each with the reason; none today. A new
numeric field needs an entry here or in ``_RANGES`` (tests/test_config_ranges.py asks for one)."""


def _check_range(name: str, value: Any, rule: Range) -> None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:  # Python ints are unbounded; torch, numpy and FAISS take at most 64 bits
        if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:
            raise ConfigError(f"{name} must fit a 64-bit integer, got {value}")
    if not all(rule.accepts(v) for v in values):
        subject = f"{name} values" if isinstance(value, (list, tuple)) else name
        is_float = any(isinstance(v, float) for v in values)
        raise ConfigError(f"{subject} must {rule.describe(is_float)}, got {value}")


def _validate(cfg: Config) -> None:
    """Checks every numeric field against ``_RANGES``, then the rules that span values."""
    for name, rule in _RANGES.items():
        section, key = name.split(".")
        _check_range(name, getattr(getattr(cfg, section), key), rule)
    if SELECT_K not in cfg.eval.ks:
        raise ConfigError(f"eval.ks must include {SELECT_K} (validation ndcg@{SELECT_K} selects checkpoints "
                          f"and drives early stopping), got {cfg.eval.ks}")
    last_seed = cfg.sids.seed + cfg.sids.layers - 1  # layer l's k-means is seeded with sids.seed + l
    if last_seed > SEED_MAX:
        raise ConfigError(f"sids.seed + sids.layers - 1 (the last layer's k-means seed) must be at most "
                          f"{SEED_MAX}, got {last_seed}")


def parse_override(text: str) -> Tuple[str, str, Any]:
    """Splits ``section.key=value``; the value is parsed as YAML (``3``, ``true``, ``[1, 5]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. train.epochs=3)")
    section, key = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def resolve_config_path(path: str) -> str:
    """Accepts a file path or a short name like ``ml-100k/hstu`` (looked up in ``./configs``)."""
    candidates = [path, f"configs/{path}", f"configs/{path}.yaml", f"{path}.yaml"]
    for candidate in candidates:
        if storage.exists(storage.expand(candidate)) and not storage.isdir(storage.expand(candidate)):
            return storage.expand(candidate)
    raise ConfigError(f"config file not found: {path}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Builds a :class:`Config` from defaults, an optional YAML file and overrides."""
    cfg = Config()
    if path:
        resolved = resolve_config_path(path)
        for section, values in _read_sections(resolved, ConfigError).items():
            for key, value in values.items():
                _apply(cfg, section, key, value, resolved)
    for text in overrides or []:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "override")
    _validate(cfg)
    return cfg


def narrow(section: Any, cls: Type[T]) -> T:
    """The ``cls`` part of a config section that inherits it (``narrow(cfg.eval, DecoderSettings)``),
    as a plain ``cls``: what a module takes instead of the whole section."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


def _read_sections(path: str, error: Type[Exception]) -> Dict[str, Dict[str, Any]]:
    """A YAML file of ``{section: {key: value}}``; anything else raises ``error`` in one line."""
    if storage.isdir(path):
        raise error(f"{path} is a directory, not a YAML config file")
    with storage.open_file(path, "rb") as f:
        data = f.read()
    try:
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise error(f"{path}: not a YAML text file (it is not UTF-8)")
    except (yaml.YAMLError, RecursionError) as e:
        raise error(f"{path}: not valid YAML ({(str(e).splitlines() or ['nested too deeply'])[0]})")
    _check_sections(raw, path, error)
    return raw


def _check_sections(raw: Any, where: str, error: Type[Exception]) -> None:
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise error(f"{where}: section {section!r} must be a mapping")


def config_from_dict(raw: Dict[str, Dict[str, Any]], where: str = "saved config") -> Config:
    """Rebuilds a :class:`Config` saved with :meth:`Config.to_dict` (e.g. a run's config.yaml)."""
    _check_sections(raw, where, ArtifactError)
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, where)
    _validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config (tuples written as lists)."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj
    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


LOCAL_PATH_FIELDS = (("data", "path"), ("data", "cache_dir"), ("sids", "embed_cache_dir"), ("sids", "dir"))
"""Fields naming local files or directories (``sids.encoder`` too, when it is a directory)."""


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every relative local path made absolute against the current directory.

    A run directory's ``config.yaml`` is read by later commands from anywhere (``evaluate``
    from another directory, a serving host), so training stores paths that mean the same
    there. Empty values (defaults), ``~`` paths and URLs (``s3://``, iopath backends) stay
    as typed; ``sids.encoder`` changes only when it names an existing directory.
    """
    raw = cfg.to_dict()
    for section, key in LOCAL_PATH_FIELDS:
        raw[section][key] = _absolute(raw[section][key])
    encoder = raw["sids"]["encoder"]
    if os.path.isdir(encoder):
        raw["sids"]["encoder"] = _absolute(encoder)
    return config_from_dict(raw)


def _absolute(path: str) -> str:
    if not path or "://" in path or path.startswith("~") or os.path.isabs(path):
        return path
    return os.path.abspath(path)


RUN_OVERRIDE_SECTIONS = ("eval", "retrieval")
"""What a command reading a trained run may change: nothing that shapes the model."""


def load_run_config(run_dir: str, overrides: Sequence[str] = (), command: str = "evaluate") -> Config:
    """The resolved config a run directory was trained with (its ``config.yaml``), with
    ``eval.*`` / ``retrieval.*`` ``overrides`` (``command`` names the caller in the error)."""
    path = os.path.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ArtifactError(f"{run_dir} is not a run directory (no config.yaml)")
    raw = config_from_dict(_read_sections(path, ArtifactError), path).to_dict()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in RUN_OVERRIDE_SECTIONS:
            raise ConfigError(f"{command} takes eval.* and retrieval.* overrides only, got {section}.{key}")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)
