"""Stage export on a trained tiny RANDOM SDXL: kohya LoRA and single file, loaded by diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import train_params


def trained(latents_project, tmp_path, **settings):
    from tuneline.stages.train.stage import run as run_train

    params = train_params(latents_project, **settings)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_train(params, latents_project.root, latents_project.root / "data/latents", tmp_path / "models/train",
              checkpoint_dir=tmp_path / "checkpoints")
    return params


def export(latents_project, tmp_path, params, **export_settings):
    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run as run_export

    data = {**params.model_dump(mode="json"), "export": {"name": "demo", **export_settings}}
    params = validate_params(data)
    return params, run_export(params, latents_project.root, tmp_path / "models/train", tmp_path / "renders",
                              tmp_path / "export")


def test_lora_export_header_card_copy_and_diffusers_load(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from tuneline.models.ref import resolve_model

    params = trained(latents_project, tmp_path, lora={"rank": 4, "alpha": 2.0}, ema={"enabled": True, "decay": 0.5})
    params, report = export(latents_project, tmp_path, params, copy_to=[str(tmp_path / "comfy/loras")])
    path = tmp_path / "export/demo.safetensors"
    state = json.loads((tmp_path / "models/train/trainer_state.json").read_text())
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
        alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2.0"
    assert header["modelspec.trigger_phrase"] == "alf, bet"
    assert header["tuneline.data_digest"] == state["data_digest"]
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["tuneline.weights"] == "ema"  # the run kept EMA weights and export.use_ema is on
    assert (tmp_path / "comfy/loras/demo.safetensors").read_bytes() == path.read_bytes()
    card = (tmp_path / "export/README.md").read_text()
    assert "RANDOM" in card and "`alf` (alpha)" in card
    # The real client: the kohya file renders what the diffusers-format result renders.
    images = []
    for lora in (path, tmp_path / "models/train/ema"):
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny-sdxl"))
        pipe.load_lora_weights(lora)
        images.append(pipe("alf, a thing", num_inference_steps=2, height=64, width=64, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    assert torch.allclose(images[0], images[1], atol=1e-5)


@pytest.mark.slow
def test_full_export_is_a_single_file_diffusers_loads_with_identical_unet(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tuneline.models.ref import resolve_model

    params = trained(latents_project, tmp_path, mode="full")
    export(latents_project, tmp_path, params, dtype="fp32")
    loaded = StableDiffusionXLPipeline.from_single_file(tmp_path / "export/demo.safetensors",
                                                        config=str(resolve_model("tiny-sdxl")), local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "models/train/pipeline/unet")
    original = unet.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.unet.state_dict().items())
