"""A tiny random-weight Z-Image pipeline in the standard diffusers layout (ZImagePipeline).

Z-Image is a flow-matching single-stream DiT (ZImageTransformer2DModel) conditioned on the
hidden states of a Qwen3 decoder LM, with Flux's 16-channel VAE. The folder mirrors
Tongyi-MAI/Z-Image-Turbo: model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
scheduler/, and each config.json carries exactly the keys of the published one (only the
sizes are tiny), so code written against this folder reads real Z-Image configs unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tuneline.tiny._common import RANDOM_WARNING, seeded, write_note
from tuneline.tiny._tokenizers import (
    QWEN_ENDOFTEXT,
    QWEN_IM_END,
    QWEN_IM_START,
    QWEN_THINK,
    qwen_vocab,
    write_bpe_files,
)

log = logging.getLogger(__name__)

# Text encoder (Qwen3). The pipeline feeds hidden_states[-2] to the transformer, so >= 3
# layers keep that a real intermediate layer. GQA (4 query heads, 2 KV heads) as in Qwen3-4B.
TEXT_HIDDEN = 32
TEXT_LAYERS = 3
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = 8

# Transformer: head_dim = DIM / HEADS must equal sum(AXES_DIMS) (RoPE over frame, h, w);
# Turbo has 3840 / 30 = 128 = 32 + 48 + 48, here 64 / 2 = 32 = 8 + 12 + 12 (same proportions).
DIM = 64
HEADS = 2
AXES_DIMS = (8, 12, 12)
LATENT_CHANNELS = 16
PATCH_SIZE = 2

VAE_BLOCKS = (8, 16, 32, 32)  # four blocks -> x8, as Flux's VAE
VAE_SAMPLE_SIZE = 256
# Flux's VAE normalisation, which Z-Image uses: latents = (vae_latents - shift) * scaling.
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159

# Z-Image-Turbo's scheduler: a fixed shift of 3 (no resolution-dependent shift).
SCHEDULER_SHIFT = 3.0

# Published Tongyi-MAI/Z-Image-Turbo config keys (besides `_class_name`/`_diffusers_version`):
# transformer/config.json was written by diffusers 0.36 before `siglip_feat_dim` (Z-Image-Omni)
# existed, and scheduler/scheduler_config.json lists only these three keys. Keys the current
# diffusers writes beyond them are dropped here, after checking they hold the class default.
PUBLISHED_TRANSFORMER_KEYS = frozenset({
    "all_f_patch_size", "all_patch_size", "axes_dims", "axes_lens", "cap_feat_dim", "dim", "in_channels",
    "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "norm_eps", "qk_norm", "rope_theta", "t_scale",
})
PUBLISHED_SCHEDULER_KEYS = frozenset({"num_train_timesteps", "shift", "use_dynamic_shifting"})

# Qwen3's chat template, reduced to what plain-text messages need; for a user message with
# add_generation_prompt=True it renders exactly as Qwen3's own template does:
#   <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
# (ZImagePipeline passes enable_thinking=True, which adds nothing; False adds an empty think block.)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _write_qwen_tokenizer(folder: Path) -> dict[str, int]:
    """vocab.json + merges.txt + tokenizer_config.json (with the chat template), as Qwen3's folders."""
    vocab, merges = qwen_vocab()
    write_bpe_files(folder, vocab, merges)
    added = {
        str(vocab[token]): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": token not in QWEN_THINK,
        }
        for token in (QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [QWEN_IM_START, QWEN_IM_END],
        "bos_token": None,
        "eos_token": QWEN_IM_END,
        "pad_token": QWEN_ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return vocab


def _text_encoder(vocab: dict[str, int], seed: int) -> Any:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 3,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=vocab[QWEN_ENDOFTEXT],
        eos_token_id=vocab[QWEN_IM_END],
        pad_token_id=vocab[QWEN_ENDOFTEXT],
    )
    with seeded(seed, 1):
        # model_index.json of Z-Image-Turbo names Qwen3Model (the LM without its head).
        return Qwen3Model(config).eval()


def _transformer(seed: int) -> Any:
    import torch
    from diffusers import ZImageTransformer2DModel

    with seeded(seed, 2):
        model = ZImageTransformer2DModel(
            all_patch_size=(PATCH_SIZE,),
            all_f_patch_size=(1,),
            in_channels=LATENT_CHANNELS,
            dim=DIM,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=HEADS,
            n_kv_heads=HEADS,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=TEXT_HIDDEN,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=list(AXES_DIMS),
            # Turbo's lengths: the first axis numbers caption tokens, then the image frame after them.
            axes_lens=[1536, 512, 512],
        )
        # The pad tokens start at zero; trained ones are not. Random values keep the
        # padding path visible in tests (a padded token then differs from a zero one).
        with torch.no_grad():
            model.x_pad_token.normal_(std=0.02)
            model.cap_pad_token.normal_(std=0.02)
    return model


def _vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    with seeded(seed, 3):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=VAE_BLOCKS,
            layers_per_block=1,
            act_fn="silu",
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=VAE_SAMPLE_SIZE,
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=VAE_SHIFT_FACTOR,
            force_upcast=True,
            # Flux's VAE has neither 1x1 quant conv.
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        )


def _keep_published_keys(config_file: Path, cls: type, keep: frozenset[str]) -> None:
    """Rewrite a saved config with only the published keys; a dropped key must hold its default."""
    import inspect

    config = json.loads(config_file.read_text("utf-8"))
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
    for key in [k for k in config if not k.startswith("_") and k not in keep]:
        if config[key] != defaults.get(key, object()):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not published and not the default")
        del config[key]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")


def build_tiny_zimage(path: Path, seed: int = 0) -> Path:
    """Write a tiny RANDOM-weight Z-Image pipeline folder at `path` and return `path`.

    Layout and config keys match Tongyi-MAI/Z-Image-Turbo; weights in safetensors. The same
    `seed` gives byte-identical files. Its images are noise: it exists to exercise the real
    code paths quickly on CPU.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    log.warning("building tiny Z-Image at %s: %s", path, RANDOM_WARNING)

    vocab = _write_qwen_tokenizer(path / "tokenizer")
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=SCHEDULER_SHIFT, use_dynamic_shifting=False
        ),
        vae=_vae(seed),
        text_encoder=_text_encoder(vocab, seed),
        tokenizer=Qwen2Tokenizer.from_pretrained(path / "tokenizer"),
        transformer=_transformer(seed),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrote the tokenizer folder (tokenizer.json, chat_template.jinja,
    # load-time kwargs); restore the plain Qwen layout.
    for name in ("tokenizer.json", "chat_template.jinja", "special_tokens_map.json"):
        (path / "tokenizer" / name).unlink(missing_ok=True)
    _write_qwen_tokenizer(path / "tokenizer")
    _keep_published_keys(path / "transformer" / "config.json", ZImageTransformer2DModel, PUBLISHED_TRANSFORMER_KEYS)
    _keep_published_keys(path / "scheduler" / "scheduler_config.json", FlowMatchEulerDiscreteScheduler,
                         PUBLISHED_SCHEDULER_KEYS)
    write_note(path, "zimage", seed)
    return path
