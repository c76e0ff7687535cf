"""Optimizers: a fused in-backward optimizer for the TorchRec tables, AdamW for the rest.

Two parameter groups, two optimizers (like torchrec's DLRM and the reference HSTU):

* **Tables** (every ``EmbeddingBagCollection`` weight): an optimizer attached *in
  backward* with torchrec's ``apply_optimizer_in_backward`` before the model is wrapped by
  ``DistributedModelParallel``. DMP reads the attached class and kwargs and builds
  fbgemm's fused table-batched kernel, which updates only the looked-up rows during
  backward (no gradient tensor for the table ever exists); ``dmp.fused_optimizer`` then
  holds its state (``ShardedTensor`` momentum) for checkpoints. fbgemm's CPU kernels
  support EXACT_ROWWISE_ADAGRAD, EXACT_ADAGRAD and EXACT_SGD only; Adam needs CUDA.
* **Dense** parameters (HSTU, fusion, position embeddings ...): ``torch.optim.AdamW``.

Where each path runs (measured with torch 2.13 / torchrec 1.8 / fbgemm-gpu-cpu 1.8, CPU):

* DMP, one or more ranks on gloo (the trainer's path, also for a single process with a
  world-size-1 group): fused fbgemm update; after 3 steps the weights and the row-wise
  momentum equal the unsharded path below to 6e-8.
* An *unsharded* EBC (tests, tools that skip DMP): the same call registers a hook on the
  weight's gradient accumulator that runs the torch optimizer class (``RowWiseAdagrad``,
  ``Adagrad``, ``SGD``, ``Adam``) right after the weight's gradient is accumulated, and
  then drops the gradient. It does update the looked-up rows, but through a dense
  ``[rows, D]`` gradient (cost grows with the table), and its state lives in
  ``weight._in_backward_optimizers[0]``, not in a ``fused_optimizer``. Row-wise Adagrad,
  Adagrad and SGD give the same update as the fused kernel (rows without gradient are
  untouched); dense Adam does not (it keeps moving rows with stale momentum, fbgemm's
  sparse Adam does not).

Example::

    spec = apply_embedding_optimizer(model, "auto", lr=0.05, device=torch.device("cpu"))
    dmp = DistributedModelParallel(model, device=device, plan=plan)
    dense = dense_optimizer(dmp, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
"""

import re
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type, Union, get_args

import torch
from torch import nn

from sidvid_rec.config import TrainConfig
from sidvid_rec.errors import ConfigError
from sidvid_rec.stack import require_fbgemm
from sidvid_rec.types import EmbeddingOptimizer

require_fbgemm()

from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.optim import apply_optimizer_in_backward  # noqa: E402
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad  # noqa: E402

CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""Table optimizers fbgemm's CPU kernels support."""
EMBEDDING_EPS = 1e-8
"""Adagrad/Adam epsilon (fbgemm's default; torchrec's RowWiseAdagrad would use 1e-10)."""

_CLASSES: Dict[str, Type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,  # -> EXACT_ROWWISE_ADAGRAD
    "adagrad": torch.optim.Adagrad,  # -> EXACT_ADAGRAD
    "sgd": torch.optim.SGD,  # -> EXACT_SGD
    "adam": torch.optim.Adam,  # -> ADAM (CUDA only)
}


class EmbeddingOptimizerSpec(NamedTuple):
    name: str
    """The resolved optimizer (``auto`` replaced by the choice for the device)."""
    optimizer_class: Type[torch.optim.Optimizer]
    """Class torchrec maps to an fbgemm EmbOptimType (and runs as is on unsharded tables)."""
    kwargs: Dict[str, Any]
    """Constructor kwargs; only keys both torch and fbgemm accept (``lr``, ``eps``)."""


AUTO_EMBEDDING_OPTIMIZER = "rowwise_adagrad"
"""What ``train.embedding_optimizer=auto`` means, on every device: fbgemm runs row-wise Adagrad
on CPU and CUDA alike, and ``train.embedding_lr`` (default 0.05) is an Adagrad learning rate. An
``auto`` that became Adam on CUDA would run Adam at that rate (50x the usual 1e-3) and train a
different model on a GPU than on a CPU; Adam stays available as an explicit choice on CUDA."""


def resolve_embedding_optimizer(name: EmbeddingOptimizer, device: Union[str, torch.device]) -> str:
    """``auto`` -> ``rowwise_adagrad`` on every device; ``adam`` on CPU -> ConfigError."""
    if name not in get_args(EmbeddingOptimizer):
        raise ConfigError(
            f"train.embedding_optimizer: {name!r} is not one of {', '.join(get_args(EmbeddingOptimizer))}"
        )
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return AUTO_EMBEDDING_OPTIMIZER
    if not on_cuda and name not in CPU_EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"train.embedding_optimizer={name} needs CUDA: fbgemm's CPU kernels support only "
            f"{', '.join(CPU_EMBEDDING_OPTIMIZERS)} (or use auto)"
        )
    return name


