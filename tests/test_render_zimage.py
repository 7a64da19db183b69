"""Stage render on the tiny RANDOM Z-Image: ZImagePipeline base vs trained (LoRA and full) from the same
seeds, its defaults and sampler rules, the cache kept apart from SDXL's, transfer through
ZImageImg2ImgPipeline, and the live-evaluation pipeline built from training modules."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import Project, packed_photo
from tuneline.core.params import ParamsError
from zimage_outputs import lora_transformer, make_full_run, make_lora_run, tiny_zimage

PROMPTS = {"defaults": {"size": "32x32", "steps": 2, "guidance_scale": 2.0},
           "prompts": ["alf, a red thing", {"prompt": "bet, a photo", "seed": 9, "guidance_scale": 0.0}]}


def zimage_params(project: Project, **render):
    return project.params(model={"base": "tiny-zimage"},
                          render={"height": 32, "width": 32, "sheet_tile": 32, **render})


def as_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """render end to end on a Z-Image LoRA run (no latents: no transfer, no diagnostics), run twice."""
    from tuneline.stages.render.stage import run as run_render

    project = Project(tmp_path_factory.mktemp("zimage-render"))
    (project.root / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS), "utf-8")
    params = zimage_params(project)
    make_lora_run(project.root / "models/train")
    first = run_render(params, project.root, project.root / "models/train", project.root / "renders",
                       project.root / "metrics")
    again = run_render(params, project.root, project.root / "models/train", project.root / "renders",
                       project.root / "metrics")
    return project, params, first, again


def test_lora_render_differs_from_base_is_cached_and_has_a_contact_sheet(rendered):
    project, _, first, again = rendered
    renders = project.root / "renders"
    for i in (0, 1):
        base, final = as_array(renders / f"base/{i}.png"), as_array(renders / f"final/{i}.png")
        assert base.shape == final.shape == (32, 32, 3)
        assert np.abs(base - final).mean() > 1.0  # the LoRA changes the image
    assert (renders / "contact_sheet.png").is_file()
    assert first.computed == 4 and first.extra["family"] == "zimage" and first.extra["mean_abs_diff_vs_base"] > 1
    assert (again.computed, again.reused) == (0, 4)  # nothing rendered twice
    assert not (renders / "diagnostics.png").exists()
    assert any("Z-Image has no diagnostic sheet" in w and "cross-attention" in w for w in first.warnings)
    assert json.loads((renders / "final/weights.json").read_text())["lora_scale"] == 1.0


def test_render_is_deterministic_and_equals_the_pipeline_with_load_lora_weights(rendered):
    """The stage's final image is ZImagePipeline + load_lora_weights at the same seed, pixel for pixel."""
    from diffusers import ZImagePipeline

    project, *_ = rendered
    pipeline = ZImagePipeline.from_pretrained(tiny_zimage())
    pipeline.load_lora_weights(project.root / "models/train", weight_name="pytorch_lora_weights.safetensors")
    image = pipeline("bet, a photo", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(9)).images[0]
    assert np.array_equal(np.asarray(image, dtype=np.int16), as_array(project.root / "renders/final/1.png"))


def test_full_fine_tune_renders_the_trained_transformer(tmp_path):
    from tuneline.stages.render.generate import apply_trained, load_base_pipeline

    make_full_run(tmp_path / "models/train", seed=3)
    project = Project(tmp_path)
    params = zimage_params(project)
    pipeline = load_base_pipeline(params.model, tmp_path, "cpu", "fp32")
    assert type(pipeline).__name__ == "ZImagePipeline"
    before = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    applied = apply_trained(pipeline, tmp_path / "models/train")
    from diffusers import ZImageTransformer2DModel

    saved = ZImageTransformer2DModel.from_pretrained(tmp_path / "models/train/pipeline", subfolder="transformer")
    after = pipeline.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.state_dict().items())
    assert not all(torch.equal(after[k], before[k]) for k in before)
    assert "transformer" in applied.loaded[0]


def test_zimage_defaults_samplers_and_sizes(tmp_path):
    from diffusers import ZImagePipeline

    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.config import RenderConfig
    from tuneline.stages.render.prompts import load_prompts

    signature = inspect.signature(ZImagePipeline.__call__).parameters
    zimage, sdxl_family = FAMILIES["zimage"], FAMILIES["sdxl"]
    family = zimage.render
    assert (family.steps, family.guidance_scale) == (signature["num_inference_steps"].default,
                                                      signature["guidance_scale"].default)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(["a", {"prompt": "b", "steps": 3, "guidance_scale": 0.0}]), "utf-8")
    config = RenderConfig(height=32, width=48)
    first, second = load_prompts(path, config, zimage)
    assert (first.steps, first.guidance_scale, second.steps, second.guidance_scale) == (50, 5.0, 3, 0.0)
    sdxl = load_prompts(path, config, sdxl_family)[0]
    assert (sdxl.steps, sdxl.guidance_scale) == (30, 6.0)  # SDXL's defaults unchanged
    assert load_prompts(path, RenderConfig(height=32, width=48, steps=4, guidance_scale=1.5), zimage)[0].steps == 4
    with pytest.raises(ParamsError, match="flow-match Euler"):
        load_prompts(path, RenderConfig(sampler="dpmpp_2m", height=32, width=32), zimage)
    with pytest.raises(ParamsError, match="Karras"):
        load_prompts(path, RenderConfig(karras=True, height=32, width=32), zimage)
    with pytest.raises(ParamsError, match="multiples of 16"):
        load_prompts(path, RenderConfig(height=40, width=32), zimage)
    load_prompts(path, RenderConfig(height=40, width=32), sdxl_family)  # fine for SDXL


