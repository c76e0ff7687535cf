"""The config sections: one small dataclass per section, each field documented where it is
declared (:mod:`sidvid_rec.config` loads and validates them)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from sidvid_rec.types import (ATTENTION_BLOCK, AttentionScale, Balance, BeamFuse, CobraSidHead, DataFormat,
                              DecoderKind, Device, EmbeddingOptimizer, Fusion, IndexKind, ItemNegatives, LrSchedule,
                              ModelMode, Pooling, Precision, QueryTime, Sharding, SidMethod, SidSoftmax, SplitProtocol, TrainPipelineKind,
                              VidNegatives)


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
    cobra_sid_head: CobraSidHead = "whole"
    """COBRA next-SID head: ``whole`` (one softmax over the valid SIDs) or ``codes`` (``L``
    next-code softmaxes, each level conditioned on the codes before it; decoders ``direct``,
    ``neighbor`` and ``beam`` take their SIDs from a trie-constrained beam over codes)."""
    sid_gen_prefix_inputs: bool = False
    """``sid_gen``: a code token's input is the sum of its item's code rows up to its level (the
    SID prefix so far), not its own row alone. HSTU's attention is pointwise and divided by the
    length, so an item's earlier codes reach a later token only diluted by the whole history;
    with prefix inputs they ride on the residual path."""
    sid_gen_item_output: bool = False
    """``sid_gen`` (with ``sid_gen_item_ids``): the last level scores each child of the prefix with
    its code's output vector plus the item-ID row of the item it completes, so the final choice
    between the items under one prefix has per-item capacity (the code rows are shared by every
    item with that code, and the disambiguation code means nothing)."""
    sid_gen_node_output: bool = False
    """``sid_gen`` (with ``sid_gen_item_output``): every level, not only the last, scores each child
    of the prefix by its trie node: its code's output vector plus the mean item-ID row of the items
    under that node, over the prefix's existing children only (training and decoding alike). Every
    prefix gets its own output vector, tied to its items (no new parameters); each step reads the
    whole item table (``O(N D)``), so the code heads stay the default for huge catalogues."""
    sid_gen_item_ids: bool = False
    """``sid_gen``: add each history item's ID row to its last code token's input (the code table
    gains ``N + 1`` item rows). Only complete items carry it: a token fed to predict a later code
    of its own item never does, so training never sees the item it predicts, and decoding feeds
    the generated codes alone. The output stays ``L x K`` codes."""


@dataclass
class LossConfig:
    num_negatives: int = 128
    """R uniform negatives from the whole item set (sampled softmax; unused with ``negatives=all``)."""
    temperature: float = 0.05
    """Softmax temperature on cosine similarities."""
    vid_weight: float = 1.0
    """COBRA: lambda in L = L_sid + lambda * L_vid."""
    vid_negatives: VidNegatives = "in_batch_global"
    """COBRA VID negative pool: in-batch only, plus R global negatives, a memory queue, or ``all``
    (every item: the exact softmax over the catalogue, no sampling and no logQ correction)."""
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
    that makes the sampled losses estimate full softmaxes, so decoders get calibrated scores.
    HSTU modes: used by ``negatives=mixed`` (``uniform`` stays the reference's uncorrected loss)."""
    negatives: ItemNegatives = "uniform"
    """HSTU modes (``id``/``sid``/``sid_id``): ``uniform``: R = ``num_negatives`` uniform items
    (reference); ``all``: exact softmax over every item (``num_negatives`` unused); ``mixed``: the
    batch's targets as in-batch negatives plus R shared uniform items, logQ-corrected when
    ``logq_correction``. COBRA accepts ``uniform`` only."""
    label_smoothing: float = 0.0
    """HSTU modes: label smoothing eps of the item cross-entropy (over every item with ``all``,
    over the unmasked candidates when sampled); 0 = none."""
    max_in_batch: int = 0
    """HSTU ``negatives=mixed``: cap on in-batch negatives (a uniform subset of the batch's
    positions); 0 = every position."""


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
    attention_block: int = ATTENTION_BLOCK
    """Query rows per block of the block-causal HSTU attention kernel: block ``[r0, r1)`` attends
    to keys ``[0, r1)`` only, so the masked blocks above the diagonal are never computed. The
    same maths at any value (float order aside); ``0`` = each length chunk's whole ``[b, n, n]``
    square, the kernel before block-causal attention."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit); for smoke tests."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps inside an epoch (0 = at epoch ends only)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps (step s uses (s+1)/warmup of
    the lr); 0 = none. Applies to ``lr`` and ``embedding_lr`` alike."""
    lr_schedule: LrSchedule = "constant"
    """After the warm-up: ``constant`` or ``cosine`` decay to ``min_lr_ratio`` times the lr at the
    run's planned last step (``schedule_epochs`` x batches per epoch, capped by ``max_steps``)."""
    min_lr_ratio: float = 0.0
    """``cosine``: the final lr as a share of the initial one."""
    schedule_epochs: int = 0
    """Epochs the schedule is planned over; 0 = ``epochs``. The plan is fixed when a run starts
    and saved in its checkpoints (a resume keeps it, whatever ``epochs`` says then)."""
    pipeline: TrainPipelineKind = "plain"
    """``plain``: the training loop (reference); ``sparse_dist``: torchrec's ``TrainPipelineSparseDist``
    (implies ``batch_lookups``; modes ``id``/``sid``/``sid_id`` with ``loss.negatives=uniform``)."""
    batch_lookups: bool = False
    """Build the training lookups' KJT in the data loader (negatives drawn there, seeded per batch)
    instead of in the model's forward; implied by ``pipeline=sparse_dist``. Draws other negatives
    than the default path (see ``data.batches.LookupBuilder``)."""


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
