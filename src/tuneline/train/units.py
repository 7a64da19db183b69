"""Optimization units as an adapter declares them (the trainer builds each one's optimizer and schedule).

Optimization is a list of units (one optimizer + LR schedule over some parameter groups, see
trainer.OptimizationUnit). A diffusion family trains one unit, "model", built from the train
section by `model_unit`; the autoencoder declares two (the VAE and its discriminator). A unit's
name keys its optimizer state in checkpoints: renaming one breaks resuming older runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from tuneline.train.config import OptimizerConfig, ScheduleConfig, TrainConfig

MODEL_UNIT = "model"  # the one unit of a diffusion family (its checkpoints' key: keep it)


class ParamGroup(TypedDict):
    """One optimizer parameter group (torch's own dict form; `name` labels its learning rate in logs)."""

    name: str
    params: list[Any]
    lr: float


@dataclass(frozen=True)
class UnitSpec:
    """One optimization unit as the adapter declares it; the trainer builds its optimizer and schedule.

    It steps at optimizer step s (1-based) when s > start_step and s % every == 0, on its own loss
    (`TrainerAdapter.unit_losses` returns one per unit name), clipped to max_grad_norm."""

    name: str
    groups: list[ParamGroup]
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    max_grad_norm: float | None = None
    every: int = 1
    start_step: int = 0

    @property
    def parameters(self) -> list[Any]:
        return [p for group in self.groups for p in group["params"]]


def model_unit(groups: list[ParamGroup], config: TrainConfig) -> UnitSpec:
    """The single unit of a diffusion family: its parameter groups under train's optimizer, schedule and clipping."""
    return UnitSpec(MODEL_UNIT, groups, config.optimizer, config.schedule, config.max_grad_norm)