def test_scheduler_is_the_flow_match_euler_of_the_base():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.samplers import build_scheduler

    config = FlowMatchEulerDiscreteScheduler.load_config(tiny_zimage(), subfolder="scheduler")
    scheduler = build_scheduler("euler", config, False, FAMILIES["zimage"])
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler and scheduler.config.shift == config["shift"]
    with pytest.raises(ParamsError, match="not available for zimage"):
        build_scheduler("heun", config, False, FAMILIES["zimage"])


def test_cache_keys_differ_between_families(tmp_path):
    from tuneline.stages.render.cache import ImageCache
    from tuneline.stages.render.prompts import RenderPrompt

    prompt = RenderPrompt(0, "a", "", 0, 32, 32, 2, 1.0, "euler", False)
    weights = {"base": {"model.base": "same"}}
    sdxl = ImageCache(tmp_path, weights, "cpu", "fp32", "StableDiffusionXLPipeline")
    zimage = ImageCache(tmp_path, weights, "cpu", "fp32", "ZImagePipeline")
    assert sdxl.key(prompt) != zimage.key(prompt)


def test_transfer_through_zimage_img2img(tmp_path):
    from diffusers import ZImagePipeline

    from tuneline.stages.render.transfer import TransferJob, TransferSource, render_transfer

    pipeline = ZImagePipeline.from_pretrained(tiny_zimage())
    pipeline.set_progress_bar_config(disable=True)
    a = TransferSource("alpha", "alf", "alf, a red thing", tmp_path, packed_photo(tmp_path, "a", (40, 36), seed=1), "a")
    b = TransferSource("beta", "bet", "bet, a blue thing", tmp_path, packed_photo(tmp_path, "b", (32, 32), seed=2), "b")
    jobs = [TransferJob(a, b), TransferJob(b, a)]
    paths = render_transfer(pipeline, jobs, lambda job: tmp_path / "out" / job.name, strength=0.6, steps=2,
                            guidance_scale=2.0, sampler="euler", karras=False, seed=0)
    assert [p.name for p in paths] == ["alpha_to_beta.png", "beta_to_alpha.png"]
    with Image.open(paths[0]) as first:
        assert first.size == (32, 32)  # cropped to multiples of 16
    again = render_transfer(pipeline, jobs[:1], lambda job: tmp_path / "again" / job.name, strength=0.6, steps=2,
                            guidance_scale=2.0, sampler="euler", karras=False, seed=0)
    assert np.array_equal(as_array(again[0]), as_array(paths[0]))
    with pytest.raises(ParamsError, match="flow-match Euler"):
        render_transfer(pipeline, jobs[:1], lambda job: tmp_path / "x.png", strength=0.6, steps=2,
                        guidance_scale=2.0, sampler="ddim", karras=False, seed=0)


def test_pipeline_from_training_shares_the_live_transformer(tmp_path):
    """The live samples' pipeline: the training transformer (PEFT LoRA on), the adapter's encoder and
    tokenizer; its image equals the saved LoRA loaded into a fresh ZImagePipeline."""
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoTokenizer, Qwen3Model

    from tuneline.models.config import ModelConfig
    from tuneline.stages.render.generate import pipeline_from_training

    transformer, config = lora_transformer(seed=5)
    encoder = Qwen3Model.from_pretrained(tiny_zimage(), subfolder="text_encoder")
    adapter = SimpleNamespace(family="zimage", model_config=ModelConfig(base="tiny-zimage"), root=tmp_path,
                              tokenizers=[AutoTokenizer.from_pretrained(tiny_zimage(), subfolder="tokenizer")],
                              ensure_text_encoders=lambda device: [encoder])
    live = pipeline_from_training(adapter, {"transformer": transformer})
    assert type(live).__name__ == "ZImagePipeline" and live.transformer is transformer
    kwargs = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.0)
    image = live("alf", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    ZImagePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=config.to_dict())
    fresh = ZImagePipeline.from_pretrained(tiny_zimage())
    fresh.load_lora_weights(tmp_path / "lora")
    reference = fresh("alf", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_a_shared_prompts_file_with_sdxl_samplers_renders_with_zimages_euler(caplog):
    """The demo's prompts.yaml names SDXL samplers per prompt: Z-Image renders those prompts with its
    flow-match Euler and says so; render.sampler set to an SDXL sampler is still refused (above)."""
    import logging

    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.config import RenderConfig
    from tuneline.stages.render.prompts import load_prompts

    repo = Path(__file__).resolve().parents[1]
    with caplog.at_level(logging.WARNING, logger="tuneline"):
        prompts = load_prompts(repo / "prompts.yaml", RenderConfig(height=64, width=64), FAMILIES["zimage"])
    assert [(p.sampler, p.karras) for p in prompts] == [("euler", False)] * 3
    warned = [r.getMessage() for r in caplog.records if "not available for zimage" in r.getMessage()]
    assert len(warned) == 2 and "dpmpp_2m with karras" in warned[0] and "euler_a" in warned[1]
    sdxl = load_prompts(repo / "prompts.yaml", RenderConfig(height=64, width=64), FAMILIES["sdxl"])
    assert [(p.sampler, p.karras) for p in sdxl] == [("euler", False), ("dpmpp_2m", True), ("euler_a", False)]
