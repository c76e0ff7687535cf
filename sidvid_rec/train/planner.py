"""Sharding plans for the TorchRec tables: the planner's choice, or one forced sharding type.

torchrec 1.8 offers row-wise EBC sharding on CUDA only through the planner, so on CPU a
forced ``row_wise`` (and ``table_wise`` / ``column_wise``) is built with
``construct_module_sharding_plan`` (PLATFORM.md). A world size the forced sharding cannot
split the tables over is a one-line :class:`~sidvid_rec.errors.ConfigError`
(:func:`check_world_size`), not a traceback from inside torchrec.
"""

from typing import Dict, List

import torch
from torch import nn

from sidvid_rec.errors import ConfigError
from sidvid_rec.process_group import DistContext
from sidvid_rec.stack import require_fbgemm
from sidvid_rec.train.optimizers import table_modules
from sidvid_rec.types import Sharding

require_fbgemm()

from torchrec.distributed.embedding_types import EmbeddingComputeKernel  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology  # noqa: E402
from torchrec.distributed.sharding_plan import (  # noqa: E402
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan, ShardingType  # noqa: E402

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


def sharding_plan(model: nn.Module, sharding: Sharding, ctx: DistContext) -> ShardingPlan:
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


def check_world_size(model: nn.Module, sharding: Sharding, world_size: int, batch_size: int) -> None:
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
