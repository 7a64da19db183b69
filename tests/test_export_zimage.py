"""Stage export on the tiny RANDOM Z-Image: the LoRA in ComfyUI's Z-Image keys that diffusers' load_lora_weights
renders identically, the full fine-tune as one ComfyUI-layout diffusion model that converts back exactly, the
16-channel VAE, headers and card.

Reference for ComfyUI's names (read, not copied; the Z-Image parts of Comfy-Org/ComfyUI):
- comfy/utils.py `z_image_to_diffusers` @ 09708eae709a992a5684bed3595ce4d07e705b4e
- comfy/lora.py `model_lora_keys_unet`, Lumina2 branch @ ec93dcacb96b922f7cb1417b3ba22bccb082df32
- comfy/model_detection.py, Lumina 2 / Z image branch @ 0b61ce5baa9ea03d8484729b7eb00e77c6fca227
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import Project
from zimage_outputs import lora_transformer, make_full_run, make_lora_run, tiny_zimage

DIM, LAYERS, REFINERS = 64, 2, 1  # the tiny transformer's dim, n_layers, n_refiner_layers


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


def run_export(root: Path, trained: Path, out: Path, **settings):
    from tuneline.stages.export.stage import run

    params = Project(root).params(model={"base": "tiny-zimage"}, export={"name": "demo", **settings})
    return run(params, root, trained, root / "renders", out)


def render(lora: Path | None = None, weight_name: str | None = None, seed: int = 3) -> torch.Tensor:
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(tiny_zimage())
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(lora, weight_name=weight_name)
    return pipeline("alf, a red thing", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                    output_type="pt", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_exported_lora_renders_identically_in_diffusers(tmp_path, alpha):
    """alpha == rank and alpha = 2 * rank: diffusers folds alpha / rank (a power of two) into the weights exactly."""
    make_lora_run(tmp_path / "models/train", rank=4, alpha=alpha, feed_forward=True)
    report = run_export(tmp_path, tmp_path / "models/train", tmp_path / "export")
    exported = tmp_path / "export/demo.safetensors"
    trained = render(tmp_path / "models/train", "pytorch_lora_weights.safetensors")
    assert (trained - render()).abs().max() > 0.01  # the LoRA changes the image
    assert torch.equal(render(exported), trained)
    with safe_open(exported, "pt") as handle:
        header = handle.metadata()
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
    assert alphas == {alpha}
    assert header["modelspec.architecture"] == "Z-Image/lora"
    assert header["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
    assert "modelspec.prediction_type" not in header
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", str(alpha))
    assert header["tuneline.data_digest"] == "d" * 64 and header["tuneline.git_commit"]
    assert "lora_adapter_metadata" not in header  # with .alpha keys diffusers would scale twice
    assert report.extra["family"] == "zimage" and report.computed == 1
    card = (tmp_path / "export/README.md").read_text()
    assert "Fine-tuned Z-Image" in card and "models/loras" in card and "tiny-zimage" in card


def test_lora_with_other_alpha_renders_within_rounding(tmp_path):
    from tuneline.models.zimage.export import export_zimage_lora

    make_lora_run(tmp_path / "train", rank=4, alpha=3.0)
    export_zimage_lora(tmp_path / "train", tmp_path / "z.safetensors", {})
    trained = render(tmp_path / "train", "pytorch_lora_weights.safetensors")
    assert (render(tmp_path / "z.safetensors") - trained).abs().max() < 1e-4


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


def test_full_fine_tune_single_file_is_comfyuis_layout_and_converts_back_exactly(tmp_path):
    from diffusers import ZImageTransformer2DModel

    from tuneline.models.zimage.export import comfy_to_transformer

    make_full_run(tmp_path / "models/train", seed=4)
    run_export(tmp_path, tmp_path / "models/train", tmp_path / "export", dtype="fp32", vae=True)
    path = tmp_path / "export/demo.safetensors"
    tensors = load_file(path)
    trained = ZImageTransformer2DModel.from_pretrained(tmp_path / "models/train/pipeline", subfolder="transformer")
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
    # diffusers' own single-file reader of this layout gives the same transformer
    loaded = ZImageTransformer2DModel.from_single_file(str(path), config=str(tiny_zimage()), subfolder="transformer",
                                                       local_files_only=True, torch_dtype=torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == "Z-Image"
    assert header["tuneline.random_tiny_model"] == "true" and header["tuneline.trained_components"] == "transformer"
    # the 16-channel VAE in the ae.safetensors layout ComfyUI's VAE loader reads (no quant convs)
    vae = load_file(tmp_path / "export/demo_vae.safetensors")
    assert vae["decoder.conv_in.weight"].shape[1] == 16 and not [k for k in vae if "quant_conv" in k]
    with safe_open(tmp_path / "export/demo_vae.safetensors", "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "Z-Image/vae"
    card = (tmp_path / "export/README.md").read_text()
    assert "models/diffusion_models" in card and "Z-Image" in card


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
