"""Item embedding tables (EBC), SID prefix hashing, fusion and the table optimizers."""

import numpy as np
import pytest
import torch

from sidvid_rec.errors import ConfigError, DataError
from sidvid_rec.semantic_ids.codebook import sid_prefix_ids
from sidvid_rec.modules.embeddings import (
    ITEM_FEATURE,
    SID_FEATURE,
    ItemEmbeddings,
)
from sidvid_rec.modules.fusion import SidIdFusion
from sidvid_rec.train.optimizers import (
    apply_embedding_optimizer,
    dense_optimizer,
    dense_parameters,
    embedding_optimizer_kwargs,
)

# Item 0 is padding; items 1 and 2 share (1, 2), items 1..3 share (1,), item 4 reuses code 2 and 3
# at other depths and with another parent, so it must share nothing with 1..3.
CODES = np.array([[9, 9, 9], [1, 2, 3], [1, 2, 4], [1, 5, 3], [0, 2, 3]])


def _weights(emb: ItemEmbeddings, table: str) -> torch.Tensor:
    """The table's rows as the lookups see them: ``[rows, dim]`` (padding columns dropped)."""
    return _param(emb, table)[:, : emb.dim]


def _param(emb: ItemEmbeddings, table: str) -> torch.nn.Parameter:
    return emb.ebc.embedding_bags[table].weight


def _build(mode: str, fusion: str = "sum", num_items: int = 4, dim: int = 6, codes=CODES) -> ItemEmbeddings:
    torch.manual_seed(0)
    return ItemEmbeddings.from_codes(num_items, dim, mode, codes if mode != "id" else None, fusion=fusion)


# ----------------------------------------------------------------------------- prefix ids


def test_prefix_ids_unique_per_distinct_prefix_and_shared():
    prefix = sid_prefix_ids(CODES)
    ids = prefix.ids.numpy()
    assert ids.shape == CODES.shape and (ids[0] == 0).all()  # padding row reserved
    # distinct (depth, prefix) <-> distinct id, over every depth at once
    seen = {}
    for item in range(1, len(CODES)):
        for depth in range(CODES.shape[1]):
            key = tuple(CODES[item, : depth + 1])
            assert seen.setdefault(key, ids[item, depth]) == ids[item, depth]
    assert len(set(seen.values())) == len(seen) == prefix.num_prefixes == 9
    assert 0 not in seen.values() and prefix.table_size == 10 and ids.max() == 9
    assert ids[1, 1] == ids[2, 1] and ids[1, 0] == ids[3, 0]  # shared prefixes share rows
    assert ids[1, 2] != ids[3, 2] and not set(ids[4]) & set(ids[1])  # same code, other parent


def test_prefix_ids_random_codes_bijective():
    codes = np.random.default_rng(0).integers(0, 4, (301, 3))
    prefix = sid_prefix_ids(codes)
    keys = {(d, tuple(codes[i, : d + 1])) for i in range(1, 301) for d in range(3)}
    assert prefix.num_prefixes == len(keys)
    pairs = {(d, tuple(codes[i, : d + 1]), int(prefix.ids[i, d])) for i in range(1, 301) for d in range(3)}
    assert len(pairs) == len(keys) and len({p[2] for p in pairs}) == len(keys)


def test_prefix_ids_modulo_wrap():
    exact = sid_prefix_ids(CODES)
    wrapped = sid_prefix_ids(torch.as_tensor(CODES), table_size=4)
    assert wrapped.table_size == 4 and (wrapped.ids[0] == 0).all()
    expected = 1 + (exact.ids[1:] - 1) % 3  # rank = exact id - 1; 3 rows left after padding
    assert torch.equal(wrapped.ids[1:], expected)
    assert wrapped.ids[1:].min() >= 1 and wrapped.ids.max() <= 3


@pytest.mark.parametrize("codes,size,message", [
    (np.zeros((3,), dtype=int), 0, "table"),
    (np.array([[0, 0], [1, -2]]), 0, "non-negative"),
    (np.array([[0.0], [1.5]]), 0, "integers"),
    (CODES, 1, "at least 2"),
])
def test_prefix_ids_bad_input(codes, size, message):
    with pytest.raises(DataError, match=message):
        sid_prefix_ids(codes, size)


# ----------------------------------------------------------------------------- lookups


def test_lookup_matches_table_rows():
    emb = _build("cobra")
    prefix = sid_prefix_ids(CODES).ids
    ids = torch.tensor([3, 1, 1, 4, 0])
    out = emb.vectors(ids)
    assert torch.allclose(out.id_vec, _weights(emb, ITEM_FEATURE)[ids])
    by_hand = _weights(emb, SID_FEATURE)[prefix[ids]].sum(1)  # [T, L, D] -> [T, D]
    assert torch.allclose(out.sid_vec, by_hand, atol=1e-7)
    assert torch.equal(out.sid_vec[1], out.sid_vec[2])


