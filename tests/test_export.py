"""Exports checked against real clients: diffusers loads our kohya LoRA and our single-file SDXL.

Tiny RANDOM SDXL only; weights and renders must match the diffusers-format originals exactly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# SDXL base 1.0's UNet block structure; names do not depend on channel widths.
REAL_SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
}
RANK, ALPHA, PROJ_IN_ALPHA = 4, 2.0, 8.0
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROVENANCE = {"data_digest": "d" * 64, "params_digest": "p" * 64, "code_version": "0.1.0+abc", "mlflow_run_id": "run42"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny SDXL folder, built once per session (same TUNELINE_HOME as the other test modules)."""
    from tuneline.models.ref import resolve_model

    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    return Path(resolve_model("tiny-sdxl"))


def load_pipe(tiny_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe):
    import numpy as np

    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all()
    return image


def weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


# --- kohya LoRA ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory):
    """A random PEFT LoRA (rank 4, alpha 2, proj_in alpha 8, conv layers included) on UNet + both
    text encoders, saved in diffusers format and converted to kohya."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tuneline.models.sdxl.kohya_lora import export_kohya_lora
    from tuneline.models.sdxl.export import kohya_metadata
    from tuneline.models.sdxl.adapter import UNET_LORA_TARGETS

    folder = tmp_path_factory.mktemp("lora")
    pipe = load_pipe(tiny_dir)
    unet_settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": UNET_LORA_TARGETS["all"],
                     "alpha_pattern": {"proj_in": PROJ_IN_ALPHA}}
    text_settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": TEXT_TARGETS}
    pipe.unet.add_adapter(LoraConfig(**unet_settings, init_lora_weights="gaussian"))
    pipe.text_encoder.add_adapter(LoraConfig(**text_settings, init_lora_weights="gaussian"))
    pipe.text_encoder_2.add_adapter(LoraConfig(**text_settings, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for name, param in component.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: make the LoRA actually do something
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    StableDiffusionXLPipeline.save_lora_weights(
        folder / "diffusers",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_settings,
        text_encoder_lora_adapter_metadata=text_settings,
        text_encoder_2_lora_adapter_metadata=text_settings,
        safe_serialization=True,
    )
    metadata = kohya_metadata(title="tiny test lora", rank=RANK, alpha=ALPHA, trigger_phrase="sks cat",
                              training_started_at="1700000000.0", date="2024-05-01T12:00:00", **PROVENANCE)
    kohya = export_kohya_lora(folder / "diffusers", folder / "kohya.safetensors", tiny_dir / "unet", metadata)
    return folder / "diffusers", kohya


def test_kohya_lora_layout_and_header(lora_files):
    _, kohya = lora_files
    tensors = load_file(kohya)
    with safe_open(str(kohya), "pt") as handle:
        header = handle.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    # tiny UNet: layers_per_block=1, so diffusers down_blocks.1 is SGM input_blocks.3
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in tensors  # downsampler conv
    assert "lora_unet_output_blocks_1_2_conv.lora_up.weight" in tensors  # upsampler conv
    assert "lora_unet_middle_block_1_proj_in.alpha" in tensors
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in tensors
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].ndim == 4  # conv LoRA stays 4D
    alphas = {k: v.item() for k, v in tensors.items() if k.endswith(".alpha")}
    assert {v for k, v in alphas.items() if "_proj_in." in k} == {PROJ_IN_ALPHA}
    assert {v for k, v in alphas.items() if "_proj_in." not in k} == {ALPHA}  # the real alpha, not the rank
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {RANK}
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "2.0")
    assert header["ss_training_started_at"] == "1700000000.0"
    assert header["modelspec.sai_model_spec"] == "1.0.1"
    assert header["modelspec.implementation_version"] == "tuneline/0.1.0+abc"  # no commit given: the version
    assert header["ss_network_args"] == "{}"  # kohya's minimum key set has it, even when empty
    assert header["tuneline.git_dirty"] == "unknown"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert header["modelspec.resolution"] == "1024x1024"
    assert header["modelspec.prediction_type"] == "epsilon"
    assert header["modelspec.trigger_phrase"] == "sks cat"
    assert header["modelspec.title"] == "tiny test lora"
    assert header["modelspec.date"] == "2024-05-01T12:00:00"
    assert {k: header[f"tuneline.{k}"] for k in PROVENANCE} == PROVENANCE


def test_kohya_lora_loads_in_diffusers_like_the_original(tiny_dir, lora_files):
    diffusers_dir, kohya = lora_files
    base = weights(load_pipe(tiny_dir))
    results = []
    for source in (diffusers_dir, kohya):
        pipe = load_pipe(tiny_dir)
        pipe.load_lora_weights(str(source))
        image = render(pipe)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights
        results.append((image, weights(pipe)))
    (image_a, fused_a), (image_b, fused_b) = results
    assert torch.allclose(torch.from_numpy(image_a), torch.from_numpy(image_b), atol=1e-6)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert fused_a[component].keys() == fused_b[component].keys() == base[component].keys()
        for key, value in fused_a[component].items():
            assert torch.allclose(value, fused_b[component][key], atol=1e-6, rtol=1e-5), (component, key)
    # The LoRA really applied, with alpha/rank: W + (2/4) B A; proj_in W + (8/4) B A.
    lora = load_file(diffusers_dir / "pytorch_lora_weights.safetensors")
    for module, scale in (("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", ALPHA / RANK),
                          ("mid_block.attentions.0.proj_in", PROJ_IN_ALPHA / RANK)):
        delta = lora[f"unet.{module}.lora_B.weight"] @ lora[f"unet.{module}.lora_A.weight"]
        expected = base["unet"][f"{module}.weight"] + scale * delta
        assert torch.allclose(fused_b["unet"][f"{module}.weight"], expected, atol=1e-6)
    changed = [k for k in ("down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.upsamplers.0.conv.weight")
               if not torch.equal(fused_b["unet"][k], base["unet"][k])]
    assert len(changed) == 2  # conv LoRAs applied too
    te1_key = next(k for k in base["text_encoder"] if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(fused_b["text_encoder"][te1_key], base["text_encoder"][te1_key])


def test_kohya_names_for_the_real_sdxl_layout_go_through_diffusers_converter():
    """Every LoRA-able module of a real-layout SDXL UNet (built on meta) maps to a kohya SGM name
    that diffusers' own kohya loader turns back into the same module."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from tuneline.models.sdxl.kohya_lora import diffusers_lora_to_kohya, kohya_module_name
    from tuneline.models.sdxl.sgm_unet import sgm_module_prefixes

    prefixes = sgm_module_prefixes(REAL_SDXL_UNET)
    name = kohya_module_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", prefixes)
    assert name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            **REAL_SDXL_UNET, block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=(2, 4, 8),
            use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    modules = [n for n, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    lora = {}
    for module in modules:
        lora[f"unet.{module}.lora_A.weight"] = torch.zeros(2, 1)
        lora[f"unet.{module}.lora_B.weight"] = torch.zeros(1, 2)
    kohya = diffusers_lora_to_kohya(lora, (2, 1.0), REAL_SDXL_UNET)
    back, alphas = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet.config)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in back} == set(modules)
    assert set(alphas.values()) == {1.0}


