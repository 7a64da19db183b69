"""Training the tiny RANDOM Z-Image (flow-matching DiT): the adapter under the same trainer core as
SDXL: learning, exact resume, kill -9, LoRA and full saves that diffusers loads, loss weights,
cached variable-length text, and the settings that belong to another family."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import Project, make_latents_project

REPO = Path(__file__).resolve().parents[1]


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
    from tuneline.models.registry import build_adapter
    from tuneline.train.trainer import Trainer

    AcceleratorState._reset_state(True)  # one process, many trainers
    family = detect_family(params.model, project.root)
    assert family == "zimage"
    trainer = Trainer(params, project.root, latents or project.root / "data/latents", run / "checkpoints",
                      build_adapter(family, params.model, params.train, project.root), resume_from=resume_from)
    trainer.setup()
    return trainer


def trained_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    [folder] = (run / "checkpoints").glob(f"*/step_{step:06d}")
    return load_file(folder / "trained.safetensors")


def tiny_pipeline():
    from diffusers import ZImagePipeline

    from tuneline.models.ref import resolve_model

    return ZImagePipeline.from_pretrained(resolve_model("tiny-zimage"))


def render(pipeline, seed: int = 3) -> torch.Tensor:
    return pipeline("alf, a red thing", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images


# --- learning and resume ---------------------------------------------------------------------

@pytest.mark.slow
def test_loss_falls_on_fixed_noise(zimage_project, tmp_path):
    trainer = ztrainer(zimage_project, tmp_path, zparams(zimage_project, num_steps=40, lr=3e-3, mode="full"))
    before = trainer.evaluate(seed=0)
    assert trainer.evaluate(seed=0) == before  # fixed noise, sigmas and latent samples
    trainer.fit()
    after = trainer.evaluate(seed=0)
    print(f"zimage learning: {before:.4f} -> {after:.4f} ({after / before:.3f})")
    assert after < 0.8 * before, (before, after)


def test_resume_is_exact(zimage_project, tmp_path):
    from tuneline.train.trainer import StopRequested

    extra = {"ema": {"enabled": True, "decay": 0.9}, "caption_dropout": 0.3, "flip": True, "num_steps": 4,
             "lora": {"dropout": 0.1}, "schedule": {"name": "cosine", "warmup_steps": 1},
             "flow_matching": {"timestep_sampling": "mode", "loss_weighting": "cosmap"}}
    straight = ztrainer(zimage_project, tmp_path / "a", zparams(zimage_project, **extra))
    straight.fit()

    def stop_at_two(state, result, seconds):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    halves = ztrainer(zimage_project, tmp_path / "b", zparams(zimage_project, **extra))
    with pytest.raises(StopRequested):
        halves.fit(on_log=stop_at_two)
    resumed = ztrainer(zimage_project, tmp_path / "b", zparams(zimage_project, **extra))
    assert resumed.state.step == 2
    resumed.fit()
    a, b = trained_weights(tmp_path / "a", 4), trained_weights(tmp_path / "b", 4)
    assert a.keys() == b.keys() and len(a) > 0 and all(k.startswith("transformer.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], trained_weights(tmp_path / "b", 2)[k]) for k in a)  # it did train


def stage_project(project: Project, tmp_path: Path, **train) -> Path:
    root = tmp_path / "stage"
    shutil.copytree(project.root / "data/latents", root / "data/latents")
    data = {**project.params_data, "train": {"seed": 5, "checkpoint": {"every_steps": 2}, **train}}
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    return root


def run_cli(root: Path, *args: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.Popen([sys.executable, "-m", "tuneline.cli", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(zimage_project, tmp_path):
    """DDP around the Z-Image transformer (list inputs, list outputs): two CPU processes, one result."""
    root = stage_project(zimage_project, tmp_path, num_steps=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "tuneline.cli", "train"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    state = yaml.safe_load((root / "models/train/trainer_state.json").read_text())
    assert state["family"] == "zimage" and state["step"] == 2 and state["processes"] == 2
    assert sorted(p.name for p in root.glob("checkpoints/train/*/step_000002/rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]


@pytest.mark.slow
def test_kill_9_then_resume_matches_a_straight_run(zimage_project, tmp_path):
    import time

    straight = stage_project(zimage_project, tmp_path / "straight", num_steps=6)
    process = run_cli(straight, "train")
    assert process.wait(timeout=300) == 0, process.stdout.read()
    killed = stage_project(zimage_project, tmp_path / "killed", num_steps=6)
    process = run_cli(killed, "train")
    deadline = time.time() + 300
    while not list(killed.glob("checkpoints/train/*/step_000004")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_cli(killed, "train")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    [a] = [load_file(p) for p in straight.glob("checkpoints/train/*/step_000006/trained.safetensors")]
    [b] = [load_file(p) for p in killed.glob("checkpoints/train/*/step_000006/trained.safetensors")]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = yaml.safe_load((killed / "models/train/trainer_state.json").read_text())
    assert state["family"] == "zimage" and state["step"] == 6
    assert (killed / "models/train/pytorch_lora_weights.safetensors").is_file()


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

    tokenizer, encoder = load_zimage_text_encoder(trainer.params.model, zimage_project.root, "fp32", "cpu")
    records = read_manifest(cached)
    with torch.no_grad():
        features = encode_prompts(tokenizer, encoder, [r["caption"] for r in records])
    assert len({f.shape[0] for f in features}) > 1  # variable length
    for record, feature in zip(records, features):
        record["text_embeddings"] = f"{record['id']}.text.safetensors"
        save_file({"prompt_embeds": feature.contiguous()}, cached / record["text_embeddings"])
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


@pytest.mark.parametrize("settings", [
    {"mixed_precision": "bf16", "gradient_checkpointing": True, "lora": {"rank": 4, "targets": "all"}},
    {"mode": "full", "ema": {"enabled": True}},
])
def test_the_memory_estimate_counts_weights_and_optimizer_state_exactly(zimage_project, tmp_path, settings):
    """`tuneline check`'s estimate works for Z-Image: built on the meta device from the configs, its
    weight, trained-parameter and optimizer-state bytes equal a real trainer's on the same settings."""
    from tuneline.train import memory

    params = zparams(zimage_project, **settings)
    trainer = ztrainer(zimage_project, tmp_path, params)
    real_weights: dict[str, int] = {}
    real_trained = 0
    modules = [*trainer.modules.values(), *trainer.adapter.frozen_modules().values()]
    for tensor in {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values():
        if tensor.requires_grad:
            real_trained += tensor.numel() * tensor.element_size()
        else:
            name = memory.dtype_name(tensor.dtype)
            real_weights[name] = real_weights.get(name, 0) + tensor.numel() * tensor.element_size()
    estimate = memory.estimate(params, zimage_project.root, bucket=(64, 64), batch_size=2)
    assert estimate.weights == real_weights and estimate.trained == estimate.gradients == real_trained
    assert estimate.ema == (real_trained if params.train.ema.enabled else 0)
    assert 0 < estimate.activations and estimate.peak > estimate.weights_total + estimate.optimizer
    trainer.fit()
    real = memory.real_optimizer_state_bytes(trainer.units[0].optimizer)
    assert estimate.optimizers["adamw"] == real
