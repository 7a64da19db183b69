"""The settings a Z-Image run refuses: SDXL's DDPM objective, its loss weightings (not train.loss.type, its Huber
schedule or train.loss.structure, which both families take) and CLIP text encoders, DoRA and eager attention
(which the Z-Image adapter cannot honour), and render settings its pipeline has no use for. One line per
setting, naming the key, its value, why and what is allowed (`Family.unsupported_settings`)."""

from __future__ import annotations

from tuneline.models.base import RenderChoices
from tuneline.models.rules import changed_settings, render_problems, shown
from tuneline.models.zimage import FAMILY
from tuneline.train.config import TrainConfig

_OBJECTIVE = "Z-Image trains the flow-matching velocity (configure train.flow_matching)"


def unsupported_settings(train: TrainConfig, render: RenderChoices | None = None) -> list[str]:
    """One line per setting of `train` (and `render`, when given) that Z-Image refuses."""
    default = TrainConfig()
    problems = []
    for key, value, usual in changed_settings(train, default, "train", ("prediction_type", "zero_terminal_snr")):
        problems.append(f"{key}: {shown(value)} is SDXL only (its DDPM objective); {_OBJECTIVE}; allowed: {shown(usual)}")
    # train.loss.type, its Huber schedule and structure (the style/structure loss) are both families'.
    sdxl_loss = [key for key in type(train.loss).model_fields if key not in type(train.loss).EVERY_OBJECTIVE]
    for key, value, usual in changed_settings(train.loss, default.loss, "train.loss", sdxl_loss):
        problems.append(f"{key}: {shown(value)} is SDXL only (its loss weighting); Z-Image weighs the loss with "
                        f"train.flow_matching.loss_weighting; allowed: {shown(usual)}")
    for key, value, usual in changed_settings(train.text_encoder_1, default.text_encoder_1, "train.text_encoder_1"):
        problems.append(f"{key}: {shown(value)} is SDXL only (its CLIP ViT-L encoder); Z-Image's Qwen3 text encoder "
                        f"is always frozen; allowed: {shown(usual)}")
    for key, value, usual in changed_settings(train.text_encoder_2, default.text_encoder_2, "train.text_encoder_2"):
        problems.append(f"{key}: {shown(value)} is SDXL only (its OpenCLIP bigG encoder); Z-Image has one text "
                        f"encoder; allowed: {shown(usual)}")
    if train.lora.use_dora:
        problems.append("train.lora.use_dora: true is not supported for Z-Image yet (its LoRA export has no DoRA "
                        "layout); allowed: false")
    if train.attention != "sdpa":
        problems.append(f"train.attention: {shown(train.attention)}: Z-Image uses diffusers' attention dispatch; "
                        "allowed: 'sdpa'")
    return problems + render_problems(FAMILY.title, FAMILY.render, render)