def embedding_optimizer_kwargs(
    name: EmbeddingOptimizer, lr: float, device: Union[str, torch.device]
) -> EmbeddingOptimizerSpec:
    """Optimizer class and kwargs for ``apply_optimizer_in_backward`` on the tables.

    Args:
        name: ``auto``, ``rowwise_adagrad``, ``adagrad``, ``sgd`` or ``adam``.
        lr: table learning rate (Adagrad-family wants a larger one than AdamW, e.g. 0.05).
        device: the training device; ``adam`` is rejected on CPU (``auto`` is the same everywhere).
    """
    if lr <= 0:
        raise ConfigError(f"train.embedding_lr must be positive, got {lr}")
    resolved = resolve_embedding_optimizer(name, device)
    kwargs: Dict[str, Any] = {"lr": lr}
    if resolved != "sgd":
        kwargs["eps"] = EMBEDDING_EPS
    return EmbeddingOptimizerSpec(resolved, _CLASSES[resolved], kwargs)


def table_modules(model: nn.Module) -> List[nn.Module]:
    """Every unsharded ``EmbeddingBagCollection`` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def apply_embedding_optimizer(
    model: nn.Module, name: EmbeddingOptimizer, lr: float, device: Union[str, torch.device]
) -> EmbeddingOptimizerSpec:
    """Attaches the in-backward table optimizer to every EBC of ``model`` (call before DMP).

    Raises:
        ValueError: ``model`` has no EBC, or an optimizer is already attached (DMP accepts one).
    """
    spec = embedding_optimizer_kwargs(name, lr, device)
    tables = table_modules(model)
    if not tables:
        raise ValueError("apply_embedding_optimizer: the model has no EmbeddingBagCollection")
    for ebc in tables:
        params = list(ebc.parameters())
        if any(hasattr(p, "_in_backward_optimizers") for p in params):
            raise ValueError("apply_embedding_optimizer: an in-backward optimizer is already attached")
        with warnings.catch_warnings():  # torchrec's wrapper warns that it forwards to torch's
            warnings.simplefilter("ignore", DeprecationWarning)
            # A fresh dict per EBC: torchrec's sharder writes the fbgemm type into it.
            apply_optimizer_in_backward(spec.optimizer_class, params, dict(spec.kwargs))
    return spec


def _is_table_parameter(param: nn.Parameter, table_ids: set) -> bool:
    return hasattr(param, "_in_backward_optimizers") or id(param) in table_ids


def dense_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter that is not a table weight.

    Table weights are those with an in-backward optimizer (sharded or not, torchrec's own
    criterion) and any weight of an unsharded EBC (also without one attached).
    """
    table_ids = {id(p) for ebc in table_modules(model) for p in ebc.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and not _is_table_parameter(param, table_ids):
            yield name, param


def dense_optimizer(
    model: nn.Module, lr: float, betas: Tuple[float, float] = (0.9, 0.98), weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW over :func:`dense_parameters` (the reference HSTU: lr 1e-3, betas (0.9, 0.98), wd 0)."""
    params = [p for _, p in dense_parameters(model)]
    if not params:
        raise ValueError("dense_optimizer: the model has no dense parameters")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


_WRAPPER_PREFIX = re.compile(r"^(?:_dmp_wrapped_module\.|module\.)+")


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


def tables_in_dense_optimizer(name: EmbeddingOptimizer, device: Union[str, torch.device]) -> bool:
    """Whether the tables are trained by the dense AdamW instead of a fused kernel: ``adam`` on
    CPU, where fbgemm has no Adam kernel. The tables then take the dense (data-parallel) kernel,
    with an ordinary gradient (PLATFORM.md: "EBC, dense kernel ... ordinary optimizer"), and the
    AdamW updates every row each step, as the reference HSTU's dense Adam does."""
    return name == "adam" and torch.device(device).type != "cuda"


def _dense_kernel_table_names(model: nn.Module) -> List[str]:
    """Names (in :func:`dense_parameters` order) of the table weights a dense kernel exposes as
    ordinary parameters (DMP's data-parallel EBC sharding)."""
    return [name for name, _ in dense_parameters(model) if ".embedding_bags." in state_key(name)]


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> TrainingOptimizers:
    """AdamW over the dense parameters of a DMP model plus the fused table optimizer DMP built.

    With ``train.embedding_optimizer=adam`` and dense-kernel tables (:func:`tables_in_dense_optimizer`)
    the table weights form a second AdamW group at ``train.embedding_lr`` (same betas and decay).
    """
    names = [name for name, _ in dense_parameters(model)]
    tables = set(_dense_kernel_table_names(model)) if cfg.embedding_optimizer == "adam" else set()
    if not tables:
        dense = dense_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return TrainingOptimizers(dense, model.fused_optimizer, names)
    params = dict(dense_parameters(model))
    order = [n for n in names if n not in tables] + [n for n in names if n in tables]
    groups = [{"params": [params[n] for n in order if n not in tables], "lr": cfg.lr},
              {"params": [params[n] for n in order if n in tables], "lr": cfg.embedding_lr}]
    dense = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return TrainingOptimizers(dense, model.fused_optimizer, order)
