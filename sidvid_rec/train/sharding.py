"""DistributedModelParallel: TorchRec tables sharded by the planner, the dense part data-parallel.

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
* **Plan checks**: a world size the forced sharding cannot split the tables over is a
  one-line :class:`~sidvid_rec.errors.ConfigError` (:func:`check_world_size`), not a
  traceback from inside torchrec.

State dicts of a DMP model hold ``ShardedTensor`` s. Checkpoints save them as they are with
``torch.distributed.checkpoint`` (each rank writes its shards; loading reshards onto any
number of ranks); :func:`gather_state_dict` still turns them into full tensors on rank 0.
"""

import re
import zlib
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from sidvid_rec.config import TrainConfig
from sidvid_rec.errors import ConfigError
from sidvid_rec.modules.embeddings import INIT_STD  # rows start as N(0, 0.02) truncated at 2 std
from sidvid_rec.stack import require_fbgemm
from sidvid_rec.train.distributed import DistContext
from sidvid_rec.train.optimizers import apply_embedding_optimizer, dense_parameters, dense_optimizer, table_modules

require_fbgemm()

from torch.distributed._shard.sharded_tensor import ShardedTensor  # noqa: E402
from torchrec.distributed.embedding_types import EmbeddingComputeKernel  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology  # noqa: E402
from torchrec.distributed.sharding_plan import (  # noqa: E402
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import LazyAwaitable, ShardingEnv, ShardingPlan, ShardingType  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor  # noqa: E402

_SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}
INIT_CHUNK_ROWS = 65536
"""Rows drawn per seeded generator by :func:`init_tables` (a rank draws only its chunks)."""
_WRAPPER_PREFIX = re.compile(r"^(?:_dmp_wrapped_module\.|module\.)+")


def _table_names(model: nn.Module) -> List[str]:
    return [cfg.name for ebc in table_modules(model) for cfg in ebc.embedding_bag_configs()]


