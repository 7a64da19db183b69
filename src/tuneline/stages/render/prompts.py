"""The prompts file of stage render: a YAML or JSON list of prompts, or {defaults: {...}, prompts: [...]}.

    defaults: {steps: 25, sampler: dpmpp_2m, karras: true, size: 1024x1024}
    prompts:
      - shp, a red circle
      - prompt: strp, a striped cup
        negative_prompt: blurry
        seed: 7
        size: 1216x832        # or height: 832, width: 1216
        guidance_scale: 5.0

A bad file is a ParamsError naming the file, the entry and the key, with the allowed values.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from tuneline.core.params import ParamsError, Section, parse_resolution
from tuneline.stages.render.samplers import SamplerName, check_karras

if TYPE_CHECKING:
    from tuneline.models.base import Family, Variant

log = logging.getLogger(__name__)


def _size(value: Any) -> Any:
    if value is None:
        return None
    width, height = parse_resolution(value)
    for side in (width, height):
        if side < 8 or side % 8:
            raise ValueError(f"size {width}x{height}: both sides must be multiples of 8 (at least 8)")
    return (width, height)


class PromptOptions(Section):
    """What a prompt may set; unset values come from the file's defaults, then from the render section."""

    negative_prompt: Optional[str] = Field(None, description="What the image should not show.")
    seed: Optional[int] = Field(None, description="Seed of this prompt's noise (the same for base and trained).")
    size: Optional[tuple[int, int]] = Field(None, description="'WIDTHxHEIGHT' such as '1024x640'.")
    height: Optional[int] = Field(None, ge=8, multiple_of=8, description="Image height in pixels.")
    width: Optional[int] = Field(None, ge=8, multiple_of=8, description="Image width in pixels.")
    steps: Optional[int] = Field(None, ge=1, description="Inference steps.")
    guidance_scale: Optional[float] = Field(None, ge=0, description="Classifier-free guidance scale.")
    sampler: Optional[SamplerName] = Field(None, description="Sampler name.")
    karras: Optional[bool] = Field(None, description="Karras sigmas (samplers that support them).")

    _parse_size = field_validator("size", mode="before")(_size)

    @model_validator(mode="after")
    def _one_size(self) -> "PromptOptions":
        if self.size is not None and (self.height is not None or self.width is not None):
            raise ValueError("set either size or height/width, not both")
        return self


class PromptEntry(PromptOptions):
    """One prompt of the file."""

    prompt: str = Field(min_length=1, description="The prompt.")


class PromptFile(Section):
    """The {defaults, prompts} form of the file."""

    defaults: PromptOptions = Field(default_factory=PromptOptions, description="Values every prompt inherits.")
    prompts: list[PromptEntry] = Field(min_length=1, description="The prompts.")


@dataclass(frozen=True)
class RenderPrompt:
    """A prompt with every value resolved."""

    index: int
    prompt: str
    negative_prompt: Optional[str]
    seed: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    sampler: str
    karras: bool


def _problems(error: ValidationError) -> list[str]:
    """'prompts[2].sampler: ...' lines; an unknown key gets the closest valid one and the allowed list."""
    problems = []
    for item in error.errors():
        loc = [part for part in item["loc"] if not str(part).startswith("function-")]
        label = ""
        for part in loc:
            label += f"[{part}]" if isinstance(part, int) else (f".{part}" if label else str(part))
        if item["type"] == "extra_forbidden":
            key = str(loc[-1])
            owner = {"defaults": PromptOptions, "prompts": PromptEntry}.get(str(loc[0]) if len(loc) > 1 else "",
                                                                           PromptFile)
            allowed = list(owner.model_fields)
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{label}: unknown key.{hint} Allowed: {', '.join(allowed)}.")
        else:
            got = f" (got {item['input']!r})" if item["type"] != "missing" else ""
            msg = item["msg"].removeprefix("Value error, ")
            problems.append(f"{label or '(top level)'}: {msg}{got}")
    return problems


def validate_prompts(data: Any, source: str = "prompts.yaml") -> PromptFile:
    """The file's data as a PromptFile; ParamsError naming the entry and key of every problem."""
    if isinstance(data, list):
        data = {"prompts": data}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a list of prompts or a mapping with 'prompts' (and 'defaults')")
    # A bare string is a prompt with nothing else set.
    entries = data.get("prompts")
    if isinstance(entries, list):
        data = {**data, "prompts": [{"prompt": e} if isinstance(e, str) else e for e in entries]}
    try:
        parsed = PromptFile.model_validate(data)
    except ValidationError as error:
        problems = _problems(error)
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems)) from None
    problems = []
    for index, entry in enumerate(parsed.prompts):
        sampler = entry.sampler or parsed.defaults.sampler
        karras = entry.karras if entry.karras is not None else parsed.defaults.karras
        if sampler is not None and karras:
            try:
                check_karras(sampler, karras)
            except ValueError as error:
                problems.append(f"prompts[{index}].karras: {error}")
    if problems:
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return parsed


