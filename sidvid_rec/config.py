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
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from sidvid_rec import storage
from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.types import (AttentionScale, Balance, BeamFuse, DataFormat, DecoderKind, Device, EmbeddingOptimizer,
                              Fusion, IndexKind, ModelMode, Pooling, QueryTime, Sharding, SidSoftmax, SplitProtocol,
                              VidNegatives)

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
class SidsConfig(RqParams):
    """Text embedding and semantic-ID settings; the k-means ones are inherited from :class:`RqParams`."""

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
    """``id``: item-ID HSTU; ``sid``: prefixN SID only; ``sid_id``: fused; ``cobra``: SID/VID."""
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
    """Fused optimizer of the TorchRec tables; ``auto``: row-wise Adagrad on CPU, Adam on GPU."""
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


def _validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "data.max_len": cfg.data.max_len, "sids.layers": cfg.sids.layers,
        "sids.codebook_size": cfg.sids.codebook_size, "sids.text_batch_size": cfg.sids.text_batch_size,
        "model.dim": cfg.model.dim, "model.num_blocks": cfg.model.num_blocks,
        "model.num_heads": cfg.model.num_heads, "model.dqk": cfg.model.dqk, "model.dv": cfg.model.dv,
        "train.batch_size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
        "eval.batch_size": cfg.eval.batch_size, "loss.num_negatives": cfg.loss.num_negatives,
        "eval.soft_k": cfg.eval.soft_k, "eval.beam_size": cfg.eval.beam_size,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in {"model.dropout": cfg.model.dropout, "model.attn_dropout": cfg.model.attn_dropout,
                        "eval.alpha": cfg.eval.alpha}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    for name, value in {"sids.tol": cfg.sids.tol, "model.cobra_sid_dropout": cfg.model.cobra_sid_dropout}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must lie in [0, 1), got {value}")
    if cfg.data.min_len < 3:
        raise ConfigError(f"data.min_len must be at least 3 (train, valid and test items), got {cfg.data.min_len}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be positive, got {cfg.loss.temperature}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"eval.ks must be a non-empty list of positive integers, got {cfg.eval.ks}")


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
        with storage.open_file(resolved, "r") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{resolved}: not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(raw, dict):
            raise ConfigError(f"{resolved}: expected a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{resolved}: section {section!r} must be a mapping")
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


def config_from_dict(raw: Dict[str, Dict[str, Any]]) -> Config:
    """Rebuilds a :class:`Config` saved with :meth:`Config.to_dict` (e.g. a run's config.yaml)."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
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


RUN_OVERRIDE_SECTIONS = ("eval", "retrieval")
"""What a command reading a trained run may change: nothing that shapes the model."""


def load_run_config(run_dir: str, overrides: Sequence[str] = (), command: str = "evaluate") -> Config:
    """The resolved config a run directory was trained with (its ``config.yaml``), with
    ``eval.*`` / ``retrieval.*`` ``overrides`` (``command`` names the caller in the error)."""
    path = os.path.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ArtifactError(f"{run_dir} is not a run directory (no config.yaml)")
    with storage.open_file(path, "r") as f:
        raw = config_from_dict(yaml.safe_load(f)).to_dict()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in RUN_OVERRIDE_SECTIONS:
            raise ConfigError(f"{command} takes eval.* and retrieval.* overrides only, got {section}.{key}")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)
