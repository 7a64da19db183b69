"""Sampler names -> diffusers schedulers, built from the pipeline's own scheduler config, and which
of them a model family takes.

The table is plain data so config validation stays torch-free; diffusers is imported only when a
scheduler is built. A family's render facts (tuneline.models.family) name the samplers it takes; a
family with one sampler of its own (RenderFacts.scheduler) rebuilds that scheduler from the base's
config whatever name selects it, and may refuse Karras sigmas (RenderFacts.karras_refusal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tuneline.models.base import Family

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


def check_family_sampler(family: Family, sampler: str, karras: bool) -> None:
    """ValueError when `family` takes no sampler `sampler`, or no Karras sigmas."""
    facts = family.render
    if sampler not in facts.samplers:
        why = f" ({facts.sampler_note})" if facts.sampler_note else ""
        raise ValueError(f"sampler {sampler!r} is not available for {family.name}{why}; valid: "
                         f"{', '.join(facts.samplers)}")
    if karras and facts.karras_refusal:
        raise ValueError(f"karras: {facts.karras_refusal} (set karras: false)")


def build_scheduler(name: str, base_config: Any, karras: bool = False, family: Family | None = None) -> Any:
    """A new scheduler of sampler `name` from `base_config` (a pipeline's scheduler.config).

    Every option this table controls is passed explicitly, so a config that came from a
    previous sampler (say one with Karras sigmas on) never leaks into the next. `family` (None:
    any name of the table) limits the names; a family with a scheduler of its own gets that one.
    """
    import diffusers

    from tuneline.core.params import ParamsError

    try:
        if family is not None:
            check_family_sampler(family, name, karras)
        check_karras(name, karras)
    except ValueError as error:
        raise ParamsError(str(error)) from None
    if family is not None and family.render.scheduler:
        return getattr(diffusers, family.render.scheduler).from_config(base_config)
    spec = SAMPLERS[name]
    options = dict(spec.options)
    if spec.karras:
        options["use_karras_sigmas"] = karras
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(base_config, **options)
