"""Batch-side lookups (the data loader builds the tables' KJT and draws the negatives) and
training through torchrec's TrainPipelineSparseDist (``train.pipeline=sparse_dist``) on CPU."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sidvid_rec.cli import main

TINY = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16", "model.num_blocks=1",
        "train.batch_size=128", "loss.num_negatives=32", "eval.batch_size=610"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _train(run_dir, cache_dir, *extra):
    return main(["train", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *TINY, *extra])


def _plain_weights(model):
    from sidvid_rec.train.distributed import gather_state_dict

    return {k: v.clone() for k, v in gather_state_dict(model.state_dict()).items()
            if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("mode,shared", [("id", False), ("id", True), ("sid_id", False), ("sid", True)])
def test_batch_lookups_match_the_model_side_lookups(cache_dir, mode, shared):
    """One lookup of the batch's KJT gives the loss and gradients of the forward's own two
    lookups, for the same negatives (ID, SID-prefix and fused tables)."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator, LookupBuilder
    from sidvid_rec.losses import SampledSoftmaxLoss
    from sidvid_rec.models.build import build_encoder
    from sidvid_rec.models.hstu_rec import HSTURecommender
    from sidvid_rec.modules.embeddings import ItemEmbeddings

    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *TINY, "model.dropout=0"])
    data = load_sequences(cfg.data)
    n = data.num_items
    prefix = torch.randint(0, 97, (n + 1, 3), generator=torch.Generator().manual_seed(3)) if mode != "id" else None
    torch.manual_seed(0)
    emb = ItemEmbeddings(n, 16, mode, prefix, sid_table_size=97 if prefix is not None else 0, fusion="gate",
                         device="cpu")
    model = HSTURecommender(emb, build_encoder(cfg), SampledSoftmaxLoss(n, 32, 0.05, shared=shared))
    builder = LookupBuilder(n, 32, shared, emb.feature_names, emb.sid_prefix_table if prefix is not None else None,
                            seed=5)
    batch = next(iter(BatchIterator(make_split(data, "train", "loo", 20), 64, shuffle=False, lookups=builder)))
    assert batch.lookups.stride() == batch.num_inputs + int(batch.candidate_index.max()) + 1
    assert batch.negative_ids.shape == ((1 if shared else batch.jagged("target_id").values().numel()), 32)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    new = model(batch).loss
    new_grads = grads(new)
    items, times = batch.jagged("item_id"), batch.jagged("timestamp")
    h = model.encoder(emb.embed(items.values()), items.offsets(), times.values(),
                      query_timestamps=batch.jagged("target_timestamp").values(),
                      host_offsets=batch.input_host_offsets())
    old = model.loss(h, batch.jagged("target_id").values(), emb.embed, negative_ids=batch.negative_ids).loss
    old_grads = grads(old)
    assert float(new.detach()) == pytest.approx(float(old.detach()), rel=1e-6)
    assert new_grads.keys() == old_grads.keys() and any("ebc" in k for k in new_grads)
    for key in new_grads:
        torch.testing.assert_close(new_grads[key], old_grads[key], rtol=1e-5, atol=1e-6)


