"""The GPU path, checked where a CPU can show it: device choices, collectives' devices, the
fbgemm CUDA check, the generator's device, RNG state in checkpoints, FAISS GPU placement,
host syncs (run on ``meta`` tensors: any read of a value back to the host raises there),
pinned prefetch, ``train.precision`` (one bf16 step on the CPU) and the tests' device pins.
The CUDA versions of these checks are in tests/test_gpu.py (``@pytest.mark.gpu``)."""

import ast
import glob
import logging
import os
import subprocess

import numpy as np
import pytest
import torch

from sidvid_rec.errors import ConfigError
from sidvid_rec.process_group import DistContext, pick_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ctx(device: str, backend: str, world_size: int = 2) -> DistContext:
    return DistContext(rank=0, world_size=world_size, local_rank=0, device=torch.device(device), backend=backend)


# ----------------------------------------------------------------------------- devices and collectives


def test_cuda_device_wraps_local_rank_by_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert pick_device("auto", local_rank=4) == torch.device("cuda", 0)
    assert pick_device("cpu", local_rank=3) == torch.device("cpu")


def test_collectives_use_the_context_device():
    """nccl reduces CUDA tensors only: the pipeline's exit-code reduction, the trainer's sums
    and the state-dict gather allocate on the rank's GPU under nccl, on the CPU under gloo."""
    from sidvid_rec.process_group import all_reduce_max_int, collective_device
    from sidvid_rec.train.distributed import gather_device

    assert collective_device(_ctx("cuda:1", "nccl")) == torch.device("cuda", 1)
    assert gather_device(_ctx("cuda:1", "nccl")) == torch.device("cuda", 1)
    assert collective_device(_ctx("cpu", "gloo")) == torch.device("cpu")
    assert all_reduce_max_int(3, _ctx("cpu", "gloo", world_size=1)) == 3


def test_pipeline_reduces_exit_codes_through_the_process_group_helper():
    """No CPU tensor built by hand in pipeline_cmd any more: it goes through all_reduce_max_int."""
    source = open(os.path.join(REPO, "sidvid_rec", "cli", "pipeline_cmd.py")).read()
    assert "all_reduce_max_int(rc, ctx)" in source and "torch.tensor([rc])" not in source


def test_gather_state_dict_allocates_on_the_shards_device():
    from sidvid_rec.process_group import init_distributed
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    from sidvid_rec.process_group import collective_device
    from sidvid_rec.train.distributed import gather_state_dict

    ctx = init_distributed("cpu")
    local = torch.arange(12.0).view(3, 4)
    meta = ShardMetadata(shard_offsets=[0, 0], shard_sizes=[3, 4], placement=f"rank:0/{ctx.device}")
    sharded = ShardedTensor._init_from_local_shards([Shard(local, meta)], 3, 4)
    full = gather_state_dict({"t": sharded}, ctx)["t"]
    assert full.device == collective_device(ctx) and torch.equal(full, local)


# ----------------------------------------------------------------------------- stack


def test_cpu_only_fbgemm_under_cuda_is_refused_in_one_line():
    from sidvid_rec.stack import cuda_support_problem

    error = NotImplementedError("Could not run 'fbgemm::asynchronous_complete_cumsum' with arguments from the "
                                "'CUDA' backend.\nThis could be because ...")
    installed = {"fbgemm-gpu": "not installed", "fbgemm-gpu-cpu": "1.8.0"}
    message = cuda_support_problem(True, error, installed)
    assert message is not None and "\n" not in message
    assert "CPU-only fbgemm-gpu-cpu" in message and "make install-gpu" in message and "CUDA_VISIBLE_DEVICES=" in message
    assert cuda_support_problem(False, None, installed) is None  # no GPU visible: the CPU build is right
    assert cuda_support_problem(True, None, {"fbgemm-gpu": "1.8.0", "fbgemm-gpu-cpu": "not installed"}) is None


def test_require_fbgemm_passes_on_this_cpu_stack():
    from sidvid_rec.stack import require_fbgemm

    require_fbgemm.cache_clear()
    require_fbgemm()


