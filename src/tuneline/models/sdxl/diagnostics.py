"""SDXL's diagnostic sheet: what the trained UNet makes of a few training samples.

For each sample (the stored latent mean, not a random draw) and timestep t, side by side:
the input (VAE decode of the clean latent), the noised x_t (the DDPM schedule of the pipeline's
scheduler), the model's x0 prediction and a cross-attention heatmap of one caption token over the
input. The render stage draws the rows into renders/diagnostics.png.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneline.core.packs import read_member
from tuneline.core.manifest import read_manifest
from tuneline.models.sdxl.text import MAX_TOKENS

COLUMNS = ("input", "x_t", "x0 prediction")


def predicted_x0(x_t: Any, prediction: Any, alpha_bar: Any, prediction_type: str) -> Any:
    """x0 from the model output at a timestep with cumulative alpha `alpha_bar` (a float or a broadcastable tensor).

    epsilon: x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a);  v_prediction: x0 = sqrt(a) * x_t - sqrt(1 - a) * v.
    """
    import torch

    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x_t.device)
    x_t, prediction = x_t.float(), prediction.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction")


def token_positions(tokenizer: Any, caption: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in `caption` as tokenizer 1 encodes it for the UNet (77 tokens, with BOS)."""
    ids = tokenizer(caption, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        return []
    positions: list[int] = []
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] == word_ids:
            positions.extend(range(start, start + len(word_ids)))
    return sorted(set(positions))


class _AttentionRecorder:
    """Wraps a cross-attention (attn2) processor: records softmax(QK^T) summed over the chosen
    token positions and averaged over heads, then lets the original processor do the work."""

    def __init__(self, original: Any, maps: list[Any], positions: list[int]) -> None:
        self.original = original
        self.maps = maps
        self.positions = positions

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, **kwargs: Any) -> Any:
        if encoder_hidden_states is not None and self.positions:
            states = hidden_states
            if states.ndim == 4:
                batch, channels, height, width = states.shape
                states = states.view(batch, channels, height * width).transpose(1, 2)
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(states))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None)  # (batch * heads, pixels, tokens)
            picked = probs[..., self.positions].sum(-1).float()
            self.maps.append(picked.view(states.shape[0], attn.heads, -1).mean(1))  # (batch, pixels)
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, temb=temb, **kwargs)


@contextmanager
def recording_cross_attention(unet: Any, positions: list[int]) -> Iterator[list[Any]]:
    """Record every attn2 layer's attention to `positions` while the body runs; processors are restored after."""
    saved = dict(unet.attn_processors)
    maps: list[Any] = []
    unet.set_attn_processor({name: _AttentionRecorder(p, maps, positions) if ".attn2." in name else p
                             for name, p in saved.items()})
    try:
        yield maps
    finally:
        unet.set_attn_processor(saved)


def attention_heatmap(maps: Sequence[Any], latent_size: tuple[int, int]) -> Any:
    """Per-layer maps (batch, pixels) -> one (batch, H, W) map on the latent grid, scaled to max 1 (all >= 0)."""
    import math

    import torch
    import torch.nn.functional as F

    height, width = latent_size
    resized = []
    for layer in maps:
        for factor in (1, 2, 4, 8, 16, 32, 64):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == layer.shape[-1]:
                grid = layer.reshape(layer.shape[0], 1, h, w)
                resized.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0])
                break
    if not resized:
        raise ValueError("no attention map matches the latent grid")
    heat = torch.stack(resized).mean(0).clamp_min(0)
    peak = heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return heat / peak


def overlay(image: Any, heat: Any, alpha: float = 0.55) -> Any:
    """The heatmap (H, W values in [0, 1]) in black-red-yellow-white over `image`."""
    import numpy as np
    from PIL import Image

    values = np.asarray(heat.detach().cpu().float().numpy(), dtype=np.float32)
    colours = np.stack([np.clip(3 * values, 0, 1), np.clip(3 * values - 1, 0, 1), np.clip(3 * values - 2, 0, 1)], -1)
    heat_image = Image.fromarray((colours * 255).astype(np.uint8), "RGB").resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_image, alpha)


