"""Sampler names -> diffusers schedulers, built from the pipeline's own scheduler config, and
what rendering needs to know of each model family (`RenderFamily`).

The tables are plain data so config validation stays torch-free; diffusers is imported
only when a scheduler is built.

Families: the stage takes the family from models/train/trainer_state.json (what was trained) or,
before training, from `model.family` / the base's model_index.json (`models.family.detect_family`).
Z-Image (ZImagePipeline) differs from SDXL where rendering can see it:
- one sampler, its own flow-match Euler (FlowMatchEulerDiscreteScheduler with the base's shift):
  render.sampler `euler` names it, every other sampler name (and karras) is refused;
- its guidance convention: guidance_scale > 0 turns classifier-free guidance on and the result
  is pos + g * (pos - neg) (SDXL's neg + g * (pos - neg) is Z-Image's g - 1), 0 turns it off;
- its defaults when neither the prompt nor the render section sets them: ZImagePipeline's
  own (50 steps, guidance 5.0);
- sides in multiples of 16 (the VAE's x8 and the transformer's 2x2 patches);
- no diagnostic sheet: the SDXL sheet reads the UNet's cross-attention to the trigger word, and
  Z-Image's single-stream transformer has no cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


def check_family_sampler(family: Any, sampler: str, karras: bool) -> None:
    """ValueError when `family` (a render family) has no sampler `sampler` (Z-Image: flow-match Euler only)."""
    if sampler not in family.samplers:
        why = (" (Z-Image renders with its own flow-match Euler, FlowMatchEulerDiscreteScheduler, named euler)"
               if family.name == "zimage" else "")
        raise ValueError(f"sampler {sampler!r} is not available for {family.name}{why}; valid: "
                         f"{', '.join(family.samplers)}")
    if karras and family.name == "zimage":
        raise ValueError("karras: Z-Image's flow-match Euler takes its sigmas from the shift of its scheduler; "
                         "Karras sigmas are an SDXL sampler option (set karras: false)")


# Z-Image's one sampler: its own scheduler class, rebuilt from its config (shift and all).
FLOW_MATCH_EULER = "FlowMatchEulerDiscreteScheduler"


def build_scheduler(name: str, base_config: Any, karras: bool = False, family: Any = None) -> Any:
    """A new scheduler of sampler `name` from `base_config` (a pipeline's scheduler.config).

    Every option this table controls is passed explicitly, so a config that came from a
    previous sampler (say one with Karras sigmas on) never leaks into the next. `family` (a
    render family; None: SDXL) limits the names: Z-Image's `euler` is its flow-match Euler.
    """
    import diffusers

    from tuneline.core.params import ParamsError

    try:
        if family is not None:
            check_family_sampler(family, name, karras)
        check_karras(name, karras)
    except ValueError as error:
        raise ParamsError(str(error)) from None
    if family is not None and family.name == "zimage":
        return getattr(diffusers, FLOW_MATCH_EULER).from_config(base_config)
    spec = SAMPLERS[name]
    options = dict(spec.options)
    if spec.karras:
        options["use_karras_sigmas"] = karras
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(base_config, **options)


# --- model families ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderFamily:
    name: str
    pipeline: str  # diffusers class of text-to-image
    img2img: str  # diffusers class of image-to-image (domain transfer)
    denoiser: str  # the pipeline component trained and swapped: unet / transformer
    steps: int  # default inference steps
    guidance_scale: float  # default guidance scale (in the family's own convention)
    size_multiple: int  # image sides must be multiples of this
    samplers: tuple[str, ...]  # render.sampler names this family accepts
    # diffusers component of a full fine-tune -> the train section that says whether it was
    # trained fully (None: train.mode)
    full_components: dict[str, str | None] = field(default_factory=dict)
    diagnostics: str | None = None  # None: the diagnostic sheet works; else why it is skipped


FAMILIES: dict[str, RenderFamily] = {
    "sdxl": RenderFamily(
        "sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "unet", 30, 6.0, 8,
        SAMPLER_NAMES,
        {"unet": None, "text_encoder": "text_encoder_1", "text_encoder_2": "text_encoder_2"}),
    "zimage": RenderFamily(
        "zimage", "ZImagePipeline", "ZImageImg2ImgPipeline", "transformer", 50, 5.0, 16, ("euler",),
        {"transformer": None, "text_encoder": "text_encoder_1"},
        diagnostics="Z-Image has no diagnostic sheet: the sheet shows the UNet's cross-attention to the trigger "
                    "word (and its x_t / x0 columns use SDXL's DDPM noise schedule); Z-Image's single-stream "
                    "transformer has no cross-attention"),
}


def render_family(name: str) -> RenderFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no render support for model family {name!r}; families: {', '.join(FAMILIES)}") from None


def family_of_pipeline(pipeline: Any) -> RenderFamily:
    """The family of a built pipeline (by its class: text-to-image or image-to-image)."""
    name = type(pipeline).__name__
    for family in FAMILIES.values():
        if name in (family.pipeline, family.img2img):
            return family
    raise KeyError(f"{name} is no pipeline of a known family ({', '.join(FAMILIES)})")


def render_family_of(model_config: Any, root: Path | None, trained_dir: Path | None = None) -> RenderFamily:
    """The family to render: trainer_state.json's `family` (what was trained), else model.family /
    the base's model_index.json (a trainer_state.json without `family` predates Z-Image)."""
    from tuneline.models.family import detect_family

    if trained_dir is not None:
        import json

        state_file = Path(trained_dir) / "trainer_state.json"
        if state_file.is_file():
            family = json.loads(state_file.read_text("utf-8")).get("family")
            if family:
                return render_family(family)
    return render_family(detect_family(model_config, root))