def test_make_install_targets_name_the_wheel_index():
    def dry(target):
        out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    cpu, gpu = dry("install"), dry("install-gpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu and "requirements/cpu.txt" in cpu
    assert "--index-url https://download.pytorch.org/whl/cu126" in gpu and "requirements/gpu.txt" in gpu
    assert "uninstall -y fbgemm-gpu-cpu" in gpu
    requirements = open(os.path.join(REPO, "requirements", "gpu.txt")).read()
    assert "fbgemm-gpu==1.8.0" in requirements and "faiss-gpu-cu12" in requirements


# ----------------------------------------------------------------------------- optimizer, generator, RNG


def test_negative_generator_lives_on_the_training_device():
    from sidvid_rec.train.trainer import negative_generator

    assert negative_generator(torch.device("cpu")).device == torch.device("cpu")
    source = open(os.path.join(REPO, "sidvid_rec", "train", "trainer.py")).read()
    assert "negative_generator(ctx.device)" in source and 'torch.Generator(device="cpu")' not in source


def test_rng_state_has_cuda_only_on_cuda_and_old_checkpoints_load(tmp_path):
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train import checkpoint as ckpt

    ctx = init_distributed("cpu")
    generator = torch.Generator().manual_seed(5)
    state = ckpt.rng_state(generator, torch.device("cpu"))
    assert set(state) == {"torch", "generator"}  # a CPU run has no CUDA stream to save
    record = ckpt.CheckpointRecord(name="epoch-1", fingerprint="f", epoch=1, batch=0, step=1, world_size=1,
                                   sharding="auto")
    # An "old" checkpoint: RNG without a CUDA entry.
    ckpt.save_checkpoint(str(tmp_path), {"model": {"w": torch.ones(3)}, "rng": {"rank0": state}}, record, ctx)
    path = ckpt.latest_checkpoint(str(tmp_path))
    # A CUDA run's template asks for rng.rank0.cuda; loading drops it instead of failing.
    expected = generator.get_state().clone()
    template = {"model": {"w": torch.zeros(3)},
                "rng": {"rank0": {"torch": torch.get_rng_state(), "generator": torch.Generator().get_state(),
                                  "cuda": torch.zeros(16, dtype=torch.uint8)}}}
    dropped = []
    ckpt.load_checkpoint(path, template, optional=("rng.",), dropped=dropped)
    assert dropped == ["rng.rank0.cuda"] and torch.equal(template["model"]["w"], torch.ones(3))
    fresh = torch.Generator()
    missing = ckpt.restore_rng_state(template["rng"]["rank0"], fresh, torch.device("cpu"))
    assert missing == [] and torch.equal(fresh.get_state(), expected)
    assert ckpt.restore_rng_state({}, fresh, torch.device("cuda", 0)) == ["torch", "generator", "cuda"]
    # Without the optional prefix the missing entry is still an error (nothing else changed).
    with pytest.raises(Exception, match="lacks rng.rank0.cuda"):
        ckpt.load_checkpoint(path, {"rng": {"rank0": {"cuda": torch.zeros(16, dtype=torch.uint8)}}})


# ----------------------------------------------------------------------------- FAISS


def test_faiss_gpu_request_without_gpu_faiss_is_logged_or_raised(caplog):
    from sidvid_rec.retrieval import faiss_index
    from sidvid_rec.retrieval.faiss_index import VidIndex, gpu_device, gpu_unavailable_reason

    vectors = torch.randn(20, 8)
    ids = torch.arange(1, 21)
    reason = gpu_unavailable_reason()
    assert reason is not None  # this machine: faiss-cpu, no CUDA
    faiss_index._warned.clear()
    with caplog.at_level(logging.INFO, logger="sidvid_rec.retrieval.faiss_index"):
        index = VidIndex.build(vectors, ids, kind="flat", use_gpu=True)
    assert not index.on_gpu and "stays on the CPU" in caplog.text and reason in caplog.text
    with pytest.raises(ConfigError, match="stays on the CPU"):
        VidIndex(index._cpu_index, "flat", use_gpu=True, strict_gpu=True)
    assert gpu_device(5) == 0  # modulo the GPUs faiss sees (none here: one slot)


def test_faiss_gpu_device_follows_local_rank(monkeypatch):
    from sidvid_rec.retrieval import faiss_index

    monkeypatch.setattr(faiss_index.faiss, "get_num_gpus", lambda: 4, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert faiss_index.gpu_device() == 2  # not GPU 0 for every rank
    assert faiss_index.gpu_device(3) == 3


# ----------------------------------------------------------------------------- host syncs


def _batch(lengths, dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g)
    ts = torch.cumsum(torch.randint(1, 10**5, (total,), generator=g), 0)
    return x.to(device), offsets.to(device), ts.to(device), offsets


def _encoder(dim=8, max_len=12, heads=1):
    from sidvid_rec.modules.hstu import HSTUEncoder

    torch.manual_seed(0)
    return HSTUEncoder(max_len=max_len, dim=dim, num_blocks=2, num_heads=heads, dqk=8, dv=8, dropout=0.1,
                       attn_dropout=0.0)


@pytest.mark.parametrize("heads", [1, 2])
def test_encoder_forward_backward_never_reads_device_values(heads):
    """On ``meta`` tensors any ``.item()``/``int()``/``bool()``/``.cpu()``, bool-mask indexing
    or weighted ``bincount`` raises: a forward and backward that run there never wait for the
    device (given the batch's host-side offsets, as the training path passes them)."""
    encoder = _encoder(heads=heads).to("meta").train()
    x, offsets, ts, host = _batch([5, 0, 3, 12, 1], 8, "meta")
    x.requires_grad_(True)
    out = encoder(x, offsets, ts, host_offsets=host)
    out.sum().backward()
    assert out.shape == (21, 8) and x.grad.shape == x.shape
    assert all(p.grad is not None for p in encoder.parameters())


def test_host_checks_still_refuse_bad_batches():
    from sidvid_rec.errors import DataError

    encoder = _encoder()
    x, offsets, ts, host = _batch([5, 13], 8, "cpu")
    with pytest.raises(DataError, match="more than max_len"):
        encoder(x, offsets, ts, host_offsets=host)
    with pytest.raises(DataError, match="run from 0 to T"):
        encoder(x[:-1], offsets, ts[:-1], host_offsets=host)
    with pytest.raises(ValueError, match="CPU tensor"):
        encoder(x, offsets, ts, host_offsets=host.to("meta"))


def test_host_offsets_give_the_same_outputs_on_cpu():
    encoder = _encoder().eval()
    x, offsets, ts, host = _batch([5, 0, 3, 12, 1], 8, "cpu")
    assert torch.equal(encoder(x, offsets, ts), encoder(x, offsets, ts, host_offsets=host))


@pytest.mark.parametrize("overhead", [0, 50, 5000, 1e12])
def test_chunking_without_numpy_matches_numpy(overhead):
    """benchmarks/gpu_check.py may run where torch is the only package: the torch DP cuts alike."""
    from sidvid_rec.ops import jagged

    lengths = torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(int(overhead) % 7))
    desc = torch.sort(lengths, descending=True).values
    assert jagged._partition_sorted_torch(desc, overhead) == jagged._partition_sorted(desc, overhead)


def test_loss_totals_accumulate_on_the_device():
    from sidvid_rec.train.trainer import LossTotals

    on_meta = LossTotals(0.0, 0.0, torch.device("meta"))
    on_meta.add(torch.ones((), device="meta"), 0.5)  # float(loss) would raise on meta
    totals = LossTotals(1.0, 2.0, torch.device("cpu"))
    for value in (0.5, 1.5):
        totals.add(torch.tensor(value), 2.0)
    assert totals.reduced(_ctx("cpu", "gloo", world_size=1)) == (5.0, 4.0)


def test_kjt_of_a_lookup_is_built_without_reading_lengths():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sidvid_rec.modules.embeddings import ItemEmbeddings

    codes = np.array([[0, 0], [1, 2], [2, 1], [1, 1]])
    emb = ItemEmbeddings.from_codes(3, 8, "sid_id", codes, fusion="sum", device="cpu")
    kjt = emb.features(torch.tensor([1, 3, 2]), num_bags=5)
    synced = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())
    assert kjt.length_per_key() == synced.length_per_key() and kjt.stride() == synced.stride() == 5
    assert torch.equal(kjt.offsets(), synced.offsets())


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_host_offsets():
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator, prefetch_to_device

    cfg = load_config(None, ["data.max_len=10"])
    split = make_split(load_sequences(cfg.data), "train", "loo", 10)
    batches = list(BatchIterator(split, 256, shuffle=False))
    moved = list(prefetch_to_device(iter(batches), torch.device("cpu")))
    assert len(moved) == len(batches)
    for a, b in zip(batches, moved):
        assert torch.equal(a.jagged("item_id").values(), b.jagged("item_id").values())
        assert b.host_offsets.device.type == "cpu"
        assert torch.equal(b.host_offsets, b.jagged("item_id").offsets().long())