def _ebc_path(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if module in table_modules(model):
            return name
    raise ValueError("the model has no EmbeddingBagCollection")


def sharding_plan(model: nn.Module, sharding: str, ctx: DistContext) -> ShardingPlan:
    """The plan for ``model``'s tables: the planner's choice, or one forced sharding type."""
    tables = _table_names(model)
    compute_device = ctx.device.type
    if sharding == "row_wise" and compute_device == "cpu":
        ebc = dict(model.named_modules())[_ebc_path(model)]
        per_table = {name: row_wise() for name in tables}
        return ShardingPlan({_ebc_path(model): construct_module_sharding_plan(
            ebc, per_param_sharding=per_table, world_size=ctx.world_size, device_type="cpu")})
    if sharding in ("table_wise", "column_wise") and compute_device == "cpu":
        ebc = dict(model.named_modules())[_ebc_path(model)]
        if sharding == "table_wise":
            per_table = {name: table_wise(rank=i % ctx.world_size) for i, name in enumerate(tables)}
        else:
            ranks = list(range(ctx.world_size))
            per_table = {name: column_wise(ranks=ranks) for name in tables}
        return ShardingPlan({_ebc_path(model): construct_module_sharding_plan(
            ebc, per_param_sharding=per_table, world_size=ctx.world_size, device_type="cpu")})
    # Pin the fused kernel: on tiny tables the planner would otherwise pick data-parallel with
    # the dense kernel, which silently drops the in-backward table optimizer.
    sharding_types = list(_SHARDING_TYPES.values())[:3] if sharding == "auto" else [_SHARDING_TYPES[sharding]]
    kernels = [EmbeddingComputeKernel.DENSE.value] if sharding == "data_parallel" else [EmbeddingComputeKernel.FUSED.value]
    constraints: Dict[str, ParameterConstraints] = {
        name: ParameterConstraints(sharding_types=sharding_types, compute_kernels=kernels) for name in tables
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=compute_device), constraints=constraints
    )
    try:
        return planner.collective_plan(model, pg=torch.distributed.GroupMember.WORLD)
    except Exception as e:  # noqa: BLE001  (planner errors are long; the user needs one line)
        raise ConfigError(
            f"train.sharding={sharding}: no sharding plan fits {ctx.world_size} rank(s) on {compute_device} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        )


def _table_shapes(model: nn.Module) -> Dict[str, List[int]]:
    """``{table name: [rows, width]}`` of every unsharded EBC table in ``model``."""
    return {c.name: [c.num_embeddings, c.embedding_dim] for ebc in table_modules(model) for c in ebc.embedding_bag_configs()}


def check_world_size(model: nn.Module, sharding: str, world_size: int, batch_size: int) -> None:
    """Raises a one-line ConfigError when ``world_size`` ranks cannot run this plan.

    Args:
        model: the unsharded model (its EBC table shapes decide).
        sharding: ``train.sharding``.
        world_size: ranks of the job.
        batch_size: global batch size (every rank needs at least one sequence).
    """
    if batch_size < world_size:
        raise ConfigError(f"train.batch_size={batch_size} is smaller than the world size {world_size}: "
                          "every rank needs at least one sequence per batch")
    for name, (rows, width) in _table_shapes(model).items():
        if sharding == "column_wise" and width % world_size:
            fits = [n for n in range(1, width + 1) if width % n == 0]
            raise ConfigError(f"train.sharding=column_wise splits table {name}'s {width} columns evenly: "
                              f"{world_size} ranks do not divide {width} (use {fits} ranks or another sharding)")
        if sharding == "row_wise" and rows < world_size:
            raise ConfigError(f"train.sharding=row_wise: table {name} has {rows} rows, fewer than the "
                              f"{world_size} ranks")


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


def equalize_bag_counts(ebc: nn.Module) -> None:
    """Makes every rank look up the same number of bags in the sharded ``ebc`` (hooks).

    A forward pre-hook pads the KJT with empty bags to the largest stride over ranks (one
    scalar all-reduce per lookup); a forward hook cuts the pooled ``KeyedTensor`` back to
    this rank's bags. Results are unchanged: empty bags pool to zeros and get no gradient.
    """
    strides: List[int] = []

    def pad(module: nn.Module, args: Any) -> Any:
        features = args[0]
        stride = torch.tensor([features.stride()], dtype=torch.int64, device=features.values().device)  # nccl: on GPU
        dist.all_reduce(stride, op=dist.ReduceOp.MAX)
        strides.append(features.stride())
        if int(stride) == features.stride():
            return None
        return (_pad_bags(features, int(stride)),) + tuple(args[1:])

    def cut(module: nn.Module, args: Any, output: Any) -> Any:
        stride = strides.pop()
        pooled = output.wait() if isinstance(output, LazyAwaitable) else output
        if pooled.values().shape[0] == stride:
            return pooled
        return KeyedTensor(keys=pooled.keys(), length_per_key=pooled.length_per_key(),
                           values=pooled.values()[:stride])

    ebc.register_forward_pre_hook(pad)
    ebc.register_forward_hook(cut)


def state_key(name: str) -> str:
    """A parameter name without DMP/DDP wrapper prefixes (the same on any world size)."""
    return _WRAPPER_PREFIX.sub("", name)


class TrainingOptimizers:
    """AdamW over the dense parameters plus the fused table optimizer that DMP built.

    Args:
        dense: the dense optimizer.
        fused: ``dmp.fused_optimizer`` (state as ``ShardedTensor`` s).
        dense_names: names of ``dense``'s parameters, in its order (checkpoint keys).
    """

    def __init__(self, dense: torch.optim.Optimizer, fused: Any, dense_names: Optional[List[str]] = None) -> None:
        self.dense = dense
        self.fused = fused
        params = dense.param_groups[0]["params"]
        self._names = [state_key(n) for n in dense_names] if dense_names else [str(i) for i in range(len(params))]

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)

    def step(self) -> None:
        # Table rows were already updated inside backward by the fused kernel.
        self.dense.step()

    def state_dict(self) -> Dict[str, Any]:
        return {"dense": self.dense.state_dict(), "fused": gather_state_dict(self.fused.state_dict())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        load_full_state_dict(self.fused, state["fused"])

    # -- torch.distributed.checkpoint: tensors keyed by name, sharded state left sharded

    def _dense_params(self) -> List[torch.Tensor]:
        return [p for group in self.dense.param_groups for p in group["params"]]

    def checkpoint_state(self) -> Dict[str, Any]:
        """``{"dense": {param name: {step, exp_avg, exp_avg_sq}}, "fused": sharded state}``.

        Every parameter has an entry (zeros before the first step), so the dict has the same
        keys whatever the step, and loading works in place.
        """
        dense: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, param in zip(self._names, self._dense_params()):
            entry = self.dense.state.get(param, {})
            dense[name] = {
                "step": torch.as_tensor(entry.get("step", 0.0), dtype=torch.float32).clone().reshape(()),
                "exp_avg": entry["exp_avg"] if "exp_avg" in entry else torch.zeros_like(param),
                "exp_avg_sq": entry["exp_avg_sq"] if "exp_avg_sq" in entry else torch.zeros_like(param),
            }
        return {"dense": dense, "fused": self.fused.state_dict()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` (after ``torch.distributed.checkpoint.load`` filled it)."""
        for name, param in zip(self._names, self._dense_params()):
            entry = state["dense"][name]
            if float(entry["step"]) > 0:
                self.dense.state[param] = {"step": entry["step"].clone(), "exp_avg": entry["exp_avg"].clone(),
                                           "exp_avg_sq": entry["exp_avg_sq"].clone()}
        self.fused.load_state_dict(state["fused"])


def distribute(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> DistributedModelParallel:
    """Attaches the fused table optimizer, plans the sharding and wraps ``model`` in DMP.

    Tables are then re-drawn from ``cfg.seed`` (:func:`init_tables`) and, on more than one
    rank, every lookup pads to equal bag counts (:func:`equalize_bag_counts`).
    """
    check_world_size(model, cfg.sharding, ctx.world_size, cfg.batch_size)
    apply_embedding_optimizer(model, cfg.embedding_optimizer, cfg.embedding_lr, ctx.device)
    plan = sharding_plan(model, cfg.sharding, ctx)
    ebc_paths = [name for name, m in model.named_modules() if m in table_modules(model)]
    env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=env, device=ctx.device, plan=plan)
    init_tables(dmp, cfg.seed)
    if ctx.world_size > 1:
        sharded = dict(model.named_modules())  # DMP swapped the EBCs for sharded ones in place
        for path in ebc_paths:
            equalize_bag_counts(sharded[path])
    return dmp


def build_optimizers(model: DistributedModelParallel, cfg: TrainConfig, ctx: DistContext) -> TrainingOptimizers:
    names = [name for name, _ in dense_parameters(model)]
    dense = dense_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return TrainingOptimizers(dense, model.fused_optimizer, names)


def gather_state_dict(state: Any) -> Any:
    """Replaces every ``ShardedTensor`` in a (nested) state dict by the full tensor.

    Collective: every rank must call it; rank 0 gets the full tensors, other ranks ``None``
    in their place.
    """
    if isinstance(state, ShardedTensor):
        rank = torch.distributed.get_rank()
        out = torch.empty(state.size(), dtype=state.dtype) if rank == 0 else None
        state.gather(dst=0, out=out)
        return out
    if isinstance(state, dict):
        return {k: gather_state_dict(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_state_dict(v) for v in state)
    return state


def _fill_shards(current: Any, full: Any) -> Any:
    """Copies slices of the full tensors in ``full`` into the local shards of ``current``."""
    if isinstance(current, ShardedTensor):
        for shard in current.local_shards():
            index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.copy_(full[index])
        return current
    if isinstance(current, dict):
        return {k: _fill_shards(v, full[k]) for k, v in current.items()}
    if isinstance(current, (list, tuple)):
        return type(current)(_fill_shards(c, f) for c, f in zip(current, full))
    return full


def load_full_state_dict(module: Any, state: Dict[str, Any]) -> None:
    """Loads full (gathered) tensors into a possibly sharded module or fused optimizer.

    Each rank keeps the slices its shards own, so a checkpoint written by any number of
    ranks loads onto any other number.
    """
    module.load_state_dict(_fill_shards(module.state_dict(), state))
