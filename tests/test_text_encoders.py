"""Text encoders (minilm, any local HF dir, tfidf), the embedding cache and the embed artifact."""

import os

import numpy as np
import pytest
import torch

from sidvid_rec.errors import ArtifactError, UserError
from sidvid_rec.text import build_encoder, embed_items, embed_texts, load_embeddings, save_embeddings
from sidvid_rec.text.encoders import MINILM_SHA256, HFEncoder, TfidfEncoder, minilm_dir, pool, resolve_pooling

TITLES = [
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy",
    "Toy Story 2 (1999). Genres: Adventure, Animation, Children, Comedy",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "OPI Nail Lacquer, Red Shatter. Categories: Beauty > Makeup > Nails",
    "Sabrina (1995). Genres: Comedy, Romance",
]


class CountingEncoder:
    """Wraps an encoder and counts the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, 0

    def prepare(self, corpus):
        self.inner.prepare(corpus)

    def identity(self):
        return self.inner.identity()

    def encode(self, texts):
        self.encoded += len(texts)
        return self.inner.encode(texts)


# ----------------------------------------------------------------------------- tfidf


def test_tfidf_deterministic_and_order_free():
    a = TfidfEncoder(dim=3, seed=0)
    a.prepare(TITLES)
    b = TfidfEncoder(dim=3, seed=0)
    b.prepare(list(reversed(TITLES)))
    va, vb = a.encode(TITLES), b.encode(TITLES)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, rtol=1e-5)
    assert a.identity() == b.identity() and va.shape == (5, 3)


def test_tfidf_bad_corpus():
    enc = TfidfEncoder(dim=8)
    enc.prepare(["same"])
    with pytest.raises(UserError, match="at least 2 distinct"):
        enc.encode(["same"])


# ----------------------------------------------------------------------------- cache


def test_cache_hit_encodes_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    first = CountingEncoder(TfidfEncoder(dim=4))
    texts = TITLES + [TITLES[0]]  # a duplicate is encoded once
    v1, ident = embed_texts(texts, first, cache, batch_size=2, progress=False)
    assert first.encoded == 5 and v1.shape == (6, 4)
    np.testing.assert_array_equal(v1[0], v1[5])
    second = CountingEncoder(TfidfEncoder(dim=4))
    v2, _ = embed_texts(texts, second, cache, batch_size=2, progress=False)
    assert second.encoded == 0
    np.testing.assert_array_equal(v1, v2)
    other = CountingEncoder(TfidfEncoder(dim=3))  # another identity: its own cache entries
    embed_texts(texts, other, cache, progress=False)
    assert other.encoded == 5


def test_damaged_cache_shard_is_reencoded(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    embed_texts(TITLES, TfidfEncoder(dim=4), cache, progress=False)
    (shard_dir,) = [os.path.join(cache, d) for d in os.listdir(cache)]
    for name in os.listdir(shard_dir):
        if name.startswith("shard-"):
            with open(os.path.join(shard_dir, name), "wb") as f:
                f.write(b"garbage")
    again = CountingEncoder(TfidfEncoder(dim=4))
    embed_texts(TITLES, again, cache, progress=False)
    assert again.encoded == 5 and "damaged" in capsys.readouterr().err


def test_embed_items_padding_row():
    vectors, _ = embed_items([""] + TITLES, TfidfEncoder(dim=4), None, progress=False)
    assert vectors.shape == (6, 4) and not vectors[0].any()
    with pytest.raises(UserError, match="empty"):
        embed_items([""], TfidfEncoder(dim=4), None, progress=False)


# ----------------------------------------------------------------------------- artifact


@pytest.mark.parametrize("name", ["emb.safetensors", "emb.npz", "embdir"])
def test_embeddings_artifact_round_trip(tmp_path, name):
    vectors = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    vectors[0] = 0
    out = str(tmp_path / name)
    save_embeddings(out, vectors, {"encoder": {"encoder": "tfidf"}, "data_fingerprint": "fp"})
    loaded = load_embeddings(out)
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.manifest["data_fingerprint"] == "fp" and loaded.num_items == 6


def test_tampered_embeddings(tmp_path):
    out = str(tmp_path / "emb.safetensors")
    save_embeddings(out, np.ones((3, 2), np.float32), {})
    with open(out, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(ArtifactError, match="sha256"):
        load_embeddings(out)
    with pytest.raises(ArtifactError, match="not found"):
        load_embeddings(str(tmp_path / "missing.safetensors"))


# ----------------------------------------------------------------------------- HF encoders


def test_unknown_encoder_lists_the_available_ones():
    with pytest.raises(UserError) as info:
        build_encoder("no-such-model")
    message = str(info.value)
    assert "'minilm'" in message and "'tfidf'" in message and "Hugging Face" in message and "\n" not in message


def test_pool_mean_and_last_respect_the_mask():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [B=2, T=3, D=2]
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    np.testing.assert_allclose(pool(hidden, right, "mean")[0].numpy(), [1.0, 2.0])  # mean of t=0,1
    np.testing.assert_allclose(pool(hidden, right, "last")[0].numpy(), [2.0, 3.0])  # t=1
    np.testing.assert_allclose(pool(hidden, left, "last")[0].numpy(), [4.0, 5.0])  # t=2
    np.testing.assert_allclose(pool(hidden, right, "last")[1].numpy(), [10.0, 11.0])


def test_resolve_pooling():
    from transformers import BertConfig, LlamaConfig, Qwen2Config

    assert resolve_pooling(BertConfig(), "auto") == "mean"
    assert resolve_pooling(Qwen2Config(), "auto") == "last"
    assert resolve_pooling(LlamaConfig(architectures=["LlamaForCausalLM"]), "auto") == "last"
    assert resolve_pooling(BertConfig(), "last") == "last"


def test_minilm_offline_similarity():
    enc = build_encoder("minilm", max_tokens=32, device="cpu")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    ident = enc.identity()
    assert ident["weights_sha256"] == MINILM_SHA256 and ident["pooling"] == "mean" and ident["dim"] == 384
    v, _ = embed_texts(TITLES, enc, None, batch_size=2, progress=False)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] > sim[0, 3]  # Toy Story 2 > another 1995 film > nail polish
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    alone = enc.encode([TITLES[3]])  # padding in a batch does not change a text's vector
    np.testing.assert_allclose(alone[0], enc.encode(TITLES[2:4])[1], atol=1e-5)


def test_minilm_checksum_is_enforced():
    with pytest.raises(ArtifactError, match="sha256"):
        HFEncoder(minilm_dir(), "minilm", expected_sha256="0" * 64)


def test_local_decoder_dir_uses_last_token_pooling(tmp_path):
    """A tiny random decoder LM saved to disk: ``auto`` pools its last token, offline."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         architectures=["LlamaForCausalLM"])
    model_dir = str(tmp_path / "tiny-llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    enc = build_encoder(model_dir, device="cpu")
    assert enc.identity()["pooling"] == "last" and enc.identity()["dim"] == 32
    batch = enc.encode(TITLES[:3])
    alone = enc.encode([TITLES[2]])
    assert batch.shape == (3, 32)
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)  # causal + mask-aware last token
