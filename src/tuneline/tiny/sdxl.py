"""A tiny random-weight Stable Diffusion XL pipeline in the standard diffusers layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tuneline.tiny._common import RANDOM_WARNING, seeded, write_note
from tuneline.tiny._tokenizers import CLIP_BOS, CLIP_EOS, clip_vocab, write_bpe_files

log = logging.getLogger(__name__)

# Sizes the tests assert; they must stay different (see TE2_HIDDEN).
TE1_HIDDEN = 32
# Two encoders of equal width confuse diffusers' single-file loader (it tells them
# apart by shape) and the pipeline then renders NaN: keep TE2 wider.
TE2_HIDDEN = 64
TE2_PROJECTION = 32
TEXT_LAYERS = 3  # > 1 so SDXL's "penultimate hidden state" is a real intermediate layer
MAX_TOKENS = 77
ADDITION_TIME_EMBED_DIM = 8
UNET_SAMPLE_SIZE = 32  # latent size; x8 VAE -> 256 px default resolution
VAE_SAMPLE_SIZE = 256
SDXL_VAE_SCALING = 0.13025

# SDXL base 1.0's scheduler_config.json, less the keys EulerDiscreteScheduler does not take.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _text_encoder_config(
    hidden: int, projection_dim: int, hidden_act: str, vocab_size: int, pad_token_id: int
) -> Any:
    from transformers import CLIPTextConfig

    bos_id, eos_id = vocab_size - 2, vocab_size - 1  # clip_vocab() puts BOS/EOS last, as CLIP does
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=projection_dim,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_token_id,
    )


def _write_clip_tokenizer(folder: Path, pad_token: str) -> dict[str, int]:
    """vocab.json + merges.txt + tokenizer_config.json, as in SDXL's tokenizer folders."""
    vocab, merges = clip_vocab()
    write_bpe_files(folder, vocab, merges)
    special = {
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        # The pipeline pads prompts to model_max_length: it must be CLIP's 77.
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", "utf-8")
    return vocab


def _unet(cross_attention_dim: int, seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    with seeded(seed, 4):
        return UNet2DConditionModel(
            sample_size=UNET_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=8,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=cross_attention_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled TE2 embedding.
            projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TE2_PROJECTION,
            flip_sin_to_cos=True,
            freq_shift=0,
        )


def _vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    with seeded(seed, 3):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four blocks -> three downsamples -> x8, like SDXL's VAE.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=VAE_SAMPLE_SIZE,
            scaling_factor=SDXL_VAE_SCALING,
            force_upcast=True,
        )


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny RANDOM-weight SDXL pipeline folder at `path` and return `path`.

    Layout and configs match stabilityai/stable-diffusion-xl-base-1.0 (model_index.json,
    unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/),
    weights in safetensors. The same `seed` gives byte-identical weight tensors.
    Its images are noise: it exists to exercise the real code paths quickly on CPU.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    log.warning("building tiny SDXL at %s: %s", path, RANDOM_WARNING)

    vocab = _write_clip_tokenizer(path / "tokenizer", pad_token=CLIP_EOS)
    # SDXL's tokenizer_2 pads with "!" (OpenCLIP convention); keep that difference.
    _write_clip_tokenizer(path / "tokenizer_2", pad_token="!")
    vocab_size = len(vocab)

    # Activations as in SDXL: OpenAI CLIP-L uses quick_gelu, OpenCLIP bigG gelu.
    with seeded(seed, 1):
        text_encoder = CLIPTextModel(
            _text_encoder_config(TE1_HIDDEN, TE1_HIDDEN, "quick_gelu", vocab_size, vocab[CLIP_EOS])
        )
    with seeded(seed, 2):
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_encoder_config(TE2_HIDDEN, TE2_PROJECTION, "gelu", vocab_size, vocab["!"])
        )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        unet=_unet(TE1_HIDDEN + TE2_HIDDEN, seed),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrote the tokenizer folders (tokenizer.json, load-time kwargs such as
    # "is_local" in tokenizer_config.json); restore the plain SDXL hub layout.
    for name, pad_token in (("tokenizer", CLIP_EOS), ("tokenizer_2", "!")):
        (path / name / "tokenizer.json").unlink(missing_ok=True)
        _write_clip_tokenizer(path / name, pad_token=pad_token)
    write_note(path, "sdxl", seed)
    return path
