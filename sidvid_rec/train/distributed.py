"""DistributedModelParallel wrapping: tables sharded by the plan (:mod:`sidvid_rec.train.planner`), the dense part data-parallel.

Every training process, a lone one included, wraps its model in DMP so that the tables
always run fbgemm's table-batched kernels with the fused in-backward optimizer. The
planner chooses the sharding (``train.sharding=auto``) or is constrained to one type.
torchrec 1.8 offers row-wise EBC sharding on CUDA only through the planner, so on CPU a
forced ``row_wise`` is built with ``construct_module_sharding_plan`` (PLATFORM.md).

Three things make N ranks behave like one process (PLATFORM.md's gotchas):

* **Table init** does not depend on the world size: every table is drawn from a seeded
  generator in chunks of rows (:func:`init_tables`), each rank filling only its shards, so
  row-wise shards are not copies of each other and 1 and 2 ranks start from equal tables.
* **Equal bag counts**: a row-wise EBC on gloo all-gathers pooled rows and fails when ranks
  look up different numbers of bags. :func:`equalize_bag_counts` pads every lookup with
  empty bags up to the largest count over ranks (one scalar all-reduce) and cuts the
  output back.
  Batch-side lookups (``train.batch_lookups`` / ``train.pipeline=sparse_dist``) come padded to
  equal bag counts from the data loader, so the trainer switches the hooks off for those steps
  (:func:`set_bag_count_hooks`); evaluation's own lookups still use them.
* **Plan checks**: a world size the forced sharding cannot split the tables over is a
  one-line :class:`~sidvid_rec.errors.ConfigError` (:func:`check_world_size`), not a
  traceback from inside torchrec.

State dicts of a DMP model hold ``ShardedTensor`` s. Checkpoints save them as they are with
``torch.distributed.checkpoint`` (each rank writes its shards; loading reshards onto any
number of ranks); :func:`gather_state_dict` still turns them into full tensors on rank 0.
"""

import zlib
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from sidvid_rec.config import Config, TrainConfig
from sidvid_rec.data import SequenceData
from sidvid_rec.errors import ConfigError
from sidvid_rec.models.build import build_model
from sidvid_rec.modules.embeddings import INIT_STD  # rows start as N(0, 0.02) truncated at 2 std
from sidvid_rec.process_group import DistContext, collective_device
from sidvid_rec.stack import require_fbgemm
from sidvid_rec.train.optimizers import apply_embedding_optimizer, table_modules, tables_in_dense_optimizer
from sidvid_rec.train.planner import check_world_size, sharding_plan

require_fbgemm()

from torch.distributed._shard.sharded_tensor import ShardedTensor  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.types import LazyAwaitable, ShardingEnv  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor  # noqa: E402

INIT_CHUNK_ROWS = 65536
"""Rows drawn per seeded generator by :func:`init_tables` (a rank draws only its chunks)."""

def _chunk_generator(seed: int, table: str, chunk: int) -> torch.Generator:
    # crc32, not hash(): Python's string hash differs between processes.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{table}:{chunk}".encode()))


def _init_shard(shard: torch.Tensor, offsets: List[int], rows: int, width: int, seed: int, table: str) -> None:
    """Fills one local shard ``[n, w]`` at ``offsets`` (row, col) of a ``[rows, width]`` table."""
    r0, c0 = offsets
    n, w = shard.shape
    first, last = r0 // INIT_CHUNK_ROWS, (r0 + n - 1) // INIT_CHUNK_ROWS
    for chunk in range(first, last + 1):
        lo = chunk * INIT_CHUNK_ROWS
        block = torch.empty(min(INIT_CHUNK_ROWS, rows - lo), width)
        torch.nn.init.trunc_normal_(block, 0.0, INIT_STD, -2 * INIT_STD, 2 * INIT_STD,
                                    generator=_chunk_generator(seed, table, chunk))
        a, b = max(r0, lo), min(r0 + n, lo + block.shape[0])  # overlap of shard and chunk rows
        shard[a - r0:b - r0].copy_(block[a - lo:b - lo, c0:c0 + w])


@torch.no_grad()
def init_tables(model: DistributedModelParallel, seed: int) -> None:
    """Re-draws every sharded table from seeded generators: the same full tables on any world size.

    Each rank draws only the row chunks its shards overlap (memory stays per-shard).
    """
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, ShardedTensor):
            continue
        rows, width = value.size()
        table = key.rsplit(".", 2)[-2]  # ...embedding_bags.<table>.weight
        for shard in value.local_shards():
            _init_shard(shard.tensor, list(shard.metadata.shard_offsets), rows, width, seed, table)
    model.load_state_dict(state)


def _pad_bags(features: KeyedJaggedTensor, num_bags: int) -> KeyedJaggedTensor:
    """Appends empty bags to every key of ``features`` so that its stride becomes ``num_bags``."""
    stride = features.stride()
    lengths = features.lengths().view(len(features.keys()), stride)  # [F, B]
    pad = torch.zeros(lengths.shape[0], num_bags - stride, dtype=lengths.dtype, device=lengths.device)
    return KeyedJaggedTensor.from_lengths_sync(keys=features.keys(), values=features.values(),
                                               lengths=torch.cat([lengths, pad], dim=1).reshape(-1))