@pytest.mark.parametrize("mode", ["id", "sid", "sid_id"])
def test_embed_per_mode(mode):
    emb = _build(mode)
    ids = torch.tensor([2, 4, 1])
    item = _weights(emb, ITEM_FEATURE)[ids] if mode != "sid" else None
    sid = _weights(emb, SID_FEATURE)[sid_prefix_ids(CODES).ids[ids]].sum(1) if mode != "id" else None
    expected = {"id": item, "sid": sid, "sid_id": None if item is None or sid is None else item + sid}[mode]
    assert torch.allclose(emb.embed(ids), expected, atol=1e-7)
    assert emb.feature_names == {"id": [ITEM_FEATURE], "sid": [SID_FEATURE],
                                 "sid_id": [ITEM_FEATURE, SID_FEATURE]}[mode]
    assert torch.allclose(emb.all_item_vectors(chunk=2), emb.embed(torch.arange(5)), atol=1e-7)


def test_features_one_bag_per_position_and_padding_bags():
    emb = _build("sid_id")
    kjt = emb.features(torch.tensor([1, 3]), num_bags=3)
    assert kjt.keys() == [ITEM_FEATURE, SID_FEATURE] and kjt.stride() == 3
    assert kjt.lengths().tolist() == [1, 1, 0, 3, 3, 0]
    assert kjt.values().tolist()[:2] == [1, 3]
    out = emb.vectors(torch.tensor([1, 3]), num_bags=3)
    assert out.id_vec.shape == (2, 6) and torch.allclose(out.sid_vec, emb.vectors(torch.tensor([1, 3])).sid_vec)


def test_gradient_reaches_looked_up_rows_only():
    emb = _build("sid_id", fusion="mlp")
    emb.embed(torch.tensor([1, 2])).sum().backward()
    item_grad = _param(emb, ITEM_FEATURE).grad
    assert item_grad[[1, 2]].abs().sum() > 0 and item_grad[[0, 3, 4]].abs().sum() == 0
    used = set(sid_prefix_ids(CODES).ids[[1, 2]].flatten().tolist())
    sid_grad = _param(emb, SID_FEATURE).grad.abs().sum(1)
    assert {i for i in range(sid_grad.numel()) if sid_grad[i] > 0} == used


@pytest.mark.parametrize("bad", [5, -1, 100])
def test_bad_item_id_rejected(bad):
    emb = _build("sid_id")
    with pytest.raises(DataError, match=f"item id {bad} is outside the item table \\[0, 4\\]"):
        emb.embed(torch.tensor([1, bad, 2]))


def test_empty_and_construction_errors():
    emb = _build("sid")
    assert emb.embed(torch.zeros(0, dtype=torch.long)).shape == (0, 6)
    with pytest.raises(DataError, match="needs"):
        ItemEmbeddings(4, 6, "sid")
    with pytest.raises(DataError, match="another item set"):
        ItemEmbeddings(7, 6, "sid", sid_prefix_ids(CODES).ids)
    with pytest.raises(ValueError, match="unknown embedding mode"):
        ItemEmbeddings(4, 6, "vid")
    with pytest.raises(ValueError, match="cobra"):
        _build("cobra").embed(torch.tensor([1]))


def test_meta_device_keeps_buffer_and_dense_part_real():
    emb = ItemEmbeddings.from_codes(4, 6, "sid_id", CODES, fusion="gate", device="meta")
    assert _weights(emb, ITEM_FEATURE).is_meta and _weights(emb, SID_FEATURE).is_meta
    assert not emb.sid_prefix_table.is_meta and torch.equal(emb.sid_prefix_table, sid_prefix_ids(CODES).ids)
    assert all(not p.is_meta for p in emb.fusion.parameters())


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("kind", ["sum", "fc", "mlp", "gate"])
def test_fusion_shapes_and_gradients(kind):
    torch.manual_seed(0)
    fusion = SidIdFusion(8, kind)
    sid, item = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    out = fusion(sid, item)
    assert out.shape == (5, 8)
    out.square().sum().backward()
    assert sid.grad.abs().sum() > 0 and item.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    if kind == "sum":
        assert torch.equal(out, sid + item)


def test_gate_is_a_convex_mix():
    fusion = SidIdFusion(4, "gate")
    sid, item = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        fusion._proj.weight.zero_()
        fusion._proj.bias.fill_(50.0)  # gate -> 1: SID vector
        assert torch.allclose(fusion(sid, item), sid)
        fusion._proj.bias.fill_(0.0)  # gate 0.5: the mean
        assert torch.allclose(fusion(sid, item), (sid + item) / 2)
    with pytest.raises(ValueError, match="unknown fusion"):
        SidIdFusion(4, "concat")


# ----------------------------------------------------------------------------- optimizers


