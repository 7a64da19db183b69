"""Sampler names -> diffusers schedulers, built from the pipeline's own scheduler config.

The table is plain data so config validation stays torch-free; diffusers is imported
only when a scheduler is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SamplerName = Literal["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lms"]


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    karras: bool  # whether the scheduler takes use_karras_sigmas
    options: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("EulerDiscreteScheduler", True),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", False),
    "heun": SamplerSpec("HeunDiscreteScheduler", True),
    "dpmpp_2m": SamplerSpec("DPMSolverMultistepScheduler", True, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": SamplerSpec("DPMSolverMultistepScheduler", True,
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "ddim": SamplerSpec("DDIMScheduler", False),
    "lms": SamplerSpec("LMSDiscreteScheduler", True),
}
SAMPLER_NAMES = tuple(SAMPLERS)
KARRAS_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if spec.karras)


def check_karras(sampler: str, karras: bool) -> None:
    """ValueError when `sampler` is unknown, or karras is asked of a sampler without Karras sigmas."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
    if karras and not SAMPLERS[sampler].karras:
        raise ValueError(f"sampler {sampler!r} has no Karras sigmas; karras works with: {', '.join(KARRAS_SAMPLERS)}")


def build_scheduler(name: str, base_config: Any, karras: bool = False) -> Any:
    """A new scheduler of sampler `name` from `base_config` (a pipeline's scheduler.config).

    Every option this table controls is passed explicitly, so a config that came from a
    previous sampler (say one with Karras sigmas on) never leaks into the next.
    """
    import diffusers

    from tuneline.core.params import ParamsError

    try:
        check_karras(name, karras)
    except ValueError as error:
        raise ParamsError(str(error)) from None
    spec = SAMPLERS[name]
    options = dict(spec.options)
    if spec.karras:
        options["use_karras_sigmas"] = karras
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(base_config, **options)
