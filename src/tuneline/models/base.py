"""The shape of a model family (`Family`), its render facts and what its text cache answers
(`TextCache`): plain data and protocols, no registry, no torch.

Each family package declares one `FAMILY = Family(...)` in its `__init__`; `tuneline.models.family`
collects them and tells which one a base model is. The heavy parts a family names answer typed
Protocols: `Renderer` (the render stage's questions) and `Exporter` (the export stage's, speaking of
`ExportedFile` and `HeaderFacts`).
"""

from __future__ import annotations

import datetime as _dt
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import LoraConfig, TrainConfig

PROVENANCE_KEYS = ("data_digest", "params_digest", "code_version", "mlflow_run_id", "git_commit", "git_dirty")


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
class RenderFacts:
    """What rendering needs to know of a family: plain data, so config validation stays torch-free."""

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
    # A family with one sampler of its own: its scheduler class, rebuilt from the base's scheduler config
    # whatever sampler name selects it (None: each name's scheduler from the sampler table).
    scheduler: str | None = None
    sampler_note: str | None = None  # added to the refusal of a sampler name the family does not take
    karras_refusal: str | None = None  # None: Karras sigmas as the sampler allows; else why the family has none


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


# --- the text-embedding cache (Family.text_cache) -------------------------------------------


class Identified(Protocol):
    """A model component whose identity goes into a cache key (tuneline.models.loading.ComponentSource)."""

    def identity(self, root: Path | None) -> str: ...


@dataclass
class EncodedText:
    """One caption's stored embedding: its tensors, the family's own metadata fields, and whether
    the caption was longer than the encoder takes (cut as the pipeline cuts it)."""

    tensors: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


class TextCache(Protocol):
    """What the latents stage asks of a family's text-embedding cache: one stored file per
    distinct caption. The family decides which components encode it (their identities go into
    the key), what else decides the result (`key_fields`), the file's tensors and metadata
    (`encode`) and its `format` name; the stage owns the store, the code version in the key,
    batching, the writes and the report."""

    format: str  # written into every stored file, and the summary's text_embeddings_format
    # How a caption that was cut reads in the stage's warning ("longer than N tokens ..."); a
    # cache whose encode never sets `truncated` may leave it empty.
    truncation: str

    def sources(self, model: ModelConfig, root: Path | None) -> dict[str, Identified]:
        """The tokenizers and text encoders, by name: their identities go into every key."""
        ...

    def key_fields(self, caption: str, identities: dict[str, str], dtype: str) -> dict[str, Any]:
        """Everything but the stage's code version that decides `caption`'s stored embedding."""
        ...

    def load(self, model: ModelConfig, root: Path | None, dtype: str, device: str) -> Any:
        """The frozen encoders (and tokenizers), as `encode` takes them."""
        ...

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(key, caption) pairs in the order they are batched (results must not depend on it)."""
        ...

    def encode(self, models: Any, captions: list[str], device: str) -> list[EncodedText]:
        """One EncodedText per caption, its tensors on the host (called under torch.inference_mode)."""
        ...

    def summary(self) -> dict[str, Any]:
        """Fields for the output folder's latents.json while the cache is on."""
        ...


# --- what the render and export stages ask a family --------------------------------------------------

@dataclass
class ExportedFile:
    """One file of the export: its name, what it is, and which trained components it carries."""

    name: str
    kind: str  # "checkpoint", "lora" or "vae"
    components: list[str]
    description: str


@dataclass(frozen=True)
class HeaderFacts:
    """What every file of one export says of the training run (the family's header adds its own keys)."""

    title: str
    data_digest: str
    params_digest: str
    code_version: str
    mlflow_run_id: str | None
    git_commit: str
    git_dirty: bool | None
    date: _dt.datetime | None  # when the weights were made (not when they were exported)
    prediction_type: str
    zero_terminal_snr: bool
    resolution: tuple[int, int]
    trigger_phrase: str | None
    training_started_at: _dt.datetime | None = None

    def provenance_args(self) -> dict[str, Any]:
        """The provenance entries' arguments (tuneline.models.export.provenance_metadata)."""
        return {key: getattr(self, key) for key in PROVENANCE_KEYS}


class Renderer(Protocol):
    """What rendering asks a family beyond its RenderFacts (`Family.renderer`, built with no arguments)."""

    def scheduler_settings(self, prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, Any]:
        """Scheduler config entries that make the base's scheduler sample what training learned ({}: none)."""
        ...

    def pipeline_from_training(self, adapter: Any, modules: Mapping[str, Any], vae: Any = None) -> Any:
        """The family's text-to-image pipeline sharing the live training modules (live samples)."""
        ...

    def diagnostic_rows(self, pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int,
                        token: str | None, trigger_words: Mapping[str, str | None],
                        seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
        """(rows of (label, tiles), column labels, warnings) of the diagnostic sheet; only asked of a
        family whose RenderFacts.diagnostics is None."""
        ...


class Exporter(Protocol):
    """What the export stage asks a family (`Family.exporter`, built with no arguments): which trained
    parts there are, how its files are described, headed and written, and the model card lines that
    differ between families."""

    components: Mapping[str, str]  # trained part (as trained_modes names it) -> its name for people
    vae_layout: str  # how the standalone VAE file is laid out and where it goes

    def trained_modes(self, trained: TrainConfig) -> dict[str, str]:
        """Trained part -> frozen, lora or full, as the run trained it; ValueError when it cannot export."""
        ...

    def names(self, parts: Sequence[str]) -> str:
        """The parts' names for people, joined ("UNet and text encoder 1 ...")."""
        ...

    def checkpoint_description(self, full: Sequence[str], untouched: Sequence[str], dtype: str) -> str: ...

    def lora_kind(self, lora: LoraConfig) -> str:
        """What the LoRA file is ("kohya LoRA", ...): the model card's and report's first words of it."""
        ...

    def component_line(self, name: str, mode: str, lora: LoraConfig) -> str:
        """The model card's line of one trained part."""
        ...

    def header(self, kind: str, facts: HeaderFacts, extra: Mapping[str, str], *, file_name: str, lora: LoraConfig,
               description: str | None = None) -> dict[str, str]:
        """The safetensors header of a file of `kind` (checkpoint, lora, vae)."""
        ...

    def write_checkpoint(self, pipeline_dir: Path, out: Path, dtype: str, metadata: Mapping[str, str]) -> Path: ...

    def write_lora(self, lora_file: Path, out: Path, metadata: Mapping[str, str], model: ModelConfig,
                   root: Path) -> Path: ...

    def write_vae(self, state_dict: Mapping[str, Any], config: Mapping[str, Any], out: Path, dtype: str,
                  metadata: Mapping[str, str]) -> Path: ...

    def card_training(self, prediction_type: str, trained: TrainConfig, resolution: int) -> str:
        """The model card's line of the training objective."""
        ...

    def card_use(self, files: Sequence[ExportedFile], prediction_type: str, trained: TrainConfig) -> list[str]:
        """The model card's "Use" section: where the files go and how to load them."""
        ...
