"""COBRA: interleaved layout, cloned timestamps, supervision masks, the dual loss, and the CLI end to end."""

import json

import numpy as np
import pytest
import torch

from batches import make_batch
from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.semantic_ids.codebook import sid_catalog
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.interleave import (SID_TYPE, VID_TYPE, append_step, deinterleave, interleave,
                                           interleave_layout, supervision)
from sidvid_rec.ops import jagged

NUM_ITEMS, DIM = 30, 8


def _codes(num_items: int = NUM_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 3, size=(num_items + 1, 2))
    codes[0] = -1
    return codes


def tiny_model(negatives: str = "in_batch_global", seed: int = 0, text: bool = False) -> CobraRecommender:
    torch.manual_seed(seed)
    codes = _codes()
    emb = ItemEmbeddings.from_codes(NUM_ITEMS, DIM, "cobra", codes)
    enc = HSTUEncoder(max_len=2 * 6 + 1, dim=DIM, num_blocks=1, num_heads=1, dqk=DIM, dv=DIM, dropout=0.0,
                      attn_dropout=0.0)
    text_emb = torch.randn(NUM_ITEMS + 1, 5) if text else None
    return CobraRecommender(emb, enc, SampledSoftmaxLoss(NUM_ITEMS, 16, 0.1),
                            InfoNCELoss(NUM_ITEMS, negatives, 16, queue_size=32, dim=DIM, temperature=0.1),
                            codes, vid_weight=0.5, temperature=0.1, text_embeddings=text_emb)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("drop_last_vid", [True, False])
def test_interleave_round_trip(drop_last_vid):
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 5, 2])
    offsets = jagged.lengths_to_offsets(lengths)
    steps = int(lengths.sum())
    sid, vid = torch.randn(steps, 4), torch.randn(steps, 4)
    layout = interleave_layout(offsets, torch.arange(steps) * 10, drop_last_vid=drop_last_vid)
    tokens = interleave(sid, vid, layout)
    expected_lengths = 2 * lengths - (1 if drop_last_vid else 0)
    assert torch.equal(jagged.offsets_to_lengths(layout.offsets), expected_lengths)
    assert tokens.shape[0] == int(expected_lengths.sum())
    back = deinterleave(tokens, layout)
    assert torch.equal(back.sid, sid)
    assert torch.equal(back.vid, vid[back.vid_steps])
    kept = torch.ones(steps, dtype=torch.bool)
    if drop_last_vid:
        kept[offsets[1:] - 1] = False
    assert torch.equal(back.vid_steps, torch.nonzero(kept).flatten())
    # tokens alternate SID, VID inside each sequence and positions count tokens
    assert torch.equal(layout.positions, jagged.index_within_sequence(layout.offsets))
    assert torch.equal(layout.token_type, layout.positions % 2)


def test_cloned_timestamps_give_delta_zero_within_a_step():
    offsets = torch.tensor([0, 3, 5])
    ts = torch.tensor([100, 250, 900, 40, 70])
    for query_time in ("target", "own"):
        layout = interleave_layout(offsets, ts, query_time=query_time)
        sid_rows = torch.nonzero(layout.sid_mask).flatten()
        vid_rows = torch.nonzero(layout.vid_mask).flatten()
        # both tokens of a step carry the step's time (keys)
        assert torch.equal(layout.timestamps[sid_rows], ts)
        assert torch.equal(layout.timestamps[vid_rows], ts[layout.source[vid_rows]])
        # the query generating a VID (the SID token) sees its twin SID at delta 0 ...
        twin_dt = layout.query_timestamps[sid_rows] - layout.timestamps[sid_rows]
        assert torch.equal(twin_dt, torch.zeros(5, dtype=torch.long))
    own = interleave_layout(offsets, ts, query_time="own")
    vid_rows = torch.nonzero(own.vid_mask).flatten()
    # ... and with own-time queries the VID token also sees the SID of its step at delta 0
    own_dt = own.query_timestamps[vid_rows] - own.timestamps[vid_rows - 1]
    assert torch.equal(own_dt, torch.zeros(3, dtype=torch.long))
    target = interleave_layout(offsets, ts, query_time="target")
    # target-time: the VID of step t queries with the time of step t + 1 (the SID it generates)
    assert target.query_timestamps[torch.nonzero(target.vid_mask).flatten()].tolist() == [250, 900, 70]
    # the HSTU time bias buckets dt = query_ts[i] - ts[j]: bucket 0 between twins, > 0 across steps
    buckets = jagged.time_bucket(own.query_timestamps.unsqueeze(1) - own.timestamps.unsqueeze(0), 64)  # [T2, T2]
    assert int(buckets[1, 0]) == 0 and int(buckets[3, 2]) == 0  # VID_t -> SID_t (sequence 0)
    assert int(buckets[2, 1]) > 0 and int(buckets[4, 0]) > 0  # across steps


