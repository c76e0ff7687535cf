"""sid_gen: the valid-SID trie, the code-token layout and loss, and the constrained beam search
(valid distinct items, normalised sequence probabilities, KV-cached = re-encoding)."""

import math

import numpy as np
import pytest
import torch

from batches import make_batch as _make_batch
from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.decode.sid_beam import sid_beam_search
from sidvid_rec.errors import DataError
from sidvid_rec.eval.evaluate import list_ranks
from sidvid_rec.models.sid_gen import SidGenRecommender, sid_gen_max_tokens
from sidvid_rec.modules.code_embeddings import CodeTokenEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.sid_tokens import append_rows, code_tokens
from sidvid_rec.semantic_ids.trie import SidTrie
from sidvid_rec.types import MISSING_ID

NUM_ITEMS, DIM, MAX_LEN = 40, 8, 8


def _codes(seed: int = 0) -> np.ndarray:
    """Unique 3-level SIDs: 2 coarse levels (3 x 4 codes, not all used) + a disambiguation code."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, [3, 4], size=(NUM_ITEMS, 2))
    dedup = np.zeros(NUM_ITEMS, dtype=np.int64)
    seen = {}
    for i, row in enumerate(map(tuple, coarse)):
        dedup[i] = seen.get(row, 0)
        seen[row] = dedup[i] + 1
    codes = np.concatenate([coarse, dedup[:, None]], axis=1)
    return np.concatenate([np.full((1, 3), -1), codes])


def quadratic_times(position: int, sequence: int) -> int:
    """Timestamps that grow quadratically, so every time-bias bucket differs: 1000 * (p + 1)^2 + 7 * s."""
    return 1000 * (position + 1) ** 2 + 7 * sequence


def make_batch(histories, targets, training: bool) -> SequenceBatch:
    return _make_batch(histories, targets, training, time_of=quadratic_times)


def tiny_model(scale: str = "length", seed: int = 0, item_ids: bool = False,
               prefix_inputs: bool = False, item_output: bool = False, node_output: bool = False) -> SidGenRecommender:
    torch.manual_seed(seed)
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    rows = sum(trie.level_sizes) + (NUM_ITEMS + 1 if item_ids else 0)
    enc = HSTUEncoder(max_len=sid_gen_max_tokens(MAX_LEN, 3), dim=DIM, num_blocks=2, num_heads=2, dqk=4, dv=4,
                      dropout=0.0, attn_dropout=0.0, attention_scale=scale)
    for layer in enc.layers:
        layer.rel_bias.ts_w.data.normal_(std=0.3)
        layer.rel_bias.pos_w.data.normal_(std=0.3)
    return SidGenRecommender(CodeTokenEmbeddings(rows, DIM), enc, codes, temperature=0.2, item_ids=item_ids,
                             prefix_inputs=prefix_inputs, item_output=item_output, node_output=node_output).eval()


HISTORIES = [[3, 9, 27, 1, 14, 30, 2, 8], [5, 6], [11, 12, 40, 7]]
TARGETS = [4, 19, 33]


# ----------------------------------------------------------------------------- trie and layout


def test_trie_children_and_leaves():
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    assert trie.num_levels == 3 and trie.level_sizes[:2] == [3, 4]
    for item in range(1, NUM_ITEMS + 1):
        node = 0
        for level in range(3):
            node = int(trie.children[level][node, codes[item, level]])
            assert node == int(trie.node_of_item[level][item]) >= 0
        assert int(trie.item_of_leaf[node]) == item
    prefixes = {tuple(r) for r in codes[1:, :2]}
    for a in range(3):
        for b in range(4):
            child = int(trie.children[1][int(trie.children[0][0, a]), b]) if int(trie.children[0][0, a]) >= 0 else -1
            assert (child >= 0) == ((a, b) in prefixes)
    with pytest.raises(DataError, match="disambiguation"):
        SidTrie.from_codes(codes[:, :2])  # coarse codes are shared


def test_trie_available_drops_prefixes_whose_items_are_all_seen():
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    group = [i for i in range(1, NUM_ITEMS + 1) if tuple(codes[i, :2]) == tuple(codes[1, :2])]
    history = torch.tensor(group + group[:1])  # a repeat counts once
    avail = trie.available(1, history, torch.tensor([0, history.numel()]))
    node = int(trie.node_of_item[1][1])
    assert not bool(avail[0, node]) and int(avail[0].sum()) == trie.num_nodes(1) - 1


def test_trie_available_children_equals_the_dense_table():
    """The sparse look-up the beam uses gives :meth:`SidTrie.available` at the beams' children
    (True where no child exists), at every level, with a coarse prefix wholly in one history."""
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    gen = torch.Generator().manual_seed(3)
    group = [i for i in range(1, NUM_ITEMS + 1) if tuple(codes[i, :2]) == tuple(codes[1, :2])]
    history = torch.cat([torch.tensor(group), torch.randint(1, NUM_ITEMS + 1, (40,), generator=gen)])
    offsets = torch.tensor([0, 15 + len(group), 15 + len(group), history.numel()])  # an empty history in the middle
    exhausted = 0
    for level in range(trie.num_levels):
        dense = trie.available(level, history, offsets)
        parents = (torch.zeros(3, 1, dtype=torch.long) if level == 0
                   else torch.randint(0, trie.num_nodes(level - 1), (3, 4), generator=gen))
        if level == 1:
            parents[0, 2] = int(trie.node_of_item[0][group[0]])  # the parent of the exhausted prefix
        children = trie.children[level][parents]  # [3, w, K]
        expected = torch.stack([torch.where(children[b] >= 0, dense[b][children[b].clamp(min=0)], True)
                                for b in range(3)])
        got = trie.available_children(level, parents, history, offsets)
        assert got.shape == children.shape and torch.equal(got, expected)
        exhausted += int((~got).sum())
    assert exhausted > 0  # the test reaches the masking branch


def test_code_tokens_and_append_rows():
    token_of_item = torch.arange(3 * 5).view(5, 3)
    tokens = code_tokens(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3, 4]), token_of_item)
    assert tokens.ids.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 12, 13]  # each sequence's last token dropped
    assert tokens.offsets.tolist() == [0, 8, 10]
    out = append_rows(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]), torch.tensor([[7, 8], [9, 10]]))
    assert out.tolist() == [1, 2, 7, 8, 3, 9, 10]


def test_training_loss_is_finite_and_trains():
    model = tiny_model().train()
    batch = make_batch(HISTORIES, TARGETS, training=True)
    out = model(batch)
    # every item after the first predicts 3 codes: (8 + 2 + 4 inputs + 3 targets - 3 first items) * 3
    assert out.num_positions == (14 + 3 - 3) * 3
    assert math.isfinite(float(out.loss)) and float(out.loss) > 0
    out.loss.backward()
    assert model.heads.grad is not None and float(model.heads.grad.abs().sum()) > 0


def _table(model: SidGenRecommender) -> torch.Tensor:
    return model.embeddings.ebc.embedding_bags["sid_code"].weight


def test_item_id_rows_never_show_an_item_to_its_own_codes():
    """``item_ids``: a history item's ID row moves the loss (it is an input), the final target's
    does not (its codes are predicted from its earlier code tokens, which never carry it), and
    the loss differs from the codes-only model's."""
    model = tiny_model(item_ids=True)
    batch = make_batch(HISTORIES, TARGETS, training=True)
    base = float(model(batch).loss)
    first_item_row = int(model.level_offsets[-1]) + HISTORIES[0][0]
    target_row = int(model.level_offsets[-1]) + TARGETS[0]
    with torch.no_grad():
        _table(model)[target_row] += 5.0
    assert float(model(batch).loss) == base
    with torch.no_grad():
        _table(model)[first_item_row] += 5.0
    assert float(model(batch).loss) != base
    assert float(tiny_model(item_ids=False)(batch).loss) != base


