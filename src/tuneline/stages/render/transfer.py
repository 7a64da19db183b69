"""Domain transfer for multi-data-set runs: one test image of each data set, rendered
image-to-image with the trained model into every other data set's trigger word.

The prompt is the target's trigger word + the source caption without the source's own
trigger word, so only the learned concept changes: renders/transfer/<a>_to_<b>.png.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tuneline.config import Params
from tuneline.core.manifest import read_manifest
from tuneline.core.packs import open_member


@dataclass(frozen=True)
class TransferSource:
    dataset: str  # folder name
    trigger_word: str | None
    caption: str
    folder: Path  # the captioned folder
    image: dict[str, Any]  # its manifest reference into a pack (tuneline.core.packs)
    image_key: str  # the bucketed image's key: what decided its pixels

    @property
    def label(self) -> str:
        return f"{self.folder / self.image['pack']}:{self.image['member']}"

    def found(self) -> bool:
        return (self.folder / self.image["pack"]).is_file()


def strip_word(caption: str, word: str | None) -> str:
    """`caption` without whole-word occurrences of `word` and the separators they leave behind."""
    if not word:
        return caption.strip()
    text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "", caption)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # ", ," left where the word stood
    return text.strip(" ,;")


def transfer_prompt(source: TransferSource, target_trigger: str) -> str:
    rest = strip_word(source.caption, source.trigger_word)
    return f"{target_trigger}, {rest}" if rest else target_trigger


def transfer_sources(params: Params, latents_dir: Path, captioned_dir: Path) -> list[TransferSource]:
    """The first latents-manifest item of each data set (in params order) with its captioned image."""
    return sources_of(params, read_manifest(latents_dir), captioned_dir)


def sources_of(params: Params, records: Iterable[dict[str, Any]], captioned_dir: Path) -> list[TransferSource]:
    """transfer_sources from the latents manifest's `records` (the latents stage, which writes them,
    caches the transfer prompts' embeddings)."""
    firsts: dict[str, dict[str, Any]] = {}
    for record in records:
        firsts.setdefault(record["dataset"], record)
    sources = []
    for dataset in params.datasets:
        record = firsts.get(dataset.folder)
        if record is None:
            continue
        sources.append(TransferSource(dataset.folder, dataset.trigger_word, record.get("caption") or "",
                                      Path(captioned_dir), record["image"], record["key"]))
    return sources


@dataclass(frozen=True)
class TransferJob:
    """One image-to-image render: `source`'s test image into `target`'s trigger word."""

    source: TransferSource
    target: TransferSource

    @property
    def name(self) -> str:
        return f"{self.source.dataset}_to_{self.target.dataset}.png"

    @property
    def prompt(self) -> str:
        return transfer_prompt(self.source, self.target.trigger_word or "")


def transfer_jobs(sources: list[TransferSource]) -> tuple[list[TransferJob], list[str]]:
    """Every ordered pair of data sets that can be rendered; (jobs, warnings about the others)."""
    jobs, warnings = [], []
    for source in sources:
        if not source.found():
            warnings.append(f"transfer: {source.label} not found, data set {source.dataset} skipped")
            continue
        for target in sources:
            if target is source:
                continue
            if not target.trigger_word:
                warnings.append(f"transfer: data set {target.dataset} has no trigger_word, no transfer into it")
                continue
            jobs.append(TransferJob(source, target))
    return jobs, sorted(set(warnings))


def transfer_steps(steps: int, strength: float) -> int:
    """img2img runs int(steps * strength) steps: at least one."""
    return max(steps, math.ceil(1 / strength))


def render_transfer(pipeline: Any, jobs: list[TransferJob], path_of: Callable[[TransferJob], Path], *,
                    strength: float, steps: int, guidance_scale: float, sampler: str, karras: bool,
                    seed: int, embedded: Callable[[str], Any] | None = None) -> list[Path]:
    """Render every job to path_of(job) (the image cache's path); returns the paths.

    The image-to-image pipeline of `pipeline`'s family (RenderFacts.img2img) shares its components;
    each source image is cropped to the family's side multiple. With `embedded`, the prompts come as
    their cached embeddings (tuneline.stages.render.embeds)."""
    import diffusers
    import torch
    from PIL import Image

    from tuneline.stages.render.generate import _quiet_diffusers, family_of_pipeline, save_png
    from tuneline.stages.render.samplers import build_scheduler

    if not jobs:
        return []
    family = family_of_pipeline(pipeline)
    renderer = family.build_renderer()
    scheduler = build_scheduler(sampler, pipeline.scheduler.config, karras, family)
    img2img = getattr(diffusers, family.render.img2img)(**{**pipeline.components, "scheduler": scheduler})
    img2img.set_progress_bar_config(disable=True)
    side = family.render.size_multiple
    paths = []
    for job in jobs:
        with Image.open(open_member(job.source.folder, job.source.image)) as opened:
            image = opened.convert("RGB")
        width, height = image.width // side * side, image.height // side * side
        image = image.crop((0, 0, width, height))
        generator = torch.Generator("cpu").manual_seed(seed)
        with _quiet_diffusers():  # its VAE upcast warns on every call about casting with to()
            texts = renderer.text_inputs(img2img, job.prompt, None, guidance_scale, embedded)
            result = img2img(**texts, image=image, strength=strength,
                             num_inference_steps=transfer_steps(steps, strength), guidance_scale=guidance_scale,
                             generator=generator).images[0]
        paths.append(save_png(result, path_of(job)))
    return paths
