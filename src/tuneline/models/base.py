"""The shape of a model family (`Family`) and its render facts: plain data, no registry, no torch.

Each family package declares one `FAMILY = Family(...)` in its `__init__`; `tuneline.models.family`
collects them and tells which one a base model is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
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
class Family:
    """Everything family-specific, in one place. Heavy parts are import paths (`module:name`)."""

    name: str  # the model.family value and trainer_state.json's `family`
    title: str  # for people: model cards, messages
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s that are this family
    adapter: str  # the trainer adapter class (tuneline.train.adapter.Adapter)
    text_cache: str  # the latents stage's text-embedding cache class
    exporter: str  # the export stage's writer of this family's files
    rules: str  # function(params) -> list of settings this family refuses, each naming its key
    render: RenderFacts
    single_file_base: bool = False  # whether a single .safetensors base is this family

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