def test_masks_select_the_intended_positions():
    batch = make_batch([[10, 11], [20]], [12, 21], training=True)
    model = tiny_model()
    targets = batch.jagged("target_id")
    last = targets.offsets()[1:] - 1
    target_times = batch.jagged("target_timestamp").values()[last]
    items, times, offsets = model._steps(batch, targets.values()[last], target_times)
    assert items.tolist() == [10, 11, 12, 20, 21]
    layout = interleave_layout(offsets, times)
    # tokens: S10 V10 S11 V11 S12 | S20 V20 S21
    assert layout.token_type.tolist() == [SID_TYPE, VID_TYPE, SID_TYPE, VID_TYPE, SID_TYPE, SID_TYPE, VID_TYPE, SID_TYPE]
    assert layout.sid_mask.tolist() == [True, False, True, False, True, True, False, True]
    assert layout.vid_mask.tolist() == [not m for m in layout.sid_mask.tolist()]
    sup = supervision(layout, items)
    assert sup.sid_rows.tolist() == [1, 3, 6] and sup.sid_targets.tolist() == [11, 12, 21]
    assert sup.vid_rows.tolist() == [0, 2, 4, 5, 7] and sup.vid_targets.tolist() == [10, 11, 12, 20, 21]


def test_append_step():
    values, offsets = append_step(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3, 3, 4]), torch.tensor([7, 8, 9]))
    assert values.tolist() == [1, 2, 3, 7, 8, 4, 9] and offsets.tolist() == [0, 4, 5, 7]


def test_sid_catalog():
    codes = np.array([[-1, -1], [1, 2], [0, 1], [1, 2], [0, 0]])
    cat = sid_catalog(codes)
    assert cat.sid_of_item.tolist() == [-1, 2, 1, 2, 0]
    assert codes[cat.sid_items.numpy()].tolist() == [[0, 0], [0, 1], [1, 2]]


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("negatives", ["in_batch", "in_batch_global", "queue", "all"])
def test_dual_loss_one_backward(negatives):
    model = tiny_model(negatives, text=negatives == "queue")
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [5, 7, 1], training=True)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.num_positions == 4 + 2 + 3
    assert torch.allclose(out.loss.detach(), out.sid_loss + 0.5 * out.vid_loss)
    out.loss.backward()
    grads = [p.grad for p in model.encoder.parameters()] + [model.type_emb.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if negatives == "queue":
        assert len(model.vid_loss.queue) == 9 + 3  # every step's VID entry entered the queue
        assert model.text_proj.weight.grad is not None


def test_sid_dropout_zeroes_a_share_of_sid_tokens_in_training_only():
    model = tiny_model()
    model.sid_dropout = 0.5
    seen = []
    encode = model._encode
    model._encode = lambda layout, sid, vid: (seen.append(sid), encode(layout, sid, vid))[1]
    histories = [[1 + (i + j) % NUM_ITEMS for j in range(5)] for i in range(20)]
    batch = make_batch(histories, [h[0] for h in histories], training=True)
    full = model.embeddings.vectors(torch.tensor([i for h in histories for i in h + [h[0]]])).sid_vec
    model.train()
    model(batch, generator=torch.Generator().manual_seed(0))
    dropped = seen[-1].abs().sum(1) == 0  # [S] (history steps + the appended target step)
    assert seen[-1].shape == full.shape and 0.3 < dropped.float().mean() < 0.7
    assert torch.equal(seen[-1][~dropped], full[~dropped])  # kept tokens are untouched
    model.eval()
    model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1], full)


