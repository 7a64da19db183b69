"""The shape of a model family (`Family`) and its render facts: plain data, no registry, no torch.

Each family package declares one `FAMILY = Family(...)` in its `__init__`; `tuneline.models.family`
collects them and tells which one a base model is. The heavy parts a family names by import path
answer the Protocols of `tuneline.models.contracts` (TextCache, Renderer, Exporter).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.models.contracts import Exporter, Renderer
    from tuneline.train.config import TrainConfig


def load_object(target: str) -> Any:
    """`package.module:name` -> the object (imports the module)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class RenderChoices(Protocol):
    """The render settings a family's rules read; the `render` params section fits it."""

    @property
    def sampler(self) -> str: ...

    @property
    def karras(self) -> bool: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


@dataclass(frozen=True)
class Variant:
    """One release of a family (`model.variant`): its render defaults and whether it is step-distilled.

    `markers` are the words that name it in a hub id, a folder or file name or a model card's title or
    front matter (lower case, `-` for any separator); where several variants' markers match, the longest
    match wins ("de-turbo" names a de-distilled base, not Turbo)."""

    name: str  # the model.variant value
    distilled: bool  # step-distilled: training it directly (without model.training_adapter) degrades it
    steps: int | None = None  # render default; None: RenderFacts.steps
    guidance_scale: float | None = None  # render default; None: RenderFacts.guidance_scale
    source: str = ""  # where its render defaults come from (shown in the render report)
    markers: tuple[str, ...] = ()
    # A distilled variant trained without a training adapter is warned about (tuneline.models.variant): what
    # goes wrong, an example model.training_adapter, and what to train instead.
    problem: str = ""
    adapter_example: str = ""
    advice: str = ""


@dataclass(frozen=True)
class RenderFacts:
    """What rendering needs to know of a family: plain data, so config validation stays torch-free."""

    pipeline: str  # diffusers class of text-to-image
    img2img: str  # diffusers class of image-to-image (domain transfer)
    denoiser: str  # the pipeline component trained and swapped: unet / transformer
    steps: int  # default inference steps; a variant may set its own (Variant.steps)
    guidance_scale: float  # default guidance scale (in the family's own convention); a variant may set its own
    size_multiple: int  # image sides must be multiples of this
    samplers: tuple[str, ...]  # render.sampler names this family accepts
    # diffusers component of a full fine-tune -> the train section that says whether it was
    # trained fully (None: train.mode)
    full_components: dict[str, str | None] = field(default_factory=dict)
    diagnostics: str | None = None  # None: the diagnostic sheet works; else why it is skipped
    # A family with one sampler of its own: its scheduler class, rebuilt from the base's scheduler config
    # whatever sampler name selects it (None: each name's scheduler from the sampler table).
    scheduler: str | None = None
    sampler_note: str | None = None  # added to the refusal of a sampler name the family does not take
    karras_refusal: str | None = None  # None: Karras sigmas as the sampler allows; else why the family has none
    # The family's releases (model.variant), the first one assumed when nothing names one; each may set the
    # render defaults above for itself.
    variants: tuple[Variant, ...] = (Variant("base", distilled=False),)
    # The pipeline's text-encoder components: left out (None) when prompts come as cached embeddings.
    text_encoders: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForeignSetting:
    """A setting of another family that changes nothing for this one: set away from its default,
    the stages that read it say so (a warning, not silence). `note` is a str.format template
    with {key} and {value}."""

    key: str  # dotted params key, e.g. "train.text_encoder_2.mode"
    note: str


@dataclass(frozen=True)
class Family:
    """Everything family-specific, in one place. Heavy parts are import paths (`module:name`)."""

    name: str  # the model.family value and trainer_state.json's `family`
    title: str  # for people: model cards, messages
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s that are this family
    adapter: str  # the trainer adapter class (tuneline.train.adapter.Adapter)
    text_cache: str  # the latents stage's text-embedding cache class (a TextCache, below)
    exporter: str  # the export stage's writer of this family's files
    rules: str  # function(params) -> list of settings this family refuses, each naming its key
    render: RenderFacts
    single_file_base: bool = False  # whether a single .safetensors base is this family
    # Advice when half-precision VAE batches overflow and are re-encoded in fp32 (None: the generic one).
    vae_overflow_hint: str | None = None
    ignored_settings: tuple[ForeignSetting, ...] = ()  # other families' settings, reported when set
    renderer: str = ""  # the render stage's family behaviour (a `Renderer`); every family names one
    # Stage name -> this family's modules (relative to the package, as CODE names them) that decide what the
    # stage makes for it. The stage loads them by name, so its imports do not show them: its CODE adds these.
    code: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Diffusers component (unet, transformer, text_encoder, ...) -> names of its modules that model.quantize
    # leaves in full precision (small embedders, final layers: tuneline.models.quantize.kept); every other
    # frozen nn.Linear is quantized.
    full_precision: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Class names of the denoiser's repeated blocks: FSDP2 shards each one as its own unit (accelerate's
    # transformer-based wrap policy), so only one block's full weights are gathered at a time.
    shard_blocks: tuple[str, ...] = ()

    def build_adapter(self, *args: Any, **kwargs: Any) -> Any:
        return load_object(self.adapter)(*args, **kwargs)

    def load(self, part: str) -> Any:
        """One of the heavy parts by field name: `family.load("exporter")`."""
        return load_object(getattr(self, part))

    def unsupported_settings(self, train: TrainConfig, render: RenderChoices | None = None) -> list[str]:
        """Every setting this family refuses (its `rules`), each naming the key, its value and what is
        allowed. `render` None: only the train section is checked (an adapter has no other)."""
        rules = self.load("rules")
        return rules(train, render)

    def refuse_unsupported(self, train: TrainConfig, render: RenderChoices | None = None) -> None:
        """ParamsError naming every setting this family refuses; returns when there is none."""
        problems = self.unsupported_settings(train, render)
        if problems:
            raise ParamsError(f"settings that do not apply to the {self.title} family (model.base is a {self.title} "
                              "model):\n" + "\n".join(f"  - {problem}" for problem in problems))

    def build_exporter(self) -> Exporter:
        return load_object(self.exporter)()

    def build_renderer(self) -> Renderer:
        return load_object(self.renderer)()