def test_prefix_inputs_sum_each_items_code_rows_up_to_the_token():
    """``prefix_inputs``: level l's input is rows 0..l of its item; the loss differs from the
    plain model's with the same weights."""
    from sidvid_rec.modules.sid_tokens import item_token_inputs

    rows = torch.arange(2 * 3 * 2, dtype=torch.float32).view(6, 2)  # 2 steps x 3 levels, D = 2
    out = item_token_inputs(rows, 3, prefix_inputs=True)
    assert torch.equal(out[:3], rows[:3].cumsum(0)) and torch.equal(out[3:], rows[3:].cumsum(0))
    assert torch.equal(item_token_inputs(rows, 3, prefix_inputs=False), rows)
    batch = make_batch(HISTORIES, TARGETS, training=True)
    assert float(tiny_model(prefix_inputs=True)(batch).loss) != float(tiny_model()(batch).loss)


@pytest.mark.parametrize("item_ids,prefix_inputs,item_output,node_output",
                         [(False, False, False, False), (True, False, False, False), (False, True, False, False),
                          (True, True, False, False), (True, False, True, False), (True, False, True, True),
                          (True, True, True, True)])
def test_decoding_states_give_the_teacher_forced_loss(item_ids, prefix_inputs, item_output, node_output):
    """Training and decoding lay the tokens out alike: from a one-item history, the decoder's
    per-level logits along the target's code path (cached states, no trie mask; with
    ``item_output`` the last level over the items of the target's prefix; with ``node_output``
    every level over the children of the target's prefix, as the beam scores them) give exactly
    the training loss of the two-item sequence (mean next-code cross-entropy of the target's codes)."""
    from sidvid_rec.decode.sid_beam import _CachedStates
    from sidvid_rec.modules.sid_tokens import NodeScorer

    model = tiny_model(item_ids=item_ids, prefix_inputs=prefix_inputs, item_output=item_output,
                       node_output=node_output)
    histories, targets = [[3], [5], [11]], [4, 19, 33]
    train_loss = float(model(make_batch(histories, targets, training=True)).loss)
    batch = make_batch(histories, targets, training=False)
    tables = model.generation_tables()
    states_of = _CachedStates(model.encoder, tables, model.prepare(batch, tables), model.num_levels)
    codes = model.codes[torch.tensor(targets)]  # [B, L]
    states, losses = states_of.first, []
    for level in range(model.num_levels):
        if level > 0:
            token = (codes[:, level - 1] + tables.level_offsets[level - 1]).unsqueeze(1)  # [B, 1]
            states = states_of.next(level, token, torch.arange(len(targets)) if level > 1 else None)
        completes = None
        if item_output and level == model.num_levels - 1:
            completes = model.trie.child_items(model.trie.node_of_item[level - 1][torch.tensor(targets)])
        logits = tables.level_logits(states, level, completes)
        if node_output:
            parents = model.trie.node_of_item[level - 1][torch.tensor(targets)] if level else torch.zeros(3).long()
            logits = NodeScorer.of(tables, model.trie).logits(states, level, parents)
        losses.append(torch.nn.functional.cross_entropy(logits, codes[:, level], reduction="none"))
    assert float(torch.stack(losses).mean()) == pytest.approx(train_loss, rel=1e-5)


