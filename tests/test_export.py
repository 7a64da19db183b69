"""Exports checked against real clients, for every model family: diffusers loads each family's LoRA and
single-file export back to what was trained (render for render, weight for weight), through the export
stage and the family's exporter. Then each family's own layout: the kohya LoRA and single-file SDXL
checkpoint, Z-Image's LoRA and diffusion model in ComfyUI's names.

Tiny RANDOM models only; weights and renders must match the diffusers-format originals exactly.

Reference for ComfyUI's Z-Image names (read, not copied; the Z-Image parts of Comfy-Org/ComfyUI):
- comfy/utils.py `z_image_to_diffusers` @ 09708eae709a992a5684bed3595ce4d07e705b4e
- comfy/lora.py `model_lora_keys_unet`, Lumina2 branch @ ec93dcacb96b922f7cb1417b3ba22bccb082df32
- comfy/model_detection.py, Lumina 2 / Z image branch @ 0b61ce5baa9ea03d8484729b7eb00e77c6fca227
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import Project
from zimage_outputs import lora_transformer, make_full_run, make_lora_run, tiny_zimage

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
DIM, LAYERS, REFINERS = 64, 2, 1  # the tiny Z-Image transformer's dim, n_layers, n_refiner_layers


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


def render_zimage(lora: Path | None = None, weight_name: str | None = None, seed: int = 3) -> torch.Tensor:
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(tiny_zimage())
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(lora, weight_name=weight_name)
    return pipeline("alf, a red thing", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                    output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def run_export(root: Path, base: str, trained: Path, out: Path, **settings):
    from tuneline.stages.export.stage import run

    params = Project(root).params(model={"base": base}, export={"name": "demo", **settings})
    return run(params, root, trained, root / "renders", out)


def write_sdxl_state(out_dir: Path, **train: Any) -> None:
    """trainer_state.json of an SDXL run, as the train stage writes it (the fields export reads)."""
    from tuneline.train.config import TrainConfig

    state = {"step": 2, "epoch": 1, "seed": 7, "data_digest": "d" * 64, "family": "sdxl", "run_key": "sdxl-test",
             "train_config": TrainConfig(num_steps=2, seed=7, **train).model_dump(mode="json"),
             "model": {"base": "tiny-sdxl"}, "random_tiny_model": True, "prediction_type": "epsilon",
             "mlflow_run_id": PROVENANCE["mlflow_run_id"]}
    (Path(out_dir) / "trainer_state.json").write_text(json.dumps(state), "utf-8")


# --- the SDXL LoRA of the kohya tests and the SDXL LoRA round trip --------------------------------------

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


# --- every family: the LoRA and the full fine-tune, exported by the stage, read back by diffusers ---------

@dataclass(frozen=True)
class LoraCase:
    """A family's LoRA round trip: a trained run's LoRA, exported by the stage, rendered in diffusers."""

    family: str
    base: str
    make_run: Callable[[pytest.FixtureRequest, Path], None]  # writes models/train: the LoRA and trainer_state.json
    render: Callable[[Path | None], torch.Tensor]  # the base in diffusers with this LoRA (None: none)
    same: Callable[[torch.Tensor, torch.Tensor], bool]  # how exactly the exported LoRA renders the trained one
    check: Callable[[Path, Path, dict[str, str]], None]  # the family's own assertions on its file and header
    card: tuple[str, ...]  # what the model card says


def sdxl_lora_run(request: pytest.FixtureRequest, folder: Path) -> None:
    """The module's random PEFT LoRA (UNet + both text encoders, conv layers, proj_in alpha 8) as a run's result."""
    diffusers_dir, _ = request.getfixturevalue("lora_files")
    folder.mkdir(parents=True)
    shutil.copy(diffusers_dir / "pytorch_lora_weights.safetensors", folder)
    write_sdxl_state(folder, lora={"rank": RANK, "alpha": ALPHA, "targets": "all"}, text_encoder_1={"mode": "lora"},
                     text_encoder_2={"mode": "lora"})


def sdxl_render(lora: Path | None) -> torch.Tensor:
    from tuneline.models.ref import resolve_model

    pipe = load_pipe(Path(resolve_model("tiny-sdxl")))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return torch.from_numpy(render(pipe))


def sdxl_lora_check(trained: Path, exported: Path, header: dict[str, str]) -> None:
    """Fused in diffusers, the kohya file gives the trained LoRA's weights: alpha / rank scales, conv LoRAs, text encoders."""
    from tuneline.models.ref import resolve_model

    tiny_dir = Path(resolve_model("tiny-sdxl"))
    base = weights(load_pipe(tiny_dir))
    results = []
    for source in (trained, exported):
        pipe = load_pipe(tiny_dir)
        pipe.load_lora_weights(str(source))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights
        results.append(weights(pipe))
    fused_a, fused_b = results
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert fused_a[component].keys() == fused_b[component].keys() == base[component].keys()
        for key, value in fused_a[component].items():
            assert torch.allclose(value, fused_b[component][key], atol=1e-6, rtol=1e-5), (component, key)
    # The LoRA really applied, with alpha/rank: W + (2/4) B A; proj_in W + (8/4) B A.
    lora = load_file(trained / "pytorch_lora_weights.safetensors")
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
    alphas = {k: v.item() for k, v in load_file(exported).items() if k.endswith(".alpha")}
    assert {v for k, v in alphas.items() if "_proj_in." in k} == {PROJ_IN_ALPHA}
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["ss_base_model_version"]) == (
        "4", "2.0", "sdxl_base_v1-0")
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def zimage_lora_run(alpha: float) -> Callable[[pytest.FixtureRequest, Path], None]:
    def make(request: pytest.FixtureRequest, folder: Path) -> None:
        make_lora_run(folder, rank=4, alpha=alpha, feed_forward=True)
    return make