def test_batch_ids_are_checked_on_the_host():
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.errors import DataError

    data = load_sequences(load_config(None, ["data.max_len=10"]).data)
    split = make_split(data, "train", "loo", 10)
    batch = collate(split, np.arange(4), np.ones(4, dtype=np.float32))
    batch.check_item_ids(data.num_items)
    with pytest.raises(DataError, match="outside the item table"):
        batch.check_item_ids(3)


# ----------------------------------------------------------------------------- precision


def test_attention_mask_value_is_finite_in_every_dtype():
    from sidvid_rec.ops.hstu_attention import MASKED_BIAS, compute_table, masked_bias

    assert masked_bias(torch.float32) == MASKED_BIAS and masked_bias(torch.bfloat16) == MASKED_BIAS
    half = torch.tensor(masked_bias(torch.float16), dtype=torch.float16)
    assert torch.isfinite(half) and torch.nn.functional.silu(half + 30) == 0
    table = torch.tensor([0.1, -0.2, MASKED_BIAS, MASKED_BIAS])
    assert torch.isfinite(compute_table(table, torch.float16)).all()
    assert compute_table(table, torch.float32) is table


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_attention_stays_finite(fused):
    """-1e9 in float16 is -inf and silu(-inf) = nan; the dtype-aware mask keeps it finite."""
    from sidvid_rec.ops import hstu_attention, jagged

    x, offsets, ts, _ = _batch([4, 2, 6], 8, "cpu")
    plan = hstu_attention.build_attention_plan(offsets, ts, jagged.next_timestamps(ts, offsets), None, 8, 16, True)
    table = hstu_attention.relative_bias_table(torch.zeros(17), torch.zeros(8))
    q = x.half().requires_grad_(True)
    out = hstu_attention.jagged_pointwise_attention(q, x.half(), x.half(), table, plan, 1, fused=fused)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    reference = hstu_attention.jagged_pointwise_attention(x, x, x, table, plan, 1, fused=fused)
    assert (out.float() - reference).abs().max() < 5e-2


