"""The shape of a model family (`Family`) and its render facts: plain data, no registry, no torch.

Each family package declares one `FAMILY = Family(...)` in its `__init__`; `tuneline.models.family`
collects them and tells which one a base model is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def load_object(target: str) -> Any:
    """`package.module:name` -> the object (imports the module)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


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