def zimage_render(lora: Path | None) -> torch.Tensor:
    from tuneline.train.output import LORA_FILE

    if lora is None:
        return render_zimage()
    return render_zimage(lora, LORA_FILE if lora.is_dir() else None)


def zimage_lora_check(alpha: float) -> Callable[[Path, Path, dict[str, str]], None]:
    def check(trained: Path, exported: Path, header: dict[str, str]) -> None:
        with safe_open(exported, "pt") as handle:
            alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
        assert alphas == {alpha}
        assert header["modelspec.architecture"] == "Z-Image/lora"
        assert header["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
        assert "modelspec.prediction_type" not in header
        assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", str(alpha))
        assert "lora_adapter_metadata" not in header  # with .alpha keys diffusers would scale twice
    return check


LORA_CASES = {
    "sdxl": LoraCase("sdxl", "tiny-sdxl", sdxl_lora_run, sdxl_render,
                     lambda a, b: torch.allclose(a, b, atol=1e-6), sdxl_lora_check,
                     ("Fine-tuned SDXL", "models/loras", "tiny-sdxl", "kohya LoRA of the UNet and text encoder 1")),
    # alpha == rank and alpha = 2 * rank: diffusers folds alpha / rank (a power of two) into the weights exactly.
    **{f"zimage-alpha{alpha:g}": LoraCase("zimage", "tiny-zimage", zimage_lora_run(alpha), zimage_render, torch.equal,
                                          zimage_lora_check(alpha), ("Fine-tuned Z-Image", "models/loras", "tiny-zimage"))
       for alpha in (4.0, 8.0)},
}


@pytest.mark.parametrize("name", LORA_CASES)
def test_exported_lora_renders_what_the_trained_lora_renders(tiny_dir, tmp_path, request, name):
    case = LORA_CASES[name]
    trained = tmp_path / "models/train"
    case.make_run(request, trained)
    report = run_export(tmp_path, case.base, trained, tmp_path / "export")
    exported = tmp_path / "export/demo.safetensors"
    image = case.render(trained)
    assert (image - case.render(None)).abs().max() > 0.01  # the LoRA changes the image
    assert case.same(case.render(exported), image)
    with safe_open(exported, "pt") as handle:
        header = handle.metadata()
    assert header["tuneline.data_digest"] == "d" * 64 and header["tuneline.git_commit"]
    assert report.extra["family"] == case.family and report.computed == 1
    card = (tmp_path / "export/README.md").read_text()
    assert all(words in card for words in case.card), [words for words in case.card if words not in card]
    case.check(trained, exported, header)


@dataclass(frozen=True)
class FullCase:
    """A family's full fine-tune: models/train/pipeline exported by the stage as one file, read back by
    diffusers' own single-file reader."""

    family: str
    base: str
    dtype: str
    make_run: Callable[[Path], None]  # writes models/train: pipeline/ and trainer_state.json
    trained: Callable[[Path], dict[str, dict[str, torch.Tensor]]]  # component -> weights of pipeline/
    load: Callable[[Path, Path], dict[str, dict[str, torch.Tensor]]]  # the file read back by diffusers
    architecture: str
    check: Callable[[Path, dict[str, torch.Tensor], dict[str, str]], None]  # the family's own layout assertions
    vae: bool = False


def sdxl_full_run(folder: Path) -> None:
    from tuneline.models.ref import resolve_model

    shutil.copytree(resolve_model("tiny-sdxl"), folder / "pipeline")
    write_sdxl_state(folder, mode="full")


def sdxl_single_file(path: Path, pipeline_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(pipeline_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return weights(pipe)


def sdxl_full_check(dtype: str) -> Callable[[Path, dict[str, torch.Tensor], dict[str, str]], None]:
    def check(path: Path, stored: dict[str, torch.Tensor], header: dict[str, str]) -> None:
        from diffusers import StableDiffusionXLPipeline

        from tuneline.models.ref import resolve_model

        assert header["tuneline.mlflow_run_id"] == "run42"
        prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                    "conditioner.embedders.1.model.")
        assert all(k.startswith(prefixes) for k in stored)
        assert {v.dtype for v in stored.values()} == {torch.float32 if dtype == "fp32" else torch.float16}
        assert stored["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
        assert stored["conditioner.embedders.1.model.text_projection"].shape == (64, 32)  # x @ P: hidden x proj
        assert stored["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
        assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in stored
        assert "v_pred" not in stored and "ztsnr" not in stored  # an epsilon model carries no prediction markers
        if dtype == "fp32":
            tiny = Path(resolve_model("tiny-sdxl"))
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny), local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            assert (render(pipe) == render(load_pipe(tiny))).all()
    return check


def zimage_full_run(folder: Path) -> None:
    make_full_run(folder, seed=4)


def zimage_trained(pipeline_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import ZImageTransformer2DModel

    return {"transformer": ZImageTransformer2DModel.from_pretrained(pipeline_dir, subfolder="transformer").state_dict()}


def zimage_single_file(path: Path, pipeline_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import ZImageTransformer2DModel

    loaded = ZImageTransformer2DModel.from_single_file(str(path), config=str(tiny_zimage()), subfolder="transformer",
                                                       local_files_only=True, torch_dtype=torch.float32)
    return {"transformer": loaded.state_dict()}


def zimage_full_check(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """ComfyUI's names (detection keys, fused qkv, LoRA targets), our inverse back to the trained transformer,
    the 16-channel VAE in the ae.safetensors layout, the card."""
    from diffusers import ZImageTransformer2DModel

    from tuneline.models.zimage.export import comfy_to_transformer

    root = path.parents[1]
    trained = ZImageTransformer2DModel.from_pretrained(root / "models/train/pipeline", subfolder="transformer")
    expected = trained.state_dict()
    # ComfyUI's detection keys of Lumina 2 / Z-Image, and only ComfyUI names (no diffusers-only ones)
    assert {"cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight", "cap_pad_token", "x_pad_token",
            "x_embedder.weight", "final_layer.linear.weight", "layers.1.attention.qkv.weight"} <= set(tensors)
    assert not [k for k in tensors if ".to_q." in k or "all_x_embedder" in k or ".norm_q." in k or
                k.startswith(("model.", "diffusion_model."))]
    targets = {target for target, _ in comfy_lora_key_map().values()}
    assert targets <= set(tensors)
    assert tensors["layers.0.attention.qkv.weight"].shape == (3 * DIM, DIM)
    back = comfy_to_transformer(tensors, dict(trained.config))
    assert back.keys() == expected.keys() and all(torch.equal(back[k], v) for k, v in expected.items())
    assert header["tuneline.trained_components"] == "transformer"
    # the 16-channel VAE in the ae.safetensors layout ComfyUI's VAE loader reads (no quant convs)
    vae = load_file(root / "export/demo_vae.safetensors")
    assert vae["decoder.conv_in.weight"].shape[1] == 16 and not [k for k in vae if "quant_conv" in k]
    with safe_open(root / "export/demo_vae.safetensors", "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "Z-Image/vae"
    card = (root / "export/README.md").read_text()
    assert "models/diffusion_models" in card and "Z-Image" in card


FULL_CASES = {
    **{f"sdxl-{dtype}": FullCase("sdxl", "tiny-sdxl", dtype, sdxl_full_run, lambda folder: weights(load_pipe(folder)),
                                 sdxl_single_file, "stable-diffusion-xl-v1-base", sdxl_full_check(dtype))
       for dtype in ("fp32", "fp16")},
    "zimage-fp32": FullCase("zimage", "tiny-zimage", "fp32", zimage_full_run, zimage_trained, zimage_single_file, "Z-Image", zimage_full_check, vae=True),
}


@pytest.mark.parametrize("name", FULL_CASES)
def test_full_fine_tune_single_file_reads_back_exactly(tiny_dir, tmp_path, name):
    case = FULL_CASES[name]
    case.make_run(tmp_path / "models/train")
    run_export(tmp_path, case.base, tmp_path / "models/train", tmp_path / "export", dtype=case.dtype, vae=case.vae)
    path = tmp_path / "export/demo.safetensors"
    stored = load_file(path)
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == case.architecture
    assert header["tuneline.random_tiny_model"] == "true"
    pipeline_dir = tmp_path / "models/train/pipeline"
    trained, loaded = case.trained(pipeline_dir), case.load(path, pipeline_dir)
    for component, tensors in trained.items():
        assert loaded[component].keys() == tensors.keys(), component
        for key, value in tensors.items():
            expected = value if case.dtype == "fp32" else value.half()
            assert torch.equal(loaded[component][key].to(expected.dtype), expected), (component, key)
    case.check(path, stored, header)


# --- SDXL: the kohya LoRA and the single-file checkpoint --------------------------------------------

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


# --- Z-Image: the LoRA and the diffusion model in ComfyUI's names --------------------------------------

def comfy_lora_key_map() -> dict[str, tuple[str, tuple[int, int] | None]]:
    """ComfyUI's LoRA key map for a Lumina2/Z-Image model of the tiny sizes, as its code builds it: each
    diffusers module of `z_image_to_diffusers` (blocks layers.N, context_refiner.N, noise_refiner.N; the
    context refiner has no adaLN) under `diffusion_model.` -> (ComfyUI weight, (row offset, rows) of a slice
    of the fused qkv, or None for the whole weight)."""
    key_map = {}
    blocks = [(f"layers.{i}", True) for i in range(LAYERS)] + [(f"context_refiner.{i}", False)
                                                             for i in range(REFINERS)]
    blocks += [(f"noise_refiner.{i}", True) for i in range(REFINERS)]
    for block, adaln in blocks:
        for index, name in enumerate(("to_q", "to_k", "to_v")):
            key_map[f"{block}.attention.{name}"] = (f"{block}.attention.qkv.weight", (index * DIM, DIM))
        same = {"attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
                "attention.norm_k": "attention.k_norm", "attention_norm1": "attention_norm1",
                "attention_norm2": "attention_norm2", "feed_forward.w1": "feed_forward.w1",
                "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
                "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}
        if adaln:
            same["adaLN_modulation.0"] = "adaLN_modulation.0"
        key_map.update({f"{block}.{d}": (f"{block}.{c}.weight", None) for d, c in same.items()})
    for d, c in (("all_final_layer.2-1.linear", "final_layer.linear"),
                 ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
                 ("all_x_embedder.2-1", "x_embedder"), ("cap_embedder.0", "cap_embedder.0"),
                 ("cap_embedder.1", "cap_embedder.1"), ("t_embedder.mlp.0", "t_embedder.mlp.0"),
                 ("t_embedder.mlp.2", "t_embedder.mlp.2")):
        key_map[d] = (f"{c}.weight", None)
    return {f"diffusion_model.{k}": v for k, v in key_map.items()}


def test_lora_with_other_alpha_renders_within_rounding(tmp_path):
    from tuneline.models.zimage.export import export_zimage_lora

    make_lora_run(tmp_path / "train", rank=4, alpha=3.0)
    export_zimage_lora(tmp_path / "train", tmp_path / "z.safetensors", {})
    trained = render_zimage(tmp_path / "train", "pytorch_lora_weights.safetensors")
    assert (render_zimage(tmp_path / "z.safetensors") - trained).abs().max() < 1e-4


def test_lora_keys_are_comfyuis_and_its_fused_qkv_patch_equals_the_peft_delta(tmp_path):
    """Every exported module is a key of ComfyUI's Z-Image LoRA map; applying the file the way ComfyUI does
    (weight.narrow(0, offset, rows) += alpha / rank * up @ down on the fused checkpoint) and converting back
    equals the PEFT-merged transformer."""
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    from tuneline.models.zimage.export import comfy_to_transformer, export_zimage_lora, transformer_to_comfy

    transformer, config = lora_transformer(rank=4, alpha=6.0, feed_forward=True, seed=2)
    ZImagePipeline.save_lora_weights(tmp_path / "train", transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=config.to_dict())
    export_zimage_lora(tmp_path / "train", tmp_path / "z.safetensors", {})
    lora = load_file(tmp_path / "z.safetensors")
    key_map = comfy_lora_key_map()
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert len(modules) == 7 * (LAYERS + 2 * REFINERS)  # q, k, v, out, w1, w2, w3 in every block
    assert modules <= set(key_map), sorted(modules - set(key_map))
    assert set(lora) == {f"{m}.{part}" for m in modules for part in ("lora_A.weight", "lora_B.weight", "alpha")}

    base_config = dict(transformer.config)
    transformer.disable_adapters()
    base = {k.replace(".base_layer", ""): v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}
    transformer.enable_adapters()
    comfy = {k: v.clone() for k, v in transformer_to_comfy(base, base_config).items()}  # patched in place below
    assert set(comfy) >= {target for target, _ in key_map.values()}  # every map target is a checkpoint weight
    for module in modules:
        target, rows = key_map[module]
        down, up, alpha = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"], lora[f"{module}.alpha"]
        delta = (alpha / down.shape[0]) * (up @ down)
        weight = comfy[target] if rows is None else comfy[target].narrow(0, *rows)
        weight += delta
    patched = comfy_to_transformer(comfy, base_config)
    expected = dict(base)
    for name, module in transformer.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            expected[f"{name}.weight"] = base[f"{name}.weight"] + module.get_delta_weight("default")
    assert patched.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(patched[key], expected[key], rtol=0, atol=1e-6)


def test_default_dtype_and_refusals(tmp_path):
    from tuneline.models.sdxl.sgm_unet import UnmappedKeyError
    from tuneline.models.zimage.export import diffusers_lora_to_comfy, transformer_to_single_file

    make_full_run(tmp_path / "train", seed=1)
    out = transformer_to_single_file(tmp_path / "train/pipeline/transformer", tmp_path / "z.safetensors")
    assert {v.dtype for v in load_file(out).values()} == {torch.float16}
    with pytest.raises(UnmappedKeyError, match="DoRA"):
        diffusers_lora_to_comfy({"transformer.layers.0.attention.to_q.lora_magnitude_vector": torch.ones(3)}, (4, 4))
    with pytest.raises(UnmappedKeyError, match="only a transformer LoRA"):
        diffusers_lora_to_comfy({"text_encoder.layers.0.q_proj.lora_A.weight": torch.ones(4, 3)}, (4, 4))
