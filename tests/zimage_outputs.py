"""models/train/ as the Z-Image train stage writes it, made here without training (the adapter is
another piece of work): a PEFT LoRA on the tiny RANDOM Z-Image transformer saved with
ZImagePipeline.save_lora_weights, or a perturbed transformer saved as a full ZImagePipeline folder,
plus trainer_state.json with "family": "zimage" and the fields SDXL's train stage writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def tiny_zimage() -> Path:
    from tuneline.tiny import resolve_tiny

    return Path(resolve_tiny("tiny-zimage"))


def lora_transformer(rank: int = 4, alpha: float = 4.0, feed_forward: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """(transformer with a random, non-zero PEFT LoRA, its LoraConfig)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_zimage(), subfolder="transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                        target_modules=ATTENTION + (FEED_FORWARD if feed_forward else []))
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    with torch.no_grad():  # PEFT's non-zero init is large next to tiny random weights: keep the change moderate
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.5)
    return transformer, config


def write_trainer_state(out_dir: Path, mode: str, rank: int = 4, alpha: float = 4.0, targets: str = "attention",
                        **extra: Any) -> dict[str, Any]:
    from tuneline.train.config import TrainConfig

    train = TrainConfig(mode=mode, lora={"rank": rank, "alpha": alpha, "targets": targets}, num_steps=2, seed=7)
    state = {"step": 2, "epoch": 1, "seed": 7, "seed_used": 7, "data_digest": "d" * 64, "family": "zimage",
             "train_config": train.model_dump(mode="json"), "model": {"base": "tiny-zimage"},
             "random_tiny_model": True, "prediction_type": "flow_matching", "processes": 1, "run_key": "zimage-test",
             "ema_weights": False, **extra}
    (out_dir / "trainer_state.json").write_text(json.dumps(state), "utf-8")
    return state


def make_lora_run(out_dir: Path, rank: int = 4, alpha: float = 4.0, feed_forward: bool = False,
                  seed: int = 0) -> Path:
    """models/train of a Z-Image LoRA run: pytorch_lora_weights.safetensors + trainer_state.json."""
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer, config = lora_transformer(rank, alpha, feed_forward, seed)
    ZImagePipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=config.to_dict())
    write_trainer_state(out_dir, "lora", rank, alpha, "attention_mlp" if feed_forward else "attention")
    return out_dir


def full_transformer(seed: int = 0) -> Any:
    """The tiny transformer with every floating weight moved by a seeded 2% perturbation."""
    import torch
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_zimage(), subfolder="transformer")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator) * parameter.abs().mean())
    return transformer


def make_full_run(out_dir: Path, seed: int = 0) -> Path:
    """models/train of a Z-Image full fine-tune: pipeline/ (a ZImagePipeline folder) + trainer_state.json."""
    from diffusers import ZImagePipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = ZImagePipeline.from_pretrained(tiny_zimage(), transformer=full_transformer(seed))
    pipeline.save_pretrained(out_dir / "pipeline")
    write_trainer_state(out_dir, "full")
    return out_dir