def test_lookup_negatives_depend_on_the_batch_only(cache_dir):
    """Negatives are seeded by (seed, epoch, batch, rank): a resumed epoch (start_batch) draws the
    uninterrupted run's, another epoch other ones; shared negatives are the same on every rank."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator, LookupBuilder

    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *TINY])
    data = load_sequences(cfg.data)
    split = make_split(data, "train", "loo", 20)

    def batches(epoch, start=0, shared=False, rank=0):
        it = BatchIterator(split, 64, shuffle=True, seed=1, rank=rank, world_size=2,
                           lookups=LookupBuilder(data.num_items, 8, shared, ["item_id"], seed=2))
        it.set_epoch(epoch, start_batch=start)
        return list(it)

    full, resumed, other = batches(0), batches(0, start=3), batches(1)
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.negative_ids, b.negative_ids) and torch.equal(a.lookups.values(), b.lookups.values())
    assert not torch.equal(full[0].negative_ids, other[0].negative_ids)
    assert torch.equal(batches(0, shared=True)[0].negative_ids, batches(0, shared=True, rank=1)[0].negative_ids)
    assert not torch.equal(batches(0)[0].negative_ids[:1], batches(0, rank=1)[0].negative_ids[:1])


def _trainer_steps(cfg, run_dir, num_steps):
    """``num_steps`` training steps of a fresh Trainer: (losses, final weights, whether the
    sharded EBC ran as torchrec's PipelinedForward meanwhile, and after)."""
    from sidvid_rec.data import load_sequences
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train.trainer import Trainer
    from torchrec.distributed.train_pipeline.runtime_forwards import PipelinedForward

    ctx = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # as run_training
    trainer = Trainer(cfg, str(run_dir), ctx, load_sequences(cfg.data))
    trainer.model.train()
    trainer.batches.set_epoch(0)
    steps = trainer._pipeline_steps(iter(trainer.batches)) if cfg.train.pipeline == "sparse_dist" \
        else trainer._plain_steps(iter(trainer.batches))
    ebc = unwrap(trainer.model).embeddings.ebc
    losses, pipelined = [], []
    for _, (loss, _scale) in zip(range(num_steps), steps):
        trainer.state.step += 1
        losses.append(float(loss.detach()))
        pipelined.append(isinstance(ebc.forward, PipelinedForward))
    steps.close()
    return losses, _plain_weights(trainer.model), all(pipelined), isinstance(ebc.forward, PipelinedForward)


def test_sparse_dist_pipeline_matches_the_plain_loop_on_one_rank(tmp_path, cache_dir):
    """Same seed, same batches: a whole epoch (10 batches, the pipeline's drain included) through
    TrainPipelineSparseDist gives the plain loop's losses and final tables and dense weights
    (warm-up schedule and dropout included)."""
    from sidvid_rec.config import load_config

    common = [f"data.cache_dir={cache_dir}", *TINY, "train.batch_lookups=true", "train.warmup_steps=3",
              "train.batch_size=64"]
    plain = _trainer_steps(load_config(None, common), tmp_path / "plain", 100)
    piped = _trainer_steps(load_config(None, [*common, "train.pipeline=sparse_dist"]), tmp_path / "piped", 100)
    assert not plain[2] and piped[2], "the pipeline must run the table lookup as torchrec's PipelinedForward"
    assert not piped[3], "the model gets its own forwards back after the epoch"
    assert len(plain[0]) == len(piped[0]) == 10
    assert piped[0] == pytest.approx(plain[0], rel=1e-5)
    assert plain[1].keys() == piped[1].keys() and any("embedding_bags" in k for k in plain[1])
    for key in plain[1]:
        torch.testing.assert_close(piped[1][key], plain[1][key], rtol=1e-5, atol=1e-6, msg=key)


SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]


