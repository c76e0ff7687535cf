"""Accepted values of every numeric config field, checked once when a config is loaded."""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from sidvid_rec.config.sections import Config
from sidvid_rec.errors import ConfigError

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
    "loss.label_smoothing": _UNIT_OPEN,
    "loss.max_in_batch": _NON_NEGATIVE,  # 0 = every position of the batch
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
    "train.attention_block": _NON_NEGATIVE,  # 0 = whole chunks
    "train.checkpoint_every": _NON_NEGATIVE,
    "train.warmup_steps": _NON_NEGATIVE,  # 0 = no warm-up
    "train.min_lr_ratio": _UNIT,
    "train.schedule_epochs": _NON_NEGATIVE,  # 0 = train.epochs
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
    if cfg.model.mode == "cobra" and cfg.model.cobra_sid_head == "codes" and cfg.eval.decoder == "soft":
        raise ConfigError("eval.decoder=soft needs model.cobra_sid_head=whole; with model.cobra_sid_head=codes "
                          "use direct, neighbor or beam")
    for key in ("sid_gen_item_ids", "sid_gen_prefix_inputs", "sid_gen_item_output", "sid_gen_node_output"):
        if getattr(cfg.model, key) and cfg.model.mode != "sid_gen":
            raise ConfigError(f"model.{key}=true applies to model.mode=sid_gen, got {cfg.model.mode}")
    if cfg.model.sid_gen_item_output and not cfg.model.sid_gen_item_ids:
        raise ConfigError("model.sid_gen_item_output=true scores the last level with the item-ID rows: "
                          "set model.sid_gen_item_ids=true as well")
    if cfg.model.sid_gen_node_output and not cfg.model.sid_gen_item_output:
        raise ConfigError("model.sid_gen_node_output=true extends the item-scored last level to every level: "
                          "set model.sid_gen_item_output=true as well")
    loss, train = cfg.loss, cfg.train
    if loss.negatives_block and (loss.negatives != "uniform" or loss.label_smoothing):
        raise ConfigError(f"loss.negatives_block={loss.negatives_block} applies to loss.negatives=uniform without "
                          f"label smoothing, got loss.negatives={loss.negatives}, "
                          f"loss.label_smoothing={loss.label_smoothing}")
    if loss.negatives_block and (train.batch_lookups or train.pipeline != "plain"):
        raise ConfigError("loss.negatives_block draws negatives inside the loss; train.batch_lookups / "
                          "train.pipeline=sparse_dist draw them in the data loader per position: use one or the other")
    if SELECT_K not in cfg.eval.ks:
        raise ConfigError(f"eval.ks must include {SELECT_K} (validation ndcg@{SELECT_K} selects checkpoints "
                          f"and drives early stopping), got {cfg.eval.ks}")
    last_seed = cfg.sids.seed + cfg.sids.layers - 1  # layer l's k-means is seeded with sids.seed + l
    if last_seed > SEED_MAX:
        raise ConfigError(f"sids.seed + sids.layers - 1 (the last layer's k-means seed) must be at most "
                          f"{SEED_MAX}, got {last_seed}")