@pytest.mark.parametrize("prefix_inputs,item_output,node_output",
                         [(False, False, False), (True, False, False), (False, True, False), (False, True, True)])
def test_item_id_rows_reach_decoding_and_the_cache_equals_re_encoding(prefix_inputs, item_output, node_output):
    """The beam reads the item rows (the top-K moves with them); cached = re-encoding with the
    item rows and / or prefix inputs and / or item-scored last level / node-scored levels."""
    model = tiny_model(item_ids=True, prefix_inputs=prefix_inputs, item_output=item_output, node_output=node_output)
    batch = make_batch(HISTORIES, TARGETS, training=False)
    tables = model.generation_tables()
    assert tables.item_table is not None and tables.item_table.shape == (NUM_ITEMS + 1, DIM)
    cached = sid_beam_search(model.encoder, tables, model.trie, model.prepare(batch, tables), 10, kv_cache=True)
    again = sid_beam_search(model.encoder, tables, model.trie, model.prepare(batch, tables), 10, kv_cache=False)
    assert torch.equal(cached.items, again.items) and torch.allclose(cached.scores, again.scores, atol=1e-5)
    without = tables._replace(item_table=torch.zeros_like(tables.item_table))
    moved = sid_beam_search(model.encoder, without, model.trie, model.prepare(batch, without), 10)
    assert not torch.allclose(moved.scores, cached.scores)


def test_item_output_scores_the_last_level_by_the_completed_items():
    """``item_output``: the last level's logits move with the ID row of the item a code completes
    (training loss and beam), children no item has are never returned, and the returned items
    are valid, distinct and unseen."""
    model = tiny_model(item_ids=True, item_output=True)
    batch = make_batch(HISTORIES, TARGETS, training=True)
    base = float(model(batch).loss)
    item_rows = int(model.level_offsets[-1])
    with torch.no_grad():  # the final target's ID row: an input nowhere, but the scored item's row
        model.embeddings.ebc.embedding_bags["sid_code"].weight[item_rows + TARGETS[0]] += 1.0
    assert float(model(batch).loss) != base
    top = _search(model, k=10)
    valid = set(range(1, NUM_ITEMS + 1))
    for row, history in zip(top.items.tolist(), HISTORIES):
        assert set(row) <= valid and len(set(row)) == len(row) and not set(row) & set(history)
    completes = model.trie.child_items(torch.arange(model.trie.num_nodes(model.num_levels - 2)))
    assert ((completes >= 0) == (model.trie.children[model.num_levels - 1] >= 0)).all()
    with pytest.raises(ValueError, match="item_ids"):
        tiny_model(item_ids=False, item_output=True)