def _sid_loss_parts(model, sid_full_softmax: bool, sid_logq: bool):
    """The SID loss of ``model`` on a fixed query, and what it should be, by hand."""
    model.sid_full_softmax, model.sid_logq = sid_full_softmax, sid_logq
    torch.manual_seed(3)
    query, targets = torch.randn(4, DIM), torch.tensor([1, 5, 9, 13])
    table = torch.nn.functional.normalize(model.sid_vectors_of(torch.arange(model.num_sids)), dim=-1).detach()
    q = torch.nn.functional.normalize(query, dim=-1)
    target_sids = model.sid_of_item[targets]
    out = model._sid_loss(query, targets, torch.Generator().manual_seed(0))
    return out, q, table, target_sids


def test_sid_loss_full_softmax_scores_every_valid_sid():
    model = tiny_model()
    out, q, table, target_sids = _sid_loss_parts(model, sid_full_softmax=True, sid_logq=False)
    expected = torch.nn.functional.cross_entropy(q @ table.T / 0.1, target_sids)
    assert out.num_positions == 4 and out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sid_loss_logq_uses_sid_sizes():
    """Sampled SID negatives come from uniform items: a SID with twice the items is drawn twice as
    often, so its logit loses log(size / mean size)."""
    model = tiny_model()
    sizes = np.bincount(model.sid_of_item[1:].numpy(), minlength=model.num_sids)
    assert torch.allclose(model.sid_log_share.exp(), torch.tensor(sizes / sizes.sum(), dtype=torch.float32))
    out, q, table, target_sids = _sid_loss_parts(model, sid_full_softmax=False, sid_logq=True)
    negatives = model.sid_of_item[model.sid_loss.sample_negatives(4, torch.Generator().manual_seed(0), q.device)]
    expected = 0.0
    for t in range(4):
        logits = [float(q[t] @ table[target_sids[t]]) / 0.1]
        logits += [float(q[t] @ table[s]) / 0.1 - float(np.log(sizes[s] / sizes.mean()))
                   for s in negatives[t].tolist() if s != int(target_sids[t])]
        expected += float(-logits[0] + torch.tensor(logits).logsumexp(0))
    assert out.loss.item() == pytest.approx(expected / 4, rel=1e-4)


def test_vid_query_depends_on_appended_sid_and_state_does_not():
    model = tiny_model().eval()
    batch = make_batch([[1, 2, 3], [4, 5]], [6, 7], training=False)
    inputs = model.prepare(batch)
    a, b = torch.randn(2, DIM), torch.randn(2, DIM)
    assert not torch.allclose(model.vid_queries(inputs, a), model.vid_queries(inputs, b))
    state = model.next_sid_states(inputs)
    sid_tokens = inputs.sid_tokens.index_copy(0, inputs.placeholder_steps, a)
    h = model._encode(inputs.layout, sid_tokens, inputs.vid_tokens)
    assert torch.allclose(h[inputs.layout.last_rows() - 1], state, atol=1e-6)  # causal


# ----------------------------------------------------------------------------- CLI


