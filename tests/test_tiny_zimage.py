"""tiny-zimage: a tiny RANDOM Z-Image pipeline in Tongyi-MAI/Z-Image-Turbo's layout, run by diffusers' ZImagePipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneline.tiny import NOTE_NAME, resolve_tiny
from tuneline.tiny.zimage import LATENT_CHANNELS, TEXT_HIDDEN, build_tiny_zimage

# Config keys of the published Tongyi-MAI/Z-Image-Turbo (huggingface.co/Tongyi-MAI/Z-Image-Turbo,
# its transformer/config.json, vae/config.json and scheduler/scheduler_config.json, written by
# diffusers 0.36.0.dev0), less the `_class_name`/`_diffusers_version`/`_name_or_path` metadata.
# The transformer's set predates `siglip_feat_dim` (Z-Image-Omni, later diffusers); the VAE is
# Flux's; the scheduler config lists just three keys.
TURBO_TRANSFORMER_KEYS = {
    "all_f_patch_size", "all_patch_size", "axes_dims", "axes_lens", "cap_feat_dim", "dim", "in_channels",
    "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "norm_eps", "qk_norm", "rope_theta", "t_scale",
}
TURBO_VAE_KEYS = {
    "act_fn", "block_out_channels", "down_block_types", "force_upcast", "in_channels", "latent_channels",
    "latents_mean", "latents_std", "layers_per_block", "mid_block_add_attention", "norm_num_groups",
    "out_channels", "sample_size", "scaling_factor", "shift_factor", "up_block_types", "use_post_quant_conv",
    "use_quant_conv",
}
TURBO_SCHEDULER_KEYS = {"num_train_timesteps", "shift", "use_dynamic_shifting"}
TURBO_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def config(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text("utf-8"))


def params(data: dict) -> set[str]:
    return {key for key in data if not key.startswith("_")}


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built through the cache, as `model.base: tiny-zimage` resolves it (shared TUNELINE_HOME).
    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    return resolve_tiny("tiny-zimage")


@pytest.fixture(scope="module")
def zimage_pipe(zimage_dir: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_resolves_to_versioned_cache_folder(zimage_dir: Path) -> None:
    assert zimage_dir.name == "tiny-zimage-v1"
    assert "RANDOM" in (zimage_dir / NOTE_NAME).read_text("utf-8")
    assert resolve_tiny("tiny-zimage") == zimage_dir  # built once, then reused


def test_same_bytes_every_build(zimage_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_zimage(tmp_path / "again", seed=0)

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    first, second = files(zimage_dir), files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    total = sum(len(data) for data in first.values())
    assert total < 8 * 2**20, total  # tiny: CPU tests stay fast


def test_layout_and_published_config_keys(zimage_dir: Path) -> None:
    index = config(zimage_dir, "model_index.json")
    assert index["_class_name"] == "ZImagePipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == TURBO_COMPONENTS
    transformer = config(zimage_dir, "transformer/config.json")
    vae = config(zimage_dir, "vae/config.json")
    scheduler = config(zimage_dir, "scheduler/scheduler_config.json")
    assert params(transformer) == TURBO_TRANSFORMER_KEYS
    assert params(vae) == TURBO_VAE_KEYS
    assert params(scheduler) == TURBO_SCHEDULER_KEYS
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (zimage_dir / sub).is_file(), sub

    # Turbo's values where they are not sizes.
    assert scheduler == {**scheduler, "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    assert (vae["use_quant_conv"], vae["use_post_quant_conv"], len(vae["block_out_channels"])) == (False, False, 4)
    assert (transformer["all_patch_size"], transformer["all_f_patch_size"]) == ([2], [1])
    assert (transformer["rope_theta"], transformer["t_scale"], transformer["axes_lens"]) == (256.0, 1000.0,
                                                                                           [1536, 512, 512])
    # Shapes that must agree between components.
    text = config(zimage_dir, "text_encoder/config.json")
    assert text["model_type"] == "qwen3" and text["num_hidden_layers"] >= 3
    assert transformer["cap_feat_dim"] == text["hidden_size"] == TEXT_HIDDEN
    assert transformer["in_channels"] == vae["latent_channels"] == LATENT_CHANNELS
    assert sum(transformer["axes_dims"]) == transformer["dim"] // transformer["n_heads"]


def test_prompt_goes_through_qwen3_chat_template(zimage_pipe) -> None:
    tokenizer = zimage_pipe.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a photo of the cat"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na photo of the cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["<|im_start|>", "u"]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("<|endoftext|>", "right")

    # One embedding per real token (padding dropped), hidden size = the transformer's cap_feat_dim.
    embeds, negative = zimage_pipe.encode_prompt(["a cat", "the photo of the cat in a hat"],
                                                 do_classifier_free_guidance=False, max_sequence_length=64)
    assert negative == []
    assert [e.shape[1] for e in embeds] == [TEXT_HIDDEN, TEXT_HIDDEN]
    assert embeds[0].shape[0] < embeds[1].shape[0] < 64


def test_renders_on_cpu(zimage_pipe) -> None:
    import torch

    def render(**kwargs):
        return zimage_pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                           generator=torch.Generator().manual_seed(0), **kwargs).images

    plain = render(guidance_scale=0.0)
    assert plain.shape == (1, 3, 64, 64)
    assert torch.isfinite(plain).all() and plain.std() > 0
    assert torch.equal(plain, render(guidance_scale=0.0))  # same generator, same image
    guided = render(guidance_scale=2.0, negative_prompt="blurry")
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
