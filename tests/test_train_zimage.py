"""Training the tiny RANDOM Z-Image (flow-matching DiT): the adapter under the same trainer core as
SDXL: learning, LoRA and full saves that diffusers loads, loss weights, cached variable-length text,
and the settings that belong to another family. Exact resume, kill -9, two processes and the memory
estimate are tested for both families at once in test_train.py (on this module's zimage_project)."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import Project, make_latents_project


@pytest.fixture(scope="module")
def zimage_project(tmp_path_factory):
    """conftest's latents project on tiny-zimage, once. The latents stage's text cache is off here,
    so the adapter encodes the captions itself (a test below writes a cache for the cached path)."""
    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    return make_latents_project(
        tmp_path_factory.mktemp("zimage-project"), model={"base": "tiny-zimage"},
        latents={"flip": True, "text_embeddings": False},
        render={"height": 64, "width": 64, "steps": 2, "live_prompts": 1, "live_every": 0})


def zparams(project: Project, **train):
    from tuneline.config import validate_params

    data = {**project.params_data, "train": {"num_steps": 2, "seed": 7, "lr": 1e-3,
                                              "checkpoint": {"every_steps": 2, "keep_last": 2}, **train}}
    return validate_params(data)


def ztrainer(project: Project, run: Path, params, resume_from: Path | None = None, latents: Path | None = None):
    from accelerate.state import AcceleratorState

    from tuneline.models.family import detect_family
    from tuneline.stages.train.stage import build_trainer

    AcceleratorState._reset_state(True)  # one process, many trainers
    assert detect_family(params.model, project.root) == "zimage"
    trainer = build_trainer(params, project.root, latents or project.root / "data/latents", run / "checkpoints",
                            resume_from=resume_from)
    trainer.setup()
    return trainer


def tiny_pipeline():
    from diffusers import ZImagePipeline

    from tuneline.models.ref import resolve_model

    return ZImagePipeline.from_pretrained(resolve_model("tiny-zimage"))


def render(pipeline, seed: int = 3) -> torch.Tensor:
    return pipeline("alf, a red thing", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images


# --- learning ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_loss_falls_on_fixed_noise(zimage_project, tmp_path):
    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project, num_steps=40, lr=3e-3, mode="full"))
    before = trainer.evaluate(seed=0)
    assert trainer.evaluate(seed=0) == before  # fixed noise, sigmas and latent samples
    trainer.fit()
    after = trainer.evaluate(seed=0)
    print(f"zimage learning: {before:.4f} -> {after:.4f} ({after / before:.3f})")
    assert after < 0.8 * before, (before, after)


def test_the_train_stage_picks_the_zimage_adapter(zimage_project, tmp_path):
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import run

    AcceleratorState._reset_state(True)
    params = zparams(zimage_project, num_steps=1, checkpoint={"every_steps": 1})
    report = run(params, zimage_project.root, zimage_project.root / "data/latents", tmp_path / "out",
                 checkpoint_dir=tmp_path / "checkpoints")
    state = yaml.safe_load((tmp_path / "out/trainer_state.json").read_text())
    assert (state["family"], state["prediction_type"], state["step"]) == ("zimage", "flow", 1)
    assert (tmp_path / "out/pytorch_lora_weights.safetensors").is_file()
    assert any("tiny RANDOM" in warning for warning in report.warnings)


# --- what is loaded, modes, loss -------------------------------------------------------------

def test_nothing_but_the_transformer_is_loaded_with_cached_text(zimage_project, tmp_path):
    """Uncached captions load the text encoder (frozen, in the compute dtype); cached ones leave
    it out; cached and uncached give the same loss; the VAE is never loaded."""
    trainer = ztrainer(zimage_project, tmp_path / "plain", zparams(zimage_project, mixed_precision="bf16"))
    adapter = trainer.adapter
    assert set(trainer.modules) == {"transformer"} and set(adapter.frozen_modules()) == {"text_encoder"}
    assert {p.dtype for p in adapter.text_encoders[0].parameters()} == {torch.bfloat16}
    transformer = trainer.accelerator.unwrap_model(trainer.modules["transformer"])
    assert {p.dtype for p in transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in transformer.parameters() if p.requires_grad} == {torch.float32}
    assert not hasattr(adapter, "vae")

    # A Z-Image text cache as the latents stage writes it: per caption prompt_embeds [L, D], no pooled.
    cached = tmp_path / "latents"
    shutil.copytree(zimage_project.root / "data/latents", cached)
    from tuneline.core.manifest import read_manifest
    from tuneline.models.loading import load_zimage_text_encoder
    from tuneline.models.zimage.text import encode_prompts

    tokenizer, encoder = load_zimage_text_encoder(zparams(zimage_project).model, zimage_project.root, "fp32", "cpu")
    records = read_manifest(cached)
    with torch.no_grad():
        features = encode_prompts(tokenizer, encoder, [r["caption"] for r in records])
    assert len({f.shape[0] for f in features}) > 1  # variable length
    from safetensors.torch import save

    from tuneline.core.packs import member_ref, write_tar

    members = [(f"{r['id']}.safetensors", save({"prompt_embeds": f.contiguous()})) for r, f in zip(records, features)]
    places = write_tar(cached / "texts.tar", members)
    for record, (name, _) in zip(records, members):
        record["text_embeddings"] = member_ref("texts.tar", name, *places[name])
    (cached / "manifest.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in records))
    params = zparams(zimage_project)
    with_cache = ztrainer(zimage_project, tmp_path / "cached", params, latents=cached)
    assert with_cache.data.text_cache and with_cache.adapter.text_encoders == []
    without = ztrainer(zimage_project, tmp_path / "uncached", params)
    indices = with_cache.sampler.all_batches(0)[0]
    losses = []
    for trainer in (with_cache, without):
        batch = trainer.data.batch(indices, torch.Generator().manual_seed(1), random.Random(1), "cpu")
        assert isinstance(batch.get("prompt_embeds", []), list)
        with torch.no_grad():
            losses.append(float(trainer.adapter.loss(trainer.modules, batch, torch.Generator().manual_seed(2), 0)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("settings", [
    {"mode": "lora", "lora": {"rank": 4, "alpha": 2.0, "targets": "all"}, "gradient_checkpointing": True,
     "flow_matching": {"timestep_sampling": "uniform", "shift": 1.0, "loss_weighting": "sigma_sqrt"}},
    {"mode": "lora", "lora": {"targets": "attention_mlp"}, "mixed_precision": "bf16", "gradient_accumulation": 2,
     "flow_matching": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "shift": 2.0}},
    {"mode": "full", "ema": {"enabled": True}, "optimizer": {"name": "adafactor"}, "caption_shuffle": True},
])
def test_training_modes_run_and_save(zimage_project, tmp_path, settings):
    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project, **settings))
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    transformer = trainer.accelerator.unwrap_model(trainer.modules["transformer"])
    trained = {name for name, p in transformer.named_parameters() if p.requires_grad}
    if settings["mode"] == "lora":
        assert trained and all("lora_" in name for name in trained)
        ffn = any("feed_forward" in name for name in trained)
        assert ffn == (settings["lora"]["targets"] != "attention")
        assert any("adaLN_modulation" in name for name in trained) == (settings["lora"]["targets"] == "all")
        assert any(name.startswith(("noise_refiner", "context_refiner")) for name in trained)
    else:
        assert trained == {name for name, _ in transformer.named_parameters()}
    out = trainer.save_outputs(tmp_path / "out")
    if settings["mode"] == "lora":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (out / "pipeline/transformer/diffusion_pytorch_model.safetensors").is_file()
        assert (out / "ema/pipeline/model_index.json").is_file()


def test_loss_weight_scales_each_sample(zimage_project, tmp_path):
    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project))
    indices = trainer.sampler.all_batches(0)[0]
    assert len(indices) == 2

    def losses(weights: list[float]) -> float:
        batch = trainer.data.batch(indices, torch.Generator().manual_seed(3), random.Random(3), "cpu")
        batch["loss_weight"] = torch.tensor(weights)
        with torch.no_grad():
            return float(trainer.adapter.loss(trainer.modules, batch, torch.Generator().manual_seed(4), 0)[0])

    first, second = 2 * losses([1.0, 0.0]), 2 * losses([0.0, 1.0])  # each sample's own loss
    assert first != pytest.approx(second)
    assert losses([0.5, 2.0]) == pytest.approx((0.5 * first + 2.0 * second) / 2, rel=1e-5)


def test_the_loss_is_the_flow_matching_objective(zimage_project, tmp_path):
    """adapter.loss == ||-transformer(x_t, 1 - sigma) - (noise - x0)||^2 with x_t = (1-sigma) x0 + sigma noise,
    sigma drawn after the noise and shifted as the scheduler (static shift 3)."""
    from tuneline.train.flow_matching import sample_sigmas

    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project))
    adapter, indices = trainer.adapter, trainer.sampler.all_batches(0)[0]
    batch = trainer.data.batch(indices, torch.Generator().manual_seed(3), random.Random(3), "cpu")
    with torch.no_grad():
        loss = float(adapter.loss(trainer.modules, batch, torch.Generator().manual_seed(5), 0)[0])
        generator = torch.Generator().manual_seed(5)
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = sample_sigmas(len(x0), "logit_normal", generator, shift=3.0)
        x_t = (1 - sigmas[:, None, None, None]) * x0 + sigmas[:, None, None, None] * noise
        features = adapter.conditioning(batch["captions"], "cpu")
        output = trainer.modules["transformer"]([x[:, None] for x in x_t], 1 - sigmas, features).sample
        velocity = -torch.stack(output)[:, :, 0]
        per_sample = ((velocity - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert loss == pytest.approx(float((per_sample * batch["loss_weight"]).mean()), rel=1e-5)


# --- saves that diffusers loads --------------------------------------------------------------

def test_lora_loads_in_diffusers_with_every_key_and_changes_the_image(zimage_project, tmp_path, caplog):
    from peft.utils import get_peft_model_state_dict

    params = zparams(zimage_project, num_steps=3, lr=1e-2, lora={"rank": 4, "alpha": 2.0, "targets": "attention_mlp"})
    trainer = ztrainer(zimage_project, tmp_path, params)
    trainer.fit()
    out = trainer.save_outputs(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]
    pipe = tiny_pipeline()
    base_image = render(pipe)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()  # as quiet_libraries() leaves it: diffusers' records reach caplog
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(out)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "missing" in r.getMessage().lower()], caplog.text
    config = pipe.transformer.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (4, 2.0)
    trained = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.modules["transformer"]))
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    assert trained.keys() == loaded.keys() and len(trained) > 0
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert not torch.equal(render(pipe), base_image)


def test_full_fine_tune_saves_a_pipeline_diffusers_loads(zimage_project, tmp_path):
    from diffusers import ZImagePipeline

    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project, mode="full"))
    trainer.fit()
    out = trainer.save_outputs(tmp_path / "out")
    pipe = ZImagePipeline.from_pretrained(out / "pipeline")
    trained = trainer.accelerator.unwrap_model(trainer.modules["transformer"]).state_dict()
    loaded = pipe.transformer.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert not torch.equal(render(pipe), render(tiny_pipeline()))


# --- settings of the other family ------------------------------------------------------------

@pytest.mark.parametrize("settings, named", [
    ({"prediction_type": "v_prediction"}, ["train.prediction_type"]),
    ({"zero_terminal_snr": True, "loss": {"min_snr_gamma": 5.0, "noise_offset": 0.05}},
     ["train.zero_terminal_snr", "train.loss.min_snr_gamma", "train.loss.noise_offset"]),
    ({"text_encoder_1": {"mode": "lora"}, "text_encoder_2": {"lr": 1e-5}},
     ["train.text_encoder_1.mode", "train.text_encoder_2.lr"]),
    ({"lora": {"use_dora": True}, "attention": "eager"}, ["train.lora.use_dora", "train.attention"]),
])
def test_settings_of_sdxl_are_refused_for_zimage(zimage_project, settings, named):
    from tuneline.core.params import ParamsError
    from tuneline.models.registry import build_adapter

    params = zparams(zimage_project, **settings)
    with pytest.raises(ParamsError) as caught:
        build_adapter("zimage", params.model, params.train, zimage_project.root)
    for key in named:
        assert key in str(caught.value)


def test_flow_matching_settings_are_refused_for_sdxl(tmp_path):
    from tuneline.core.params import ParamsError
    from tuneline.models.registry import build_adapter
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import TrainConfig

    build_adapter("sdxl", ModelConfig(), TrainConfig(), tmp_path)  # defaults: fine
    with pytest.raises(ParamsError, match=r"train.flow_matching.loss_weighting: 'cosmap'.*zimage"):
        build_adapter("sdxl", ModelConfig(), TrainConfig(flow_matching={"loss_weighting": "cosmap"}), tmp_path)


def test_flow_matching_at_its_defaults_keeps_older_run_keys():
    """train.flow_matching was added after SDXL runs existed: at its defaults it is not part of the
    run key and a checkpoint without it resumes with no note."""
    from tuneline.train.config import TrainConfig
    from tuneline.train import checkpoint

    plain = TrainConfig().model_dump(mode="json")
    older = {k: v for k, v in plain.items() if k != "flow_matching"}
    assert checkpoint.run_key(plain, {}, "d", 1, {}) == checkpoint.run_key(older, {}, "d", 1, {})
    assert checkpoint.compare_configs(older, plain) == ([], [])
    changed = TrainConfig(flow_matching={"shift": 2.0}).model_dump(mode="json")
    assert checkpoint.run_key(changed, {}, "d", 1, {}) != checkpoint.run_key(plain, {}, "d", 1, {})
    assert checkpoint.compare_configs(older, changed)[1]  # unsafe