def pick_samples(records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` records taking data sets in turn (first items first), so each data set shows up."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_dataset.setdefault(record["dataset"], []).append(record)
    picked: list[dict[str, Any]] = []
    queues = list(by_dataset.values())
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def diagnostic_rows(pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int, token: str | None,
                    trigger_words: Mapping[str, str | None],
                    seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
    """(rows of (label, tiles), column labels, warnings) of the diagnostic sheet, with `pipeline`'s (trained)
    UNet; `trigger_words`: data set folder -> its trigger word (the default token of its samples). A tile
    is a PIL image, or None where there is nothing to show. A sample's caption is encoded by the pipeline's
    text encoders, or, in a pipeline without them, read from the latents stage's text cache."""
    import torch
    from diffusers import DDPMScheduler
    from safetensors.torch import load

    from tuneline.models.sdxl.text import encode_prompts

    latents_dir = Path(latents_dir)
    records = read_manifest(latents_dir)
    summary_factors = records[0] if records else {}
    scaling = float(summary_factors.get("scaling_factor") or pipeline.vae.config.scaling_factor)
    shift = float(summary_factors.get("shift_factor") or 0.0)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    alphas = noise_scheduler.alphas_cumprod
    last = noise_scheduler.config.num_train_timesteps - 1
    unet, vae = pipeline.unet, pipeline.vae
    device, dtype = unet.device, unet.dtype
    warnings: list[str] = []
    rows: list[tuple[str, list[Any]]] = []
    token_label = token or "trigger word"

    def decode(latent: Any) -> Any:
        pixels = vae.decode((latent / scaling + shift).to(vae.dtype)).sample
        return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")[0]

    with torch.inference_mode():
        for number, record in enumerate(pick_samples(records, samples)):
            word = token or trigger_words.get(record["dataset"])
            caption = record.get("caption") or ""
            positions = token_positions(pipeline.tokenizer, caption, word) if word else []
            if not positions:
                warnings.append(f"diagnostics: {word!r} is not in the caption of {record['dataset']}/{record['id']}"
                                if word else f"diagnostics: data set {record['dataset']} has no trigger_word and "
                                "render.diagnostic_token is not set: no attention map")
            mean = load(read_member(latents_dir, record["latents"]))["mean"].float()[None]
            clean = ((mean - shift) * scaling).to(device)
            if pipeline.text_encoder is None:  # a pipeline without encoders: the latents stage's cached caption
                text = load(read_member(latents_dir, record["text_embeddings"]))
                embeds, pooled = text["prompt_embeds"][None].to(device), text["pooled"][None].to(device)
            else:
                embeds, pooled = encode_prompts([pipeline.tokenizer, pipeline.tokenizer_2],
                                                [pipeline.text_encoder, pipeline.text_encoder_2], [caption], device)
            (orig_w, orig_h), (top, left), (target_w, target_h) = (
                record["original_size"], record["crop_top_left"], record["bucket"])
            time_ids = torch.tensor([[orig_h, orig_w, top, left, target_h, target_w]], dtype=embeds.dtype,
                                    device=device)
            input_image = decode(clean)
            generator = torch.Generator("cpu").manual_seed(seed + number)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            for t in timesteps:
                t = min(max(int(t), 0), last)
                step = torch.tensor([t], device=device)
                noisy = noise_scheduler.add_noise(clean, noise, step)
                with recording_cross_attention(unet, positions) as maps:
                    prediction = unet(noisy.to(dtype), step, embeds.to(dtype),
                                      added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample
                x0 = predicted_x0(noisy, prediction, alphas[t], prediction_type)
                heat = None
                if maps:
                    heat = overlay(input_image, attention_heatmap(maps, tuple(clean.shape[-2:]))[0])
                rows.append((f"{record['dataset']}/{record['id']} t={t}",
                             [input_image, decode(noisy), decode(x0), heat]))
    return rows, [*COLUMNS, f"attention: {token_label}"], sorted(set(warnings))

