"""The settings an SDXL run refuses: the flow-matching settings of flow-matching families (SDXL
trains with the DDPM objective), and render settings its pipeline cannot take. One line per
setting, naming the key, its value, why and what is allowed (`Family.unsupported_settings`)."""

from __future__ import annotations

from tuneline.models.base import RenderChoices
from tuneline.models.rules import changed_settings, render_problems, shown
from tuneline.models.sdxl import FAMILY
from tuneline.train.config import TrainConfig


def unsupported_settings(train: TrainConfig, render: RenderChoices | None = None) -> list[str]:
    """One line per setting of `train` (and `render`, when given) that SDXL refuses."""
    default = TrainConfig()
    problems = [
        f"{key}: {shown(value)}: train.flow_matching applies to flow-matching families (zimage) only; SDXL trains with "
        f"the DDPM objective (see train.prediction_type and train.loss); allowed: {shown(usual)} (the default)"
        for key, value, usual in changed_settings(train.flow_matching, default.flow_matching, "train.flow_matching")]
    return problems + render_problems(FAMILY.title, FAMILY.render, render)
