"""Rendered images cached per image in the item store (`<store_dir>/render/`).

An image's key is what decides its pixels: the model family's pipeline class (renders of two
families never share an entry, whatever else matches), the content identity of the
weights (the base model; for trained images also the trained files, LoRA scale and EMA choice), the resolved
prompt entry (prompt, negative prompt, seed, size, steps, guidance, sampler, Karras), the
device type and dtype, and the render code's version. Unchanged weights and prompts render
nothing; a new prompt renders one image per column. The transfer images and the diagnostic
sheet are cached the same way (`entry_path`): trained weights + what else decides their pixels.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuneline.core.codeversion import code_version
from tuneline.core.fsutil import digest_json, link_or_copy
from tuneline.core.store import ItemStore
from tuneline.stages.render import CODE
from tuneline.stages.render.prompts import RenderPrompt

STAGE = "render"
SUFFIX = ".png"


class ImageCache:
    def __init__(self, store_dir: Path, weights: dict[str, Any], device: str, dtype: str, pipeline: str) -> None:
        self.store = ItemStore(store_dir, STAGE)
        self.identity = {"pipeline": pipeline, "weights": weights, "device": device.split(":")[0], "dtype": dtype,
                         "code": code_version(CODE)}

    def key(self, prompt: RenderPrompt) -> str:
        entry = {name: value for name, value in asdict(prompt).items() if name != "index"}
        return digest_json({**self.identity, "prompt": entry})

    def missing(self, prompts: list[RenderPrompt]) -> list[RenderPrompt]:
        return [prompt for prompt in prompts if not self.store.has(self.key(prompt), SUFFIX)]

    def path(self, prompt: RenderPrompt) -> Path:
        return self.store.path(self.key(prompt), SUFFIX)

    def entry_path(self, kind: str, entry: dict[str, Any]) -> Path:
        """Where the image of `kind` (transfer, diagnostics) decided by `entry` and these weights lives."""
        return self.store.path(digest_json({**self.identity, kind: entry}), SUFFIX)

    def place(self, prompts: list[RenderPrompt], out_dir: Path) -> list[Path]:
        """Link every prompt's cached image to <out_dir>/<index>.png (the layout sheets read)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for prompt in prompts:
            target = out_dir / f"{prompt.index}{SUFFIX}"
            link_or_copy(self.path(prompt), target)
            paths.append(target)
        return paths
