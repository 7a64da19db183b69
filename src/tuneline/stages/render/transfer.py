"""Domain transfer for multi-data-set runs: one test image of each data set, rendered
image-to-image with the trained model into every other data set's trigger word.

The prompt is the target's trigger word + the source caption without the source's own
trigger word, so only the learned concept changes: renders/transfer/<a>_to_<b>.png.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.manifest import read_manifest


@dataclass(frozen=True)
class TransferSource:
    dataset: str  # folder name
    trigger_word: str | None
    caption: str
    image: Path


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
    firsts: dict[str, dict[str, Any]] = {}
    for record in read_manifest(latents_dir):
        firsts.setdefault(record["dataset"], record)
    sources = []
    for dataset in params.datasets:
        record = firsts.get(dataset.folder)
        if record is None:
            continue
        image = Path(captioned_dir) / record.get("image", f"{record['dataset']}/{record['id']}.png")
        sources.append(TransferSource(dataset.folder, dataset.trigger_word, record.get("caption") or "", image))
    return sources


def render_transfer(pipeline: Any, sources: list[TransferSource], out_dir: Path, *, strength: float, steps: int,
                    guidance_scale: float, sampler: str, karras: bool, seed: int) -> tuple[list[Path], list[str]]:
    """<out_dir>/<a>_to_<b>.png for every ordered pair of data sets; (paths, warnings)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from tuneline.stages.render.generate import _quiet_diffusers, save_png
    from tuneline.stages.render.samplers import build_scheduler

    img2img = StableDiffusionXLImg2ImgPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, text_encoder_2=pipeline.text_encoder_2,
        tokenizer=pipeline.tokenizer, tokenizer_2=pipeline.tokenizer_2, unet=pipeline.unet,
        scheduler=build_scheduler(sampler, pipeline.scheduler.config, karras))
    img2img.set_progress_bar_config(disable=True)
    steps = max(steps, math.ceil(1 / strength))  # img2img runs int(steps * strength) steps: at least one
    paths, warnings = [], []
    for source in sources:
        if not source.image.is_file():
            warnings.append(f"transfer: {source.image} not found, data set {source.dataset} skipped")
            continue
        with Image.open(source.image) as opened:
            image = opened.convert("RGB")
        width, height = image.width // 8 * 8, image.height // 8 * 8
        image = image.crop((0, 0, width, height))
        for target in sources:
            if target is source:
                continue
            if not target.trigger_word:
                warnings.append(f"transfer: data set {target.dataset} has no trigger_word, no transfer into it")
                continue
            generator = torch.Generator("cpu").manual_seed(seed)
            with _quiet_diffusers():  # its VAE upcast warns on every call about casting with to()
                result = img2img(prompt=transfer_prompt(source, target.trigger_word), image=image,
                                 strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                                 generator=generator).images[0]
            paths.append(save_png(result, Path(out_dir) / f"{source.dataset}_to_{target.dataset}.png"))
    return paths, sorted(set(warnings))
