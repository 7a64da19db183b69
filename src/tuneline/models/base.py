"""The shape of a model family (`Family`), its render facts and what its text cache answers
(`TextCache`): plain data and protocols, no registry, no torch.

Each family package declares one `FAMILY = Family(...)` in its `__init__`; `tuneline.models.family`
collects them and tells which one a base model is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
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

    def part_file(self, part: str) -> str:
        """The module file of a heavy part, relative to the tuneline package: what a stage's CODE names."""
        module = getattr(self, part).split(":")[0]
        return module.removeprefix("tuneline.").replace(".", "/") + ".py"


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