def load_prompts(path: Path | str, config: Any, family: Family, variant: Variant | None = None) -> list[RenderPrompt]:
    """Read, validate and resolve the prompts file against `config` (the render section) for a
    model `family` (its default steps and guidance, its samplers and image sides) and its `variant`
    (whose default steps and guidance win over the family's; see tuneline.models.variant)."""
    return resolve_prompts(read_prompts_file(path), config, str(path), family, variant)


def read_prompts_file(path: Path | str) -> PromptFile:
    """Read and validate the prompts file (unresolved: what it says, whatever the render section)."""
    import json

    import yaml

    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: prompts file not found (render.prompts_file)") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ParamsError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    return validate_prompts(data, str(path))


def prompt_pairs(parsed: PromptFile) -> list[tuple[str, str]]:
    """(prompt, negative prompt) of every entry, as resolve_prompts resolves them (no render setting
    decides a text)."""
    return [(entry.prompt, _pick(entry.negative_prompt, parsed.defaults.negative_prompt, ""))
            for entry in parsed.prompts]


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def resolve_prompts(parsed: PromptFile, config: Any, source: str, family: Family,
                    variant: Variant | None = None) -> list[RenderPrompt]:
    """Every prompt with its values: its own, else the file's defaults, else the render section's,
    else (steps, guidance) the model variant's, else the family's. A value the family cannot render (a
    sampler it does not take, a side its pipeline cannot patch) is a ParamsError naming the prompt."""
    from tuneline.stages.render.samplers import check_family_sampler

    spec = family.render
    default_steps = _pick(variant.steps if variant else None, spec.steps)
    default_guidance = _pick(variant.guidance_scale if variant else None, spec.guidance_scale)
    defaults = parsed.defaults
    resolved = []
    for index, entry in enumerate(parsed.prompts):
        width, height = config.width, config.height
        for options in (defaults, entry):  # later wins
            if options.size is not None:
                width, height = options.size
            width, height = _pick(options.width, width), _pick(options.height, height)
        sampler = _pick(entry.sampler, defaults.sampler, config.sampler)
        karras = _pick(entry.karras, defaults.karras, config.karras)
        if len(spec.samplers) == 1 and (entry.sampler, entry.karras, defaults.sampler, defaults.karras) != (None,) * 4:
            # A prompts file shared with another family (the demo's names several samplers): this family has one
            # sampler, so the prompt's choice cannot apply; render.sampler/karras are still checked.
            chosen = (sampler, karras)
            sampler, karras = _pick(config.sampler, spec.samplers[0]), bool(config.karras)
            if chosen != (sampler, karras):
                log.warning("%s: prompts[%d]: sampler %s%s is not available for %s; rendering with its %s",
                            source, index, chosen[0], " with karras" if chosen[1] else "", family.name, sampler)
        if karras:
            try:
                check_karras(sampler, karras)
            except ValueError as error:
                raise ParamsError(f"{source}: prompts[{index}]: {error} (render.karras is on)") from None
        try:
            check_family_sampler(family, sampler, karras)
        except ValueError as error:
            raise ParamsError(f"{source}: prompts[{index}]: {error} (the prompt, the file's defaults or "
                              "render.sampler / render.karras set it)") from None
        if width % spec.size_multiple or height % spec.size_multiple:
            raise ParamsError(f"{source}: prompts[{index}]: size {width}x{height}: {family.name} needs both sides "
                              f"in multiples of {spec.size_multiple} (the prompt, the file's defaults or "
                              "render.width / render.height set it)")
        seed = entry.seed if entry.seed is not None else (
            defaults.seed + index if defaults.seed is not None else config.seed + index)
        resolved.append(RenderPrompt(
            index=index, prompt=entry.prompt,
            negative_prompt=_pick(entry.negative_prompt, defaults.negative_prompt, ""),
            seed=seed, height=height, width=width,
            steps=_pick(entry.steps, defaults.steps, config.steps, default_steps),
            guidance_scale=_pick(entry.guidance_scale, defaults.guidance_scale, config.guidance_scale,
                                 default_guidance),
            sampler=sampler, karras=karras))
    return resolved