def test_kohya_conversion_refuses_what_it_cannot_express():
    from tuneline.models.sdxl.sgm_unet import UnmappedKeyError
    from tuneline.models.sdxl.kohya_lora import diffusers_lora_to_kohya

    pair = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
            "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 2)}
    bias = {**pair, "unet.mid_block.attentions.0.proj_in.lora_B.bias": torch.zeros(4)}
    with pytest.raises(UnmappedKeyError, match="lora_B.bias"):
        diffusers_lora_to_kohya(bias, (2, 1.0), REAL_SDXL_UNET)
    dora = {**pair, "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.ones(3)}
    with pytest.raises(ValueError, match="DoRA magnitude has 3 values for 4 output channels"):
        diffusers_lora_to_kohya(dora, (2, 1.0), REAL_SDXL_UNET)
    with pytest.raises(UnmappedKeyError, match="no SGM name"):
        diffusers_lora_to_kohya({k.replace("proj_in", "proj_sideways"): v for k, v in pair.items()},
                                (2, 1.0), REAL_SDXL_UNET)
    with pytest.raises(ValueError, match="no lora_alpha"):
        diffusers_lora_to_kohya(pair, {"unet": {"r": 2}}, REAL_SDXL_UNET)
    with pytest.raises(ValueError, match="rank 2 in the weights"):
        diffusers_lora_to_kohya(pair, (8, 8.0), REAL_SDXL_UNET)
    # rsLoRA scales by alpha/sqrt(r): the kohya alpha keeps the effective weight
    out = diffusers_lora_to_kohya(pair, {"unet": {"lora_alpha": 3.0, "use_rslora": True}}, REAL_SDXL_UNET)
    assert out["lora_unet_middle_block_1_proj_in.alpha"].item() == pytest.approx(3.0 * 2**0.5)


def test_dora_magnitude_becomes_an_output_axis_dora_scale():
    """PEFT keeps the magnitude as (out,) for linear and (1, out, 1, 1) for conv layers; kohya/LyCORIS
    and ComfyUI read `dora_scale` shaped (out, 1[, 1, 1]) beside the LoRA pair (ComfyUI's output-axis
    test: dora_scale.shape[0] == weight.shape[0])."""
    from tuneline.models.sdxl.kohya_lora import diffusers_lora_to_kohya

    linear, conv = "unet.mid_block.attentions.0.proj_in", "unet.down_blocks.0.resnets.0.conv1"
    magnitudes = {linear: torch.arange(1.0, 5.0), conv: torch.arange(1.0, 9.0).reshape(1, 8, 1, 1)}
    lora = {f"{linear}.lora_A.weight": torch.zeros(2, 4), f"{linear}.lora_B.weight": torch.zeros(4, 2),
            f"{linear}.lora_magnitude_vector": magnitudes[linear],
            f"{conv}.lora_A.weight": torch.zeros(2, 8, 3, 3), f"{conv}.lora_B.weight": torch.zeros(8, 2, 1, 1),
            f"{conv}.lora_magnitude_vector.weight": magnitudes[conv]}  # the form diffusers reads for text encoders
    out = diffusers_lora_to_kohya(lora, (2, 1.0), REAL_SDXL_UNET)
    assert out["lora_unet_middle_block_1_proj_in.dora_scale"].shape == (4, 1)
    assert out["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (8, 1, 1, 1)
    assert torch.equal(out["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].flatten(), magnitudes[conv].flatten())
    assert torch.equal(out["lora_unet_middle_block_1_proj_in.dora_scale"].flatten(), magnitudes[linear])
    assert {k.rsplit(".", 1)[0] for k in out if k.endswith(".dora_scale")} == {
        k.removesuffix(".lora_up.weight") for k in out if k.endswith(".lora_up.weight")}


# --- single-file checkpoint ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def original(tiny_dir):
    pipe = load_pipe(tiny_dir)
    return weights(pipe), render(pipe)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_file_loads_back_exactly(tiny_dir, original, tmp_path, dtype):
    from diffusers import StableDiffusionXLPipeline

    from tuneline.models.sdxl.export import checkpoint_metadata
    from tuneline.models.sdxl.checkpoint_file import pipeline_to_single_file

    metadata = checkpoint_metadata(title="tiny", date="2024-05-01T12:00:00", **PROVENANCE)
    path = pipeline_to_single_file(tiny_dir, tmp_path / "tiny.safetensors", dtype, metadata)
    stored = load_file(path)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        assert handle.metadata()["tuneline.mlflow_run_id"] == "run42"
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in stored)
    assert {v.dtype for v in stored.values()} == {torch.float32 if dtype == "fp32" else torch.float16}
    assert stored["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert stored["conditioner.embedders.1.model.text_projection"].shape == (64, 32)  # x @ P: hidden x proj
    assert stored["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in stored
    assert "v_pred" not in stored and "ztsnr" not in stored  # an epsilon model carries no prediction markers

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base_weights, base_image = original
    loaded = weights(pipe)
    for component, tensors in base_weights.items():
        assert loaded[component].keys() == tensors.keys(), component
        for key, value in tensors.items():
            expected = value if dtype == "fp32" else value.half()
            assert torch.equal(loaded[component][key].to(expected.dtype), expected), (component, key)
    if dtype == "fp32":
        assert (render(pipe) == base_image).all()


def test_single_file_refuses_unmapped_keys(tiny_dir, tmp_path):
    from tuneline.models.sdxl.sgm_unet import UnmappedKeyError
    from tuneline.models.sdxl.checkpoint_file import pipeline_to_single_file
    from tuneline.models.sdxl.checkpoint_file import open_clip_to_ldm, vae_to_ldm

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_dir, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(unet_file), "down_blocks.0.extra_adapter.weight": torch.zeros(2)}, unet_file)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnmappedKeyError, match="down_blocks.0.extra_adapter"):
        pipeline_to_single_file(folder, out, "fp16")
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.tmp-*"))
    with pytest.raises(UnmappedKeyError, match="VAE key"):
        vae_to_ldm({"decoder.mid_block.attentions.0.to_x.weight": torch.zeros(1)}, {"up_block_types": [1]})
    with pytest.raises(UnmappedKeyError, match="OpenCLIP key"):
        open_clip_to_ldm({"text_model.encoder.layers.0.adapter.weight": torch.zeros(1)})
