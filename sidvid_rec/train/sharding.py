"""DistributedModelParallel: TorchRec tables sharded by the planner, the dense part data-parallel.

Every training process, a lone one included, wraps its model in DMP so that the tables
always run fbgemm's table-batched kernels with the fused in-backward optimizer. The
planner chooses the sharding (``train.sharding=auto``) or is constrained to one type.
torchrec 1.8 offers row-wise EBC sharding on CUDA only through the planner, so on CPU a
forced ``row_wise`` is built with ``construct_module_sharding_plan`` (PLATFORM.md).

State dicts of a DMP model hold ``ShardedTensor`` s; :func:`gather_state_dict` turns them
into full tensors on rank 0, which is what checkpoints and exports store, so they load
onto any number of ranks.
"""

from typing import Any, Dict, List

import torch
from torch import nn

from sidvid_rec.config import TrainConfig
from sidvid_rec.errors import ConfigError
from sidvid_rec.stack import require_fbgemm
from sidvid_rec.train.distributed import DistContext
from sidvid_rec.train.optimizers import apply_embedding_optimizer, dense_optimizer, table_modules

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
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType  # noqa: E402

_SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}


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


class TrainingOptimizers:
    """AdamW over the dense parameters plus the fused table optimizer that DMP built."""

    def __init__(self, dense: torch.optim.Optimizer, fused: Any) -> None:
        self.dense = dense
        self.fused = fused

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


def distribute(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> DistributedModelParallel:
    """Attaches the fused table optimizer, plans the sharding and wraps ``model`` in DMP."""
    apply_embedding_optimizer(model, cfg.embedding_optimizer, cfg.embedding_lr, ctx.device)
    plan = sharding_plan(model, cfg.sharding, ctx)
    env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
    return DistributedModelParallel(model, env=env, device=ctx.device, plan=plan)


def build_optimizers(model: DistributedModelParallel, cfg: TrainConfig, ctx: DistContext) -> TrainingOptimizers:
    dense = dense_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return TrainingOptimizers(dense, model.fused_optimizer)


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
