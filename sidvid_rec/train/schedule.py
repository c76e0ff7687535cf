"""Learning-rate schedule: linear warm-up, then constant or cosine decay (``train.*`` keys).

The lr of optimizer step ``s`` (0-based) is ``base * lr_factor(s)``, a pure function of the
step and of the run's *plan* (its planned number of steps, fixed when the run starts). The
trainer applies it before every step to both optimizers:

* the dense AdamW: each param group's ``lr``;
* the fused table optimizer: torchrec's ``dmp.fused_optimizer`` exposes ``param_groups``
  (one per fbgemm table group); fbgemm's kernel reads ``param_groups[0]["lr"]`` only when the
  fused optimizer's ``zero_grad``/``step`` runs (``EmbeddingFusedOptimizer.set_learning_rate``),
  so :meth:`LrSchedule.apply` calls ``zero_grad`` after setting it (it touches nothing else:
  the fused update happens inside backward).

Resuming: the plan is saved in the checkpoint record (:meth:`LrSchedule.state`) and the step
in the train state, so a resumed run uses the same lr at every step as the uninterrupted run.

Example::

    schedule = build_schedule(optimizers, cfg.train, batches_per_epoch=len(batches))
    schedule.apply(step)   # before zero_grad / forward / backward / step
"""

import math
from typing import Any, Dict, List, Optional, Tuple

from sidvid_rec.config import TrainConfig
from sidvid_rec.types import LrSchedule


def lr_factor(step: int, planned_steps: int, warmup_steps: int = 0, schedule: LrSchedule = "constant",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at 0-based optimizer ``step``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then
    ``constant``: 1; ``cosine``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``r = min_lr_ratio``
    and ``p`` the share of the post-warm-up steps done (0 at the first, 1 at ``planned_steps - 1``
    and after).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(planned_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Steps the schedule spans: ``(schedule_epochs or epochs) * batches_per_epoch``, at most ``max_steps``."""
    steps = (cfg.schedule_epochs or cfg.epochs) * batches_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class LrSchedule:
    """Sets the lr of the dense optimizer and of the fused table optimizer before each step.

    Args:
        dense: a torch optimizer (its groups' current lr are the base lr).
        fused: torchrec's fused table optimizer, or None; its ``param_groups`` lr are scaled too.
        cfg: the ``train`` section (warm-up, schedule, min ratio).
        planned: the plan's number of steps (:func:`planned_steps`).
    """

    def __init__(self, dense: Any, fused: Optional[Any], cfg: TrainConfig, planned: int) -> None:
        self._cfg = cfg
        self.planned_steps = planned
        self._groups: List[Tuple[Dict[str, Any], float]] = [(g, float(g["lr"])) for g in dense.param_groups]
        self._fused = fused if fused is not None and _has_lr(fused) else None
        if self._fused is not None:
            self._groups += [(g, float(g["lr"])) for g in self._fused.param_groups]

    @property
    def scales_tables(self) -> bool:
        """Whether the fused table optimizer's lr follows the schedule (it exposes param groups)."""
        return self._fused is not None

    def factor(self, step: int) -> float:
        c = self._cfg
        return lr_factor(step, self.planned_steps, c.warmup_steps, c.lr_schedule, c.min_lr_ratio)

    def apply(self, step: int) -> float:
        """Sets every group's lr for optimizer step ``step``; returns the factor."""
        factor = self.factor(step)
        for group, base in self._groups:
            group["lr"] = base * factor
        if self._fused is not None:
            self._fused.zero_grad()  # pushes param_groups[0]["lr"] into the fbgemm kernels
        return factor

    def state(self) -> Dict[str, int]:
        """What a checkpoint keeps of the schedule (the plan; the step is in the train state)."""
        return {"planned_steps": self.planned_steps}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state` (a record without one keeps the current plan)."""
        if "planned_steps" in state:
            self.planned_steps = int(state["planned_steps"])


def _has_lr(optimizer: Any) -> bool:
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and all("lr" in g for g in groups)


def is_scheduled(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks for anything but a constant lr (the default: no schedule object at all)."""
    return cfg.warmup_steps > 0 or cfg.lr_schedule != "constant"


def build_schedule(optimizers: Any, cfg: TrainConfig, batches_per_epoch: int) -> Optional[LrSchedule]:
    """The schedule of ``cfg`` over ``optimizers`` (``.dense``, ``.fused``); None when the lr is constant."""
    if not is_scheduled(cfg):
        return None
    return LrSchedule(optimizers.dense, getattr(optimizers, "fused", None), cfg,
                      planned_steps(cfg, batches_per_epoch))