BAG_HOOKS_ON = "_sidvid_equalize_bag_counts"
"""Attribute of a sharded EBC with :func:`equalize_bag_counts` hooks: whether they act."""


def set_bag_count_hooks(model: nn.Module, enabled: bool) -> None:
    """Switches every :func:`equalize_bag_counts` hook pair of ``model`` on or off."""
    for module in model.modules():
        if hasattr(module, BAG_HOOKS_ON):
            setattr(module, BAG_HOOKS_ON, enabled)


def equalize_bag_counts(ebc: nn.Module) -> None:
    """Makes every rank look up the same number of bags in the sharded ``ebc`` (hooks).

    A forward pre-hook pads the KJT with empty bags to the largest stride over ranks (one
    scalar all-reduce per lookup); a forward hook cuts the pooled ``KeyedTensor`` back to
    this rank's bags. Results are unchanged: empty bags pool to zeros and get no gradient.
    """
    strides: List[int] = []
    setattr(ebc, BAG_HOOKS_ON, True)

    def pad(module: nn.Module, args: Any) -> Any:
        if not getattr(module, BAG_HOOKS_ON):
            return None
        features = args[0]
        stride = torch.tensor([features.stride()], dtype=torch.int64, device=features.values().device)  # nccl: on GPU
        dist.all_reduce(stride, op=dist.ReduceOp.MAX)
        strides.append(features.stride())
        if int(stride) == features.stride():
            return None
        return (_pad_bags(features, int(stride)),) + tuple(args[1:])

    def cut(module: nn.Module, args: Any, output: Any) -> Any:
        if not getattr(module, BAG_HOOKS_ON):
            return None
        stride = strides.pop()
        pooled = output.wait() if isinstance(output, LazyAwaitable) else output
        if pooled.values().shape[0] == stride:
            return pooled
        return KeyedTensor(keys=pooled.keys(), length_per_key=pooled.length_per_key(),
                           values=pooled.values()[:stride])

    ebc.register_forward_pre_hook(pad)
    ebc.register_forward_hook(cut)


def distribute(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> DistributedModelParallel:
    """Attaches the fused table optimizer, plans the sharding and wraps ``model`` in DMP.

    Tables are then re-drawn from ``cfg.seed`` (:func:`init_tables`) and, on more than one
    rank, every lookup pads to equal bag counts (:func:`equalize_bag_counts`).
    """
    check_world_size(model, cfg.sharding, ctx.world_size, cfg.batch_size)
    sharding = cfg.sharding
    if tables_in_dense_optimizer(cfg.embedding_optimizer, ctx.device):
        # No fused Adam on CPU: dense-kernel (data-parallel) tables, trained by the AdamW
        # (optimizers.build_optimizers gives them train.embedding_lr).
        if sharding not in ("auto", "data_parallel"):
            raise ConfigError(f"train.embedding_optimizer=adam on CPU trains the tables with a dense kernel "
                              f"(data-parallel); train.sharding={sharding} needs a fused kernel (use auto)")
        sharding = "data_parallel"
    else:
        apply_embedding_optimizer(model, cfg.embedding_optimizer, cfg.embedding_lr, ctx.device)
    plan = sharding_plan(model, sharding, ctx)
    ebc_paths = [name for name, m in model.named_modules() if m in table_modules(model)]
    env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=env, device=ctx.device, plan=plan)
    init_tables(dmp, cfg.seed)
    if ctx.world_size > 1:
        sharded = dict(model.named_modules())  # DMP swapped the EBCs for sharded ones in place
        for path in ebc_paths:
            equalize_bag_counts(sharded[path])
    return dmp


def build_sharded_model(cfg: Config, data: SequenceData, ctx: DistContext) -> DistributedModelParallel:
    """The model of ``cfg`` wrapped in DistributedModelParallel (sharded tables, fused table optimizer)."""
    return distribute(build_model(cfg, data, table_device="meta"), cfg.train, ctx).to(ctx.device)


def gather_device(ctx: DistContext) -> torch.device:
    """Where :func:`gather_state_dict` allocates the full tensors: the collective device of the
    group (the rank's GPU under nccl, which cannot gather into a CPU tensor; the CPU under gloo)."""
    return collective_device(ctx)


def gather_state_dict(state: Any, ctx: Optional[DistContext] = None) -> Any:
    """Replaces every ``ShardedTensor`` in a (nested) state dict by the full tensor.

    Collective: every rank must call it; rank 0 gets the full tensors, other ranks ``None``
    in their place. The full tensors are allocated on :func:`gather_device` of ``ctx``
    (default: the device of the local shards, the CPU when a rank holds none).
    """
    if isinstance(state, ShardedTensor):
        rank = torch.distributed.get_rank()
        if ctx is not None:
            device = gather_device(ctx)
        else:
            shards = state.local_shards()
            device = shards[0].tensor.device if shards else torch.device("cpu")
        out = torch.empty(state.size(), dtype=state.dtype, device=device) if rank == 0 else None
        state.gather(dst=0, out=out)
        return out
    if isinstance(state, dict):
        return {k: gather_state_dict(v, ctx) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_state_dict(v, ctx) for v in state)
    return state
