"""Stage render on the tiny RANDOM SDXL: samplers, prompts file, base vs trained, sheets, live evaluation."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tuneline.core.params import ParamsError

PROMPTS = {
    "defaults": {"size": "64x64", "steps": 2, "guidance_scale": 3.0},
    "prompts": ["alf, a red thing", {"prompt": "bet, a photo", "sampler": "dpmpp_2m", "karras": True, "seed": 9}],
}
RENDER = {"steps": 2, "sheet_tile": 64, "diagnostic_timesteps": [100, 900], "diagnostic_samples": 2,
          "height": 64, "width": 64}


def render_params(project, **render):
    from tuneline.config import validate_params

    data = {**project.params_data, "render": {**RENDER, **render},
            "train": {"num_steps": 2, "seed": 7, "lr": 1e-2, "checkpoint": {"every_steps": 2, "keep_last": 1}}}
    return validate_params(data)


def prompts_of(project, params):
    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.prompts import load_prompts

    return load_prompts(project.root / params.render.prompts_file, params.render, FAMILIES["sdxl"])


@pytest.fixture(scope="module")
def trained(latents_project):
    """A 2-step LoRA run (lr 1e-2) written to models/train, then the run resumed as a live trainer."""
    from accelerate.state import AcceleratorState

    from tuneline.models.sdxl.adapter import SDXLAdapter
    from tuneline.stages.render.generate import pipeline_from_training
    from tuneline.stages.train.stage import run as run_train
    from tuneline.stages.train.stage import build_trainer

    root = latents_project.root
    (root / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS), "utf-8")
    params = render_params(latents_project)
    AcceleratorState._reset_state(True)
    run_train(params, root, root / "data/latents", root / "models/train", root / "metrics",
              checkpoint_dir=root / "checkpoints/train")
    AcceleratorState._reset_state(True)
    trainer = build_trainer(params, root, root / "data/latents", root / "checkpoints/train",
                            SDXLAdapter(params.model, params.train, root))
    trainer.setup()  # resumes at step 2
    return latents_project, params, trainer, pipeline_from_training(trainer.adapter, trainer.modules)


@pytest.fixture(scope="module")
def rendered(trained):
    """run_render end to end, with one live step written the way the trainer writes it."""
    from tuneline.stages.render.generate import live_evaluate
    from tuneline.stages.render.stage import run as run_render

    project, params, trainer, live = trained
    root = project.root
    live_evaluate(live, prompts_of(project, params), root / "renders/live", step=trainer.state.step)
    report = run_render(params, root, root / "models/train", root / "renders", root / "metrics")
    return project, params, report


# --- samplers -----------------------------------------------------------------------------

EXPECTED = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def test_every_sampler_maps_to_its_scheduler_with_karras_where_supported(tiny_scheduler_config):
    from tuneline.stages.render.samplers import SAMPLER_NAMES, build_scheduler

    assert set(SAMPLER_NAMES) == set(EXPECTED)
    for name, (cls, options) in EXPECTED.items():
        scheduler = build_scheduler(name, tiny_scheduler_config)
        assert type(scheduler).__name__ == cls, name
        assert all(scheduler.config[key] == value for key, value in options.items()), name
        assert scheduler.config["beta_schedule"] == "scaled_linear"  # built from the pipeline's config
        assert scheduler.config.get("use_karras_sigmas", False) is False
        if name in ("euler_a", "ddim"):
            with pytest.raises(ParamsError, match=f"sampler '{name}' has no Karras sigmas; karras works with: euler"):
                build_scheduler(name, tiny_scheduler_config, karras=True)
        else:
            karras = build_scheduler(name, tiny_scheduler_config, karras=True)
            assert type(karras).__name__ == cls and karras.config["use_karras_sigmas"] is True, name
            # a karras config fed back in does not leak into the next plain one
            assert build_scheduler(name, karras.config).config["use_karras_sigmas"] is False


def test_unknown_sampler_is_a_config_error_listing_the_valid_ones(tiny_scheduler_config):
    from tuneline.config import validate_params
    from tuneline.stages.render.samplers import build_scheduler

    with pytest.raises(ParamsError, match="unknown sampler 'eulr'; valid: euler, euler_a, heun, dpmpp_2m, "
                                          "dpmpp_2m_sde, ddim, lms"):
        build_scheduler("eulr", tiny_scheduler_config)
    data = {"datasets": [{"name": "a", "path": "a"}], "render": {"sampler": "eulr"}}
    with pytest.raises(ParamsError, match=r"render.sampler: Input should be 'euler', 'euler_a'"):
        validate_params(data)
    with pytest.raises(ParamsError, match="render: .*'ddim' has no Karras sigmas"):
        validate_params({**data, "render": {"sampler": "ddim", "karras": True}})


@pytest.fixture(scope="module")
def tiny_scheduler_config(tmp_path_factory):
    import os

    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    from diffusers import EulerDiscreteScheduler

    from tuneline.models.ref import resolve_model

    return EulerDiscreteScheduler.load_config(resolve_model("tiny-sdxl"), subfolder="scheduler")


# --- the prompts file ---------------------------------------------------------------------


@pytest.mark.parametrize("data, expected", [
    (["a", {"prompt": "b", "negativ_prompt": "x"}],
     r"prompts\[1\]\.negativ_prompt: unknown key\. Did you mean 'negative_prompt'\? Allowed: negative_prompt, seed"),
    ({"defaults": {"setps": 3}, "prompts": ["a"]}, r"defaults\.setps: unknown key\. Did you mean 'steps'\?"),
    (["a", "b", {"prompt": "c", "size": "1024by640"}],
     r"prompts\[2\]\.size: expected 'WIDTHxHEIGHT' such as '1024x768', got '1024by640'"),
    ([{"prompt": "c", "size": "1020x640"}], r"prompts\[0\]\.size: size 1020x640: both sides must be multiples of 8"),
    (["a", {"prompt": "b", "sampler": "k_euler"}],
     r"prompts\[1\]\.sampler: Input should be 'euler', 'euler_a', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde', 'ddim' or 'lms'"),
    ([{"prompt": "b", "sampler": "ddim", "karras": True}], r"prompts\[0\]\.karras: sampler 'ddim' has no Karras"),
    ([{"prompt": "b", "size": "64x64", "height": 64}], r"prompts\[0\]: set either size or height/width"),
    ({"prompts": []}, r"prompts: List should have at least 1 item"),
])
def test_bad_prompt_files_name_the_file_entry_and_key(tmp_path, data, expected):
    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.config import RenderConfig
    from tuneline.stages.render.prompts import load_prompts

    path = tmp_path / "my_prompts.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    with pytest.raises(ParamsError, match=expected) as error:
        load_prompts(path, RenderConfig(), FAMILIES["sdxl"])
    assert str(error.value).startswith(f"{path} is invalid")


def test_prompt_values_come_from_the_prompt_then_defaults_then_the_render_section(tmp_path):
    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.config import RenderConfig
    from tuneline.stages.render.prompts import load_prompts

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"defaults": {"size": "128x64", "seed": 5, "sampler": "heun"},
                                "prompts": ["a", {"prompt": "b", "height": 32, "seed": 1, "karras": True}]}))
    a, b = load_prompts(path, RenderConfig(steps=3, guidance_scale=2.0), FAMILIES["sdxl"])
    assert (a.width, a.height, a.seed, a.sampler, a.karras) == (128, 64, 5, "heun", False)
    assert (a.steps, a.guidance_scale, a.negative_prompt) == (3, 2.0, "")
    assert (b.width, b.height, b.seed, b.karras, b.index) == (128, 32, 1, True, 1)
    with pytest.raises(ParamsError, match="p.json: prompts file not found"):
        load_prompts(tmp_path / "missing/p.json", RenderConfig(), FAMILIES["sdxl"])


# --- rendering ----------------------------------------------------------------------------


def test_run_render_writes_base_final_sheets_transfer_and_metrics(rendered):
    from tuneline.stages.render.sheets import sheet_size

    project, params, report = rendered
    out = project.root / "renders"
    tile = params.render.sheet_tile
    for i in range(2):
        base, final = Image.open(out / f"base/{i}.png"), Image.open(out / f"final/{i}.png")
        assert base.size == final.size == (64, 64)
        assert not np.array_equal(np.asarray(base), np.asarray(final))  # the trained LoRA changes the image
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(2, 3, tile)  # 2 prompts x (base, step 2, final)
    with Image.open(out / "diagnostics.png") as sheet:
        assert sheet.size == sheet_size(2 * 2, 4, tile)  # samples x timesteps rows, 4 columns
    assert sorted(p.name for p in (out / "transfer").iterdir()) == ["alpha_to_beta.png", "beta_to_alpha.png"]
    metrics = json.loads((project.root / "metrics/render.json").read_text())
    assert sorted(metrics) == ["items", "mean_abs_diff_vs_base"] and metrics["mean_abs_diff_vs_base"] > 0
    assert metrics["items"] == 2 + 2 + 2 + 1  # base, final, transfer images and the diagnostic sheet
    run_report = json.loads((project.root / "reports/render.json").read_text())
    assert run_report["prompts"] == 2 and run_report["live_steps"] == 1 and run_report["transfer_images"] == 2
    assert run_report["random_tiny_model"] is True and run_report["computed"] == 7
    assert any("tiny RANDOM-weight" in w for w in report.warnings)
    shown = json.loads((out / "final/weights.json").read_text())  # what export checks its samples against
    assert (shown["weights"], shown["lora_scale"], len(shown["weights_identity"])) == ("trained", 1.0, 64)


def test_unchanged_weights_and_prompts_render_nothing_again(rendered, tmp_path):
    import yaml as yaml_module

    from tuneline.stages.render.stage import run as run_render

    project, params, first = rendered
    root = project.root
    assert (first.extra["base_rendered"], first.extra["final_rendered"]) == (2, 2)
    assert (first.extra["transfer_rendered"], first.extra["diagnostics_rendered"]) == (2, 1)

    def files(folder):  # the rendered images (live/ is the trainer's; the contact sheet shows it)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")
                if p.relative_to(folder).parts[0] not in ("live", "contact_sheet.png")}

    before = files(root / "renders")
    again = run_render(params, root, root / "models/train", tmp_path / "renders", root / "metrics")
    # Everything from the store, the transfer images and the diagnostic sheet too: no model is loaded.
    assert (again.extra["base_rendered"], again.extra["final_rendered"], again.computed, again.reused) == (0, 0, 0, 7)
    assert (again.extra["transfer_rendered"], again.extra["diagnostics_rendered"]) == (0, 0)
    assert len(before) == 7 and files(tmp_path / "renders") == before  # byte for byte
    # One prompt edited: one base and one trained image are rendered, the other prompt's come from the store.
    prompts = yaml_module.safe_load((root / "prompts.yaml").read_text())
    prompts["prompts"][1]["prompt"] += ", blue"
    (root / "prompts.yaml").write_text(yaml_module.safe_dump(prompts))
    try:
        edited = run_render(params, root, root / "models/train", tmp_path / "edited", root / "metrics")
    finally:
        (root / "prompts.yaml").write_text(yaml_module.safe_dump(PROMPTS))
    assert (edited.extra["base_rendered"], edited.extra["final_rendered"]) == (1, 1)


def test_lora_at_scale_zero_renders_exactly_the_base_images(rendered):
    from tuneline.stages.render.generate import apply_trained, load_base_pipeline, render_prompts

    project, params, _ = rendered
    pipeline = load_base_pipeline(params.model, project.root, "cpu", "fp32")
    applied = apply_trained(pipeline, project.root / "models/train", lora_scale=0.0)
    assert any("scale 0.0" in n for n in applied.loaded) and not applied.warnings
    [path] = render_prompts(pipeline, prompts_of(project, params)[1:], project.root / "scale0", prefix="p")
    assert path.name == "p1.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(project.root / "renders/base/1.png")))


def test_transfer_prompt_swaps_the_trigger_word():
    from tuneline.stages.render.transfer import TransferSource, transfer_prompt

    source = TransferSource("alpha", "alf", "alf, a red thing, number 0", Path("."), {}, "")
    assert transfer_prompt(source, "bet") == "bet, a red thing, number 0"
    assert transfer_prompt(TransferSource("a", "alf", "alf", Path("."), {}, ""), "bet") == "bet"


def test_contact_sheet_grid_and_missing_cells(tmp_path):
    from tuneline.stages.render.prompts import RenderPrompt
    from tuneline.stages.render.sheets import contact_sheet, live_steps, sheet_size

    for folder in ("base", "live/step_000010", "live/step_000002", "final"):
        for i in range(3):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 32), (i * 80, 0, 0)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "final/2.png").unlink()
    steps = live_steps(tmp_path / "nowhere", tmp_path / "live")
    assert [step for step, _ in steps] == [2, 10]
    prompts = [RenderPrompt(i, f"prompt {i}", None, i, 32, 64, 2, 1.0, "euler", False) for i in range(3)]
    columns = [("base", tmp_path / "base"), *[(f"step {s}", f) for s, f in steps], ("final", tmp_path / "final")]
    path = contact_sheet(columns, prompts, tmp_path / "sheet.png", tile=48)
    with Image.open(path) as sheet:
        assert sheet.size == sheet_size(3, 4, 48)


# --- live evaluation ----------------------------------------------------------------------


def test_live_evaluate_leaves_parameters_modes_and_rng_untouched(trained, tmp_path):
    from tuneline.stages.render.generate import live_evaluate

    project, params, trainer, pipeline = trained
    unet = trainer.modules["unet"]
    unet.train()
    list(unet.modules())[3].eval()  # a mixed tree: each flag must come back as it was
    flags = [m.training for m in unet.modules()]
    encoder_flags = [m.training for m in pipeline.text_encoder.modules()]
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()

    paths = live_evaluate(pipeline, prompts_of(project, params)[:1], tmp_path / "live", step=40)

    assert paths == [tmp_path / "live/step_000040/0.png"] and paths[0].is_file()
    assert [m.training for m in unet.modules()] == flags
    assert [m.training for m in pipeline.text_encoder.modules()] == encoder_flags
    after = unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert all(p.grad is None for p in unet.parameters())
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    saved, now = numpy_state, np.random.get_state()
    assert saved[0] == now[0] and np.array_equal(saved[1], now[1]) and saved[2:] == now[2:]
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(123)))


# --- diagnostics --------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_from_a_perfect_prediction_is_the_clean_latent(prediction_type):
    from diffusers import DDPMScheduler

    from tuneline.models.sdxl.diagnostics import predicted_x0

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps][:, None, None, None]
    x0 = predicted_x0(noisy, target, alpha_bar, prediction_type)
    assert torch.allclose(x0, clean, atol=2e-3 if prediction_type == "epsilon" else 1e-5)
    assert torch.allclose(x0[:2], clean[:2], atol=1e-4)


def test_cross_attention_heatmap_is_non_negative_normalised_and_processors_come_back(trained):
    from tuneline.models.sdxl.text import encode_prompts
    from tuneline.models.sdxl.diagnostics import attention_heatmap, recording_cross_attention, token_positions

    _, _, trainer, pipeline = trained
    positions = token_positions(pipeline.tokenizer, "alf, a red thing", "alf")
    assert positions and positions[0] == 1  # right after the start token
    assert token_positions(pipeline.tokenizer, "a red thing", "alf") == []
    unet = pipeline.unet
    before = dict(unet.attn_processors)
    with torch.inference_mode():
        embeds, pooled = encode_prompts([pipeline.tokenizer, pipeline.tokenizer_2],
                                        [pipeline.text_encoder, pipeline.text_encoder_2],
                                        ["alf, a red thing"] * 2, "cpu")
        latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        time_ids = torch.tensor([[64, 96, 0, 0, 64, 96]] * 2, dtype=torch.float32)
        with recording_cross_attention(unet, positions) as maps:
            unet(latents, torch.tensor([500, 500]), embeds,
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    attn2_layers = sum(".attn2." in name for name in before)
    assert len(maps) == attn2_layers > 0
    heat = attention_heatmap(maps, (8, 12))
    assert heat.shape == (2, 8, 12)
    assert (heat >= 0).all() and torch.allclose(heat.flatten(1).amax(1), torch.ones(2))
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())


def test_full_fine_tune_replaces_the_unet_and_brings_its_prediction_type(trained, tmp_path):
    from accelerate.state import AcceleratorState

    from tuneline.config import validate_params
    from tuneline.core.fsutil import atomic_write_json
    from tuneline.models.sdxl.adapter import SDXLAdapter
    from tuneline.stages.render.generate import apply_trained, load_base_pipeline
    from tuneline.stages.train.stage import build_trainer

    project, _, _, _ = trained
    params = validate_params({**project.params_data, "train": {
        "mode": "full", "num_steps": 1, "seed": 3, "lr": 1e-2, "prediction_type": "v_prediction"}})
    AcceleratorState._reset_state(True)
    trainer = build_trainer(params, project.root, project.root / "data/latents", tmp_path / "checkpoints",
                            SDXLAdapter(params.model, params.train, project.root))
    trainer.setup()
    trainer.fit()
    out = trainer.save_outputs(tmp_path / "out")
    atomic_write_json(out / "trainer_state.json", {"train_config": params.train.model_dump(mode="json")})
    pipeline = load_base_pipeline(params.model, project.root, "cpu", "fp32")
    base_unet = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    applied = apply_trained(pipeline, out)
    assert any("full weights: unet" in n for n in applied.loaded)
    trained_unet = trainer.accelerator.unwrap_model(trainer.modules["unet"]).state_dict()
    loaded = pipeline.unet.state_dict()
    assert all(torch.equal(loaded[k], trained_unet[k]) for k in trained_unet)
    assert not all(torch.equal(loaded[k], base_unet[k]) for k in base_unet)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_render_runs_as_a_stage_of_the_cli(rendered):
    from tuneline.orchestration import registry
    from tuneline.stages.render.stage import run

    render = registry.stage("render")
    assert (render.reads, render.writes) == (("models/train",), "renders")
    assert importlib.import_module(render.module).run is run


def test_ema_choice_is_explained(tmp_path):
    from tuneline.core.fsutil import atomic_write_json
    from tuneline.train.output import choose_weights as _weights_dir

    def state(enabled: bool) -> None:
        atomic_write_json(tmp_path / "trainer_state.json", {"train_config": {"ema": {"enabled": enabled}}})

    state(False)
    notes: list[str] = []
    assert _weights_dir(tmp_path, True, notes) == tmp_path and "kept no EMA weights" in notes[0]
    state(True)
    notes = []
    assert _weights_dir(tmp_path, False, notes) == tmp_path and "holds the EMA weights" in notes[0]
    (tmp_path / "ema").mkdir()
    notes = []
    assert _weights_dir(tmp_path, True, notes) == tmp_path / "ema" and _weights_dir(tmp_path, False, notes) == tmp_path
    assert notes == []
