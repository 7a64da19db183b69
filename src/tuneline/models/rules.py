"""What the families' rules share: which settings are away from their defaults, and the render
settings every family checks the same way (its samplers, its image side multiple).

A family's rules (`tuneline.models.<family>.rules:unsupported_settings`) return one line per
refused setting: the key, its value, why, and what is allowed. `tuneline check` and every stage
run them before any compute (tuneline.preflight); the adapter runs them again when it is built.
Plain pydantic data in, strings out: no torch, no tuneline.config.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from tuneline.models.base import RenderChoices, RenderFacts


def shown(value: Any) -> str:
    """A setting's value as params.yaml writes it: null, true, 5.0, 'lora'."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def changed_settings(section: BaseModel, default: BaseModel, prefix: str,
                     keys: Iterable[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, default value) of every field of `section` (or of `keys`) away from `default`."""
    found = []
    for key in keys if keys is not None else type(section).model_fields:
        value, usual = getattr(section, key), getattr(default, key)
        if value != usual:
            found.append((f"{prefix}.{key}", value, usual))
    return found


def render_problems(title: str, facts: RenderFacts, render: RenderChoices | None) -> list[str]:
    """render.sampler outside the family's samplers, Karras sigmas where the family has none, and
    image sides off its multiple (the render stage refuses the same from the same facts)."""
    if render is None:
        return []
    problems = []
    if render.sampler not in facts.samplers:
        note = f" ({facts.sampler_note})" if facts.sampler_note else ""
        problems.append(f"render.sampler: {shown(render.sampler)} is not a {title} sampler{note}; allowed: "
                        f"{', '.join(facts.samplers)}")
    if render.karras and facts.karras_refusal:
        problems.append(f"render.karras: true: {facts.karras_refusal}; allowed: false")
    for key in ("width", "height"):
        side = getattr(render, key)
        if side % facts.size_multiple:
            problems.append(f"render.{key}: {side}: {title} needs image sides in multiples of "
                            f"{facts.size_multiple}; allowed: a multiple of {facts.size_multiple} such as "
                            f"{max(1, round(side / facts.size_multiple)) * facts.size_multiple}")
    return problems