def test_embedding_optimizer_choice():
    assert embedding_optimizer_kwargs("auto", 0.05, "cpu").name == "rowwise_adagrad"
    assert embedding_optimizer_kwargs("adam", 1e-3, "cuda").name == "adam"  # explicit Adam: CUDA only


def test_auto_embedding_optimizer_is_the_same_on_cuda():
    """``auto`` must not become Adam on CUDA: embedding_lr (0.05) is an Adagrad rate."""
    from sidvid_rec.train.optimizers import RowWiseAdagrad, resolve_embedding_optimizer

    for device in ("cpu", "cuda", torch.device("cuda", 1)):
        assert resolve_embedding_optimizer("auto", device) == "rowwise_adagrad"
        spec = embedding_optimizer_kwargs("auto", 0.05, device)
        assert spec.optimizer_class is RowWiseAdagrad and spec.kwargs["lr"] == 0.05
    assert embedding_optimizer_kwargs("sgd", 0.1, torch.device("cpu")).kwargs == {"lr": 0.1}
    with pytest.raises(ConfigError, match="adam needs CUDA"):
        embedding_optimizer_kwargs("adam", 0.05, "cpu")
    with pytest.raises(ConfigError, match="not one of"):
        embedding_optimizer_kwargs("lamb", 0.05, "cpu")
    with pytest.raises(ConfigError, match="positive"):
        embedding_optimizer_kwargs("sgd", 0.0, "cpu")


class _Tiny(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        torch.manual_seed(0)
        self.item_embeddings = ItemEmbeddings.from_codes(4, 6, "sid_id", CODES, fusion="fc", device=device)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, ids):
        return self.head(self.item_embeddings.embed(ids)).square().sum()


def test_in_backward_rowwise_adagrad_updates_looked_up_rows_unsharded():
    model = _Tiny()
    apply_embedding_optimizer(model, "rowwise_adagrad", 0.1, "cpu")
    weight = _param(model.item_embeddings, ITEM_FEATURE)
    before = weight.detach().clone()
    # the gradient the hook will consume, computed on a copy without the optimizer
    probe = _Tiny()
    probe(torch.tensor([1, 3, 3])).backward()
    grad = _param(probe.item_embeddings, ITEM_FEATURE).grad  # [5, 8]: 2 padding columns, zero
    assert weight.shape == (5, 8) and grad[:, 6:].abs().sum() == 0
    model(torch.tensor([1, 3, 3])).backward()
    assert weight.grad is None  # consumed in backward
    expected = before - 0.1 * grad / (grad.square().mean(1, keepdim=True).sqrt() + 1e-8)
    assert torch.allclose(weight.detach(), expected, atol=1e-6)
    changed = (weight.detach() - before).abs().sum(1).nonzero().flatten().tolist()
    assert changed == [1, 3]
    names = [n for n, _ in dense_parameters(model)]
    assert names == ["item_embeddings.fusion._proj.weight", "item_embeddings.fusion._proj.bias",
                     "head.weight", "head.bias"]
    assert len(dense_optimizer(model, 1e-3).param_groups[0]["params"]) == 4
    with pytest.raises(ValueError, match="already attached"):
        apply_embedding_optimizer(model, "sgd", 0.1, "cpu")


def test_dmp_world_size_one_fused_matches_unsharded():
    """One-rank gloo DMP on CPU: fbgemm's fused row-wise Adagrad equals the unsharded hook path."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    from sidvid_rec.process_group import init_distributed

    init_distributed("cpu")
    if torch.distributed.get_world_size() != 1:
        pytest.skip("needs a one-rank process group")
    reference, model = _Tiny(), _Tiny(device="meta")
    for m in (reference, model):
        apply_embedding_optimizer(m, "rowwise_adagrad", 0.1, "cpu")
    # Tables this small make the planner pick data_parallel + dense kernel, which silently
    # drops the in-backward optimizer: pin table-wise + fused, as the trainer must.
    fused = ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value],
                                 compute_kernels=[EmbeddingComputeKernel.FUSED.value])
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                       constraints={ITEM_FEATURE: fused, SID_FEATURE: fused})
    plan = planner.collective_plan(model, None, torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
    dmp.load_state_dict(reference.state_dict())
    assert [n for n, _ in dense_parameters(dmp)] == [n for n, _ in dense_parameters(reference)]
    for ids in (torch.tensor([1, 3, 3]), torch.tensor([2, 4])):
        dmp(ids).backward()
        reference(ids).backward()
    state = dmp.state_dict()
    for table in (ITEM_FEATURE, SID_FEATURE):
        sharded = state[f"item_embeddings.ebc.embedding_bags.{table}.weight"].local_shards()[0].tensor
        assert torch.allclose(sharded, _param(reference.item_embeddings, table).detach(), atol=1e-6)
    assert set(dmp.fused_optimizer.state_dict()["state"]) == {
        f"item_embeddings.ebc.embedding_bags.{t}.weight" for t in (ITEM_FEATURE, SID_FEATURE)
    }
