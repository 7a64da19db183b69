"""Tiny RANDOM training adapters: a LoRA file for tiny-zimage and one for tiny-sdxl, for tests and demos of
`model.training_adapter`.

    model:
      base: tiny-zimage
      training_adapter: tiny-zimage-training-adapter   # RANDOM weights: it de-distils nothing

Each is a LoRA with RANDOM weights (seeded) on the tiny denoiser's attention, in a layout diffusers' LoRA
loader reads: Z-Image's in the ComfyUI / ai-toolkit layout ostris' zimage_turbo_training_adapter uses
(`diffusion_model.<module>.lora_A.weight`, no alpha), SDXL's in diffusers' own (`unet.<module>.lora_A.weight`).
It changes what a training step computes, which is all a test needs of it; it was never trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneline.core.fsutil import build_folder_once
from tuneline.tiny._common import NOTE_NAME, RANDOM_WARNING, TINY_VERSION, seeded

log = logging.getLogger(__name__)

# Ids a user writes as model.training_adapter -> the tiny model family they fit.
TINY_TRAINING_ADAPTERS: dict[str, str] = {
    "tiny-zimage-training-adapter": "zimage",
    "tiny-sdxl-training-adapter": "sdxl",
}
ADAPTER_FILE = "tiny_random_training_adapter.safetensors"
RANK = 4
_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_PREFIX = {"zimage": "diffusion_model.", "sdxl": "unet."}  # the layout of each family's file
_DENOISER = {"zimage": ("ZImageTransformer2DModel", "transformer"), "sdxl": ("UNet2DConditionModel", "unet")}


def build_tiny_training_adapter(path: Path, family: str, seed: int = 0) -> Path:
    """Write the RANDOM training adapter of tiny-`family` into folder `path` (the file, then the note)."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tuneline.tiny.cache import ensure_tiny_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    class_name, subfolder = _DENOISER[family]
    denoiser = getattr(diffusers, class_name).from_pretrained(ensure_tiny_model(family),  # type: ignore[arg-type]
                                                              subfolder=subfolder)
    with seeded(seed, 10):
        denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=_TARGETS, init_lora_weights=False))
        with torch.no_grad():  # PEFT's random B is large next to tiny random weights: a clear but moderate change
            for name, parameter in denoiser.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(0.5)
    tensors = {_PREFIX[family] + key: value.detach().contiguous()
               for key, value in sorted(get_peft_model_state_dict(denoiser).items())}
    save_file(tensors, path / ADAPTER_FILE, metadata={"format": "pt", "tuneline": f"tiny RANDOM training adapter "
                                                                                   f"of tiny-{family}"})
    (path / NOTE_NAME).write_text(
        f"tuneline tiny-{family}-training-adapter (builder version {TINY_VERSION}, seed {seed})\n\n"
        f"WARNING: {RANDOM_WARNING}. This LoRA has RANDOM weights: it de-distils nothing.\n", "utf-8")
    return path


def tiny_training_adapter_file(name: str, cache_dir: Path | None = None) -> Path | None:
    """The file of tiny training adapter `name` (built on first use); None for any other name."""
    from tuneline.tiny.cache import default_cache_dir

    family = TINY_TRAINING_ADAPTERS.get(name)
    if family is None:
        return None
    folder = Path(cache_dir or default_cache_dir()) / f"{name}-v{TINY_VERSION}"
    final = build_folder_once(folder, lambda staging: build_tiny_training_adapter(staging, family),
                              lambda candidate: (candidate / NOTE_NAME).is_file())
    return final / ADAPTER_FILE