def test_precision_config_and_types():
    from typing import get_args

    from sidvid_rec.config import load_config
    from sidvid_rec.modules.hstu import autocast_dtype
    from sidvid_rec.types import Precision

    assert get_args(Precision) == ("fp32", "tf32", "bf16")
    assert load_config(None, []).train.precision == "fp32"
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("tf32") is None


def test_one_bf16_training_step_on_cpu_matches_fp32():
    """The whole model (unsharded tables) in bf16 autocast: finite loss close to fp32's, finite
    gradients, one optimizer step."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.models.build import build_model

    overrides = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16",
                 "model.num_blocks=2", "model.dropout=0.0", "loss.num_negatives=32"]
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, overrides + [f"train.precision={precision}"])
        data = load_sequences(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg, data, table_device="cpu").train()
        assert model.encoder.precision == precision
        batch = collate(make_split(data, "train", "loo", 20), np.arange(32), np.ones(32, dtype=np.float32))
        out = model(batch, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        dense = [p for n, p in model.named_parameters() if "ebc" not in n and p.grad is not None]
        assert dense and all(torch.isfinite(p.grad).all() for p in dense)
        torch.optim.AdamW(dense, lr=1e-3).step()
        losses[precision] = float(out.loss.detach())
    assert np.isfinite(losses["bf16"]) and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 arithmetic did run


# ----------------------------------------------------------------------------- torch-only GPU check


def test_gpu_check_runs_on_cpu_with_torch_alone(tmp_path):
    """benchmarks/gpu_check.sh with the CPU fallback and tiny sizes; fbgemm, torchrec and faiss
    are blocked inside it, so this also proves the torch-only modules import without them."""
    import json
    import sys

    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run([os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--device", "cpu", "--batch", "3",
                           "--max-len", "8", "--dim", "8", "--dqk", "4", "--dv", "4", "--blocks", "1", "--items", "30",
                           "--negatives", "4", "--steps", "1", "--warmup", "0", "--matmul-size", "16",
                           "--matmul-repeats", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["stack_modules_loaded"] == [] and report["parity"]["encoder_max_abs_err"] == 0.0
    assert report["parity"]["loss_abs_err"] == 0.0 and np.isfinite(report["parity"]["loss_cpu"])
    for precision in ("fp32", "bf16"):
        entry = report["throughput"][precision]
        assert entry["tokens_per_s"] > 0 and entry["flop_per_s"] > 0
    assert report["matmul_bf16"]["flop_per_s"] > 0
    # Without CUDA the default device is refused in one line.
    proc = subprocess.run([os.path.join(REPO, "benchmarks", "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=300)
    if not torch.cuda.is_available():
        assert proc.returncode == 2 and "--device cpu" in proc.stderr


# ----------------------------------------------------------------------------- the suite pins the CPU


def test_training_test_configs_pin_the_cpu():
    """Tests that train mean the CPU: on a GPU host, train.device=auto would put the 2-rank gloo
    tests on CUDA. Every module-level override list naming a model/train setting pins it."""
    unpinned = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        tree = ast.parse(open(path).read())
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
                continue
            words = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if any(w.startswith(("model.", "train.")) for w in words) and "train.device=cpu" not in words:
                unpinned.append(f"{os.path.basename(path)}:{node.targets[0].id}")
    assert not unpinned, unpinned