def test_cli_train_and_evaluate(tmp_path, cache_dir):
    from sidvid_rec.cli import main

    sids = str(tmp_path / "sids")
    common = ["train.device=cpu", f"data.cache_dir={cache_dir}", "sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8",
              "sids.layers=2", "sids.kmeans_iters=3", "sids.balance_iters=3"]
    assert main(["sids", "build", "--out", sids, "--no-progress"] + common) == 0
    run = str(tmp_path / "run")
    rc = main(["train", "--run-dir", run, "model.mode=cobra", f"sids.dir={sids}", "train.epochs=1", "train.max_steps=2",
               "data.max_len=10", "train.batch_size=64", "model.dim=16", "model.dqk=16", "model.dv=16",
               "model.num_blocks=1", "eval.ks=[1,10]", "eval.batch_size=512"] + common)
    assert rc == 0
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert set(metrics["test"]) == {"hr@1", "hr@10", "ndcg@10", "mrr", "count"} and metrics["test"]["count"] == 610
    recorded = (tmp_path / "run" / "metrics.json").read_bytes()
    assert main(["evaluate", run, "--decoder", "beam", "eval.beam_size=2", "eval.beam_ann=10"]) == 0
    # The training-time record stays; each decoder's result is kept beside it, by settings.
    assert (tmp_path / "run" / "metrics.json").read_bytes() == recorded
    evaluations = json.load(open(tmp_path / "run" / "evaluations.json"))
    beam_keys = [k for k in evaluations if k.startswith("beam-")]
    assert len(beam_keys) == 1 and evaluations[beam_keys[0]]["settings"]["eval"]["beam_size"] == 2
    beam = evaluations[beam_keys[0]]["test"]
    assert 0.0 <= beam["hr@1"] <= beam["hr@10"] <= 1.0 and beam["count"] == 610
    direct = [v for k, v in evaluations.items() if k.startswith("direct-")]
    assert len(direct) == 1 and direct[0]["test"] == metrics["test"]


def test_sid_dedup_appends_the_disambiguation_code(tmp_path, cache_dir):
    """``model.sid_dedup``: the TIGER code becomes one more SID layer, so COBRA's valid SIDs are
    the items themselves; without it, items sharing a code tuple share a SID."""
    from sidvid_rec.cli import main
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.models.build import load_sid_codes
    from sidvid_rec.models.build import build_model

    sids = str(tmp_path / "sids")
    common = ["train.device=cpu", f"data.cache_dir={cache_dir}", "sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=4",
              "sids.layers=2", "sids.kmeans_iters=3", "sids.balance_iters=3"]
    assert main(["sids", "build", "--out", sids, "--no-progress"] + common) == 0
    small = ["model.mode=cobra", f"sids.dir={sids}", "model.dim=8", "model.dqk=8", "model.dv=8", "data.max_len=10"]
    plain_cfg = load_config(None, common + small)
    dedup_cfg = load_config(None, common + small + ["model.sid_dedup=true"])
    data = load_sequences(plain_cfg.data)
    plain, dedup = load_sid_codes(plain_cfg, data), load_sid_codes(dedup_cfg, data)
    n = data.num_items
    assert plain.shape == (n + 1, 2) and dedup.shape == (n + 1, 3)
    np.testing.assert_array_equal(dedup[:, :2], plain)
    assert len(np.unique(plain[1:], axis=0)) <= 16 < n  # 4 x 4 tuples for 9,724 items
    assert len(np.unique(dedup[1:], axis=0)) == n and dedup[0, 2] < 0  # unique; padding row stays padding
    model = build_model(dedup_cfg, data, table_device="cpu")
    assert model.num_sids == n
    assert torch.equal(torch.sort(model.sid_of_item[1:]).values, torch.arange(n))


@pytest.mark.parametrize("sid_logq", [False, True])
def test_fused_losses_give_the_unfused_loss_and_gradients(sid_logq):
    """COBRA's SID sampled softmax and VID InfoNCE through the fused kernel (the default) equal
    the plain autograd path (``loss.fused=false``): values and every parameter's gradient."""
    results = []
    for fused in (False, True):
        model = tiny_model("in_batch_global")
        model.sid_loss._fused = fused
        model.vid_loss._fused = fused
        model.sid_logq = sid_logq
        batch = make_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [5, 7, 1], training=True)
        out = model(batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (a, ga), (b, gb) = results
    assert b.item() == pytest.approx(a.item(), abs=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4)