def test_node_output_scores_each_child_by_the_mean_item_row_under_it():
    """``node_output``: each level's logits are ``cos(state, heads[c] + mean ID row of the items
    under (prefix, c))`` over the prefix's children (checked by hand at every level), ``-inf`` at
    codes the prefix lacks; a first-level node's items' rows move the loss; the last level equals
    ``item_output``'s; the returned items are valid, distinct, unseen, and their sequence
    probabilities over the whole catalogue sum to 1."""
    from sidvid_rec.modules.sid_tokens import NodeScorer

    model = tiny_model(item_ids=True, item_output=True, node_output=True)
    tables = model.generation_tables()
    trie, codes = model.trie, model.codes
    scorer = NodeScorer.of(tables, trie)
    gen = torch.Generator().manual_seed(1)
    for level in range(model.num_levels):
        parents = (torch.zeros(5, dtype=torch.long) if level == 0
                   else torch.randint(0, trie.num_nodes(level - 1), (5,), generator=gen))
        states = torch.randn(5, DIM, generator=gen)
        got = scorer.logits(states, level, parents)
        for r in range(5):
            for c in range(trie.level_sizes[level]):
                node = int(trie.children[level][parents[r], c])
                if node < 0:
                    assert got[r, c] == float("-inf")
                    continue
                items = [i for i in range(1, NUM_ITEMS + 1) if int(trie.node_of_item[level][i]) == node]
                key = tables.heads[int(tables.level_offsets[level]) + c] + tables.item_table[items].mean(0)
                want = torch.nn.functional.cosine_similarity(states[r], key, dim=0) / tables.temperature
                assert float(got[r, c]) == pytest.approx(float(want), rel=1e-5, abs=1e-5)
        if level == model.num_levels - 1:  # one item per leaf: item_output's logits
            completes = trie.child_items(parents)
            torch.testing.assert_close(got, tables.level_logits(states, level, completes))
    batch = make_batch(HISTORIES, TARGETS, training=True)
    base = float(model(batch).loss)
    first = [i for i in range(1, NUM_ITEMS + 1) if codes[i, 0] == codes[TARGETS[0], 0] and i != TARGETS[0]]
    with torch.no_grad():  # an item that shares only the target's first code: an input nowhere in the batch
        _table(model)[int(model.level_offsets[-1]) + next(i for i in first if i not in sum(HISTORIES, []))] += 1.0
    assert float(model(batch).loss) != base
    top = _search(model, k=NUM_ITEMS, beam=NUM_ITEMS)
    for row, scores, history in zip(top.items.tolist(), top.scores, HISTORIES):
        found = [i for i in row if i != MISSING_ID]
        assert sorted(found) == sorted(set(range(1, NUM_ITEMS + 1)) - set(history))
        assert float(scores[:len(found)].exp().sum()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="item_output"):
        tiny_model(item_ids=True, node_output=True)


# ----------------------------------------------------------------------------- beam search


def _search(model, k, beam=0, kv_cache=True, filter_history=True):
    batch = make_batch(HISTORIES, TARGETS, training=False)
    tables = model.generation_tables()
    return sid_beam_search(model.encoder, tables, model.trie, model.prepare(batch, tables), k, beam=beam,
                           kv_cache=kv_cache, filter_history=filter_history)


def test_beam_returns_valid_distinct_unseen_items():
    top = _search(tiny_model(), k=10)
    assert top.items.shape == (3, 10)
    for row, hist in zip(top.items.tolist(), HISTORIES):
        assert len(set(row)) == 10 and all(1 <= i <= NUM_ITEMS for i in row) and not set(row) & set(hist)
    assert bool((top.scores[:, :-1] >= top.scores[:, 1:]).all()) and bool((top.scores <= 0).all())


def test_full_beam_is_the_normalised_distribution_over_unseen_items():
    """With a beam as wide as the catalogue every unseen item is found, and the constrained
    sequence probabilities sum to 1; slots past the catalogue are MISSING_ID."""
    top = _search(tiny_model(), k=NUM_ITEMS, beam=NUM_ITEMS)
    for b, hist in enumerate(HISTORIES):
        found = [i for i in top.items[b].tolist() if i != MISSING_ID]
        assert sorted(found) == sorted(set(range(1, NUM_ITEMS + 1)) - set(hist))
        assert top.items[b].tolist()[len(found):] == [MISSING_ID] * len(hist)
        assert float(top.scores[b, :len(found)].exp().sum()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("scale", ["length", "max_len"])
def test_kv_cached_beam_matches_re_encoding(scale):
    model = tiny_model(scale)
    cached = _search(model, k=6, beam=7)
    again = _search(model, k=6, beam=7, kv_cache=False)
    assert torch.equal(cached.items, again.items)
    torch.testing.assert_close(cached.scores, again.scores, rtol=1e-5, atol=1e-5)


def test_list_ranks_with_scores_counts_ties_against_the_target():
    items = torch.tensor([[4, 2, 9, MISSING_ID]])
    scores = torch.tensor([[-1.0, -2.0, -2.0, float("-inf")]])
    assert list_ranks(items, torch.tensor([2]), scores).tolist() == [3.0]
    assert math.isinf(float(list_ranks(items, torch.tensor([5]), scores)[0]))