def test_sparse_dist_with_sid_tables_matches_plain(tmp_path, cache_dir):
    """``sid_id`` (SID-prefix and ID tables, gate fusion): the loader's KJT carries both keys, the
    pipeline pipelines the lookup and gives the plain loop's losses and weights over an epoch."""
    from sidvid_rec.config import load_config

    sids = str(tmp_path / "sids")
    assert main(["sids", "build", "--out", sids, "--no-progress", f"data.cache_dir={cache_dir}", *SIDS]) == 0
    common = [f"data.cache_dir={cache_dir}", *TINY, "model.mode=sid_id", "model.fusion=gate", f"sids.dir={sids}",
              *SIDS, "train.batch_lookups=true"]
    plain = _trainer_steps(load_config(None, common), tmp_path / "plain", 100)
    piped = _trainer_steps(load_config(None, [*common, "train.pipeline=sparse_dist"]), tmp_path / "piped", 100)
    assert piped[2] and not piped[3] and len(plain[0]) == len(piped[0]) == 5
    assert piped[0] == pytest.approx(plain[0], rel=1e-5)
    assert any("sid_prefix" in k for k in plain[1]) and any("fusion" in k for k in plain[1])
    for key in plain[1]:
        torch.testing.assert_close(piped[1][key], plain[1][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.gpu
def test_sparse_dist_pipeline_matches_the_plain_loop_on_cuda(tmp_path, cache_dir):
    """The CUDA half of the one-rank parity: TrainPipelineSparseDist with its memcpy and data-dist
    streams against the plain loop on the same device."""
    from sidvid_rec.config import load_config

    common = [f"data.cache_dir={cache_dir}", *TINY, "train.device=cuda", "train.batch_lookups=true",
              "train.warmup_steps=3", "train.batch_size=64"]
    plain = _trainer_steps(load_config(None, common), tmp_path / "plain", 100)
    piped = _trainer_steps(load_config(None, [*common, "train.pipeline=sparse_dist"]), tmp_path / "piped", 100)
    assert piped[2] and not piped[3] and len(plain[0]) == len(piped[0]) == 10
    assert piped[0] == pytest.approx(plain[0], rel=1e-4)
    for key in plain[1]:
        torch.testing.assert_close(piped[1][key], plain[1][key], rtol=1e-4, atol=1e-5, msg=key)


class _Crash(Exception):
    pass


def _train_until_step_checkpoint(run_dir, cache_dir, step, *extra):
    """Trains like ``sidvid-rec train`` but dies right after writing the ``step-<step>`` checkpoint."""
    from sidvid_rec.config import load_config, with_absolute_paths
    from sidvid_rec.data import load_sequences
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train.trainer import Trainer

    class Dying(Trainer):
        def _save(self, name, position, is_best=False):
            super()._save(name, position, is_best)
            if name == f"step-{step}":
                raise _Crash(name)

    cfg = with_absolute_paths(load_config(None, [f"data.cache_dir={cache_dir}", *TINY, *extra]))
    ctx = init_distributed("cpu")
    torch.manual_seed(cfg.train.seed)  # as run_training
    trainer = Dying(cfg, str(run_dir), ctx, load_sequences(cfg.data))
    trainer.start()
    with pytest.raises(_Crash):
        trainer.fit()


def test_sparse_dist_run_matches_plain_and_resumes(tmp_path, cache_dir, capsys):
    """End to end (evaluation between epochs included): the pipeline's 2-epoch run ends with the
    plain loop's metrics (both with batch-side lookups), and a run stopped after epoch 1 and
    resumed (at the epoch's end, or from a mid-epoch step checkpoint) ends where the
    uninterrupted one did: the loader's negatives are seeded by the batch, not by a stream."""
    pipe = ["train.pipeline=sparse_dist", "train.checkpoint_every=2"]
    assert _train(tmp_path / "straight", cache_dir, "train.epochs=2", *pipe) == 0
    assert _train(tmp_path / "plain", cache_dir, "train.epochs=2", "train.batch_lookups=true") == 0
    assert _train(tmp_path / "resumed", cache_dir, "train.epochs=1", *pipe) == 0
    assert _train(tmp_path / "resumed", cache_dir, "train.epochs=2", "train.resume=true", *pipe) == 0
    # Mid-epoch: a run that dies right after its step-4 checkpoint (batch 4 of 5) resumes from it.
    _train_until_step_checkpoint(tmp_path / "mid", cache_dir, 4, "train.epochs=2", *pipe)
    assert _train(tmp_path / "mid", cache_dir, "train.epochs=2", "train.resume=true", *pipe) == 0
    assert "step-4.pt" in capsys.readouterr().out  # "resumed from .../step-4.pt"
    straight = _metrics(tmp_path / "straight")
    for other in ("plain", "resumed", "mid"):
        again = _metrics(tmp_path / other)
        for split in ("valid", "test"):
            for key, value in straight[split].items():
                assert again[split][key] == pytest.approx(value, abs=1e-6), (other, split, key)


def test_batch_lookups_refuse_what_they_cannot_serve():
    from sidvid_rec.config import load_config
    from sidvid_rec.errors import ConfigError
    from sidvid_rec.process_group import DistContext
    from sidvid_rec.train.trainer import check_batch_lookups

    one = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    check_batch_lookups(load_config(None, ["train.device=cpu", "train.pipeline=sparse_dist"]), one)
    check_batch_lookups(load_config(None, ["train.device=cpu", "model.mode=cobra"]), one)  # plain: nothing to check
    cases = [(["model.mode=cobra", "train.pipeline=sparse_dist"], one, "model.mode=cobra"),
             (["model.mode=sid_gen", "train.batch_lookups=true"], one, "model.mode=sid_gen"),
             (["loss.negatives=all", "train.pipeline=sparse_dist"], one, "loss.negatives=all")]
    for overrides, ctx, needle in cases:
        with pytest.raises(ConfigError) as err:
            check_batch_lookups(load_config(None, ["train.device=cpu", *overrides]), ctx)
        assert needle in str(err.value) and "\n" not in str(err.value)


PARITY = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16", "model.num_blocks=1",
          "model.dropout=0", "loss.shared_negatives=true", "loss.num_negatives=32", "train.batch_size=64",
          "eval.batch_size=256", "train.epochs=2", "train.seed=7"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = """
import json, os, sys
from sidvid_rec.cli import main
from sidvid_rec.data.batches import BatchIterator
root, cache = sys.argv[1:3]
parity = json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
strides = []
original = BatchIterator.__iter__
def recording(self):
    for batch in original(self):
        if batch.lookups is not None:
            strides.append(batch.lookups.stride())
        yield batch
BatchIterator.__iter__ = recording  # records what the loader hands out; changes nothing
out = {}
for name, extra in (("pipe_row_wise", ["train.pipeline=sparse_dist", "train.sharding=row_wise"]),
                    ("pipe_table_wise", ["train.pipeline=sparse_dist", "train.sharding=table_wise"]),
                    ("plain_row_wise", ["train.batch_lookups=true", "train.sharding=row_wise"])):
    out[name] = main(["train", "--run-dir", os.path.join(root, name), f"data.cache_dir={cache}", *parity, *extra])
out["strides"] = strides
with open(os.path.join(root, f"worker-{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def test_two_rank_pipeline_matches_one_rank(tmp_path):
    """2 gloo ranks (row-wise and table-wise tables) through the pipeline, and the plain loop on
    batch-side lookups, with the bag-count hooks off for training: the loader pads every rank's
    lookups to the same stride, and the runs end with the 1-process run's metrics (shared
    negatives, no dropout: the parity setting of test_distributed.py)."""
    cache = str(tmp_path / "cache")
    assert main(["train", "--run-dir", str(tmp_path / "one"), f"data.cache_dir={cache}", *PARITY,
                 "train.pipeline=sparse_dist"]) == 0
    one = _metrics(tmp_path / "one")
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path), cache, json.dumps(PARITY)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = [json.loads((tmp_path / f"worker-{r}.json").read_text()) for r in range(2)]
    for w in workers:
        assert {k: v for k, v in w.items() if k != "strides"} == {"pipe_row_wise": 0, "pipe_table_wise": 0,
                                                                  "plain_row_wise": 0}
    assert workers[0]["strides"] == workers[1]["strides"] and workers[0]["strides"]
    for name in ("pipe_row_wise", "pipe_table_wise", "plain_row_wise"):
        two = _metrics(tmp_path / name)
        for split in ("valid", "test"):
            for key, value in one[split].items():
                assert two[split][key] == pytest.approx(value, abs=1e-4), (name, split, key)
