"""Trainer core on the tiny RANDOM SDXL: modes, exact resume, stop signal, NaN guard, sampler, learning.

What both diffusion families share (exact resume in-process and after kill -9, two processes, the
memory estimate) is tested here once, parametrized by family: SDXL on conftest's latents project,
Z-Image on test_train_zimage's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load, load_file, save

from conftest import Project, make_trainer, replace_members, train_params
from resume_checks import assert_resumed_exactly, assert_same_tensors, checkpoint_at, latest_step
from test_train_zimage import zimage_project  # noqa: F401  (a fixture: the Z-Image latents project)

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "zimage")
PROJECTS = {"sdxl": "latents_project", "zimage": "zimage_project"}  # each family's latents project fixture


def family_project(request, family: str) -> Project:
    project = request.getfixturevalue(PROJECTS[family])
    assert project.params_data.get("model", {}).get("base", "tiny-sdxl") == f"tiny-{family}"
    return project


def checkpoint_of(run: Path, step: int) -> Path:
    [folder] = (run / "checkpoints").glob(f"*/step_{step:06d}")
    return folder


def trained_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_of(run, step) / "trained.safetensors")


# Settings every exact-resume run uses (EMA, caption dropout, flips, LoRA dropout, a schedule: every
# random stream and state the checkpoint must carry), and each family's own.
RESUME_SETTINGS = {"ema": {"enabled": True, "decay": 0.9}, "caption_dropout": 0.3, "flip": True, "num_steps": 4,
                   "lora": {"dropout": 0.1}, "schedule": {"name": "cosine", "warmup_steps": 1}}
FAMILY_RESUME_SETTINGS = {"sdxl": {}, "zimage": {"flow_matching": {"timestep_sampling": "mode",
                                                                   "loss_weighting": "cosmap"}}}


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact(request, family, tmp_path):
    from tuneline.train.trainer import StopRequested

    project = family_project(request, family)
    params = train_params(project, **RESUME_SETTINGS, **FAMILY_RESUME_SETTINGS[family])
    # SDXL renders live samples at every step: rendering must not disturb any training state.
    live_every = 1 if family == "sdxl" else 0
    straight = make_trainer(project, tmp_path / "a", params, live_every=live_every)
    base = straight.trained_weights()
    straight.fit()
    if live_every:
        assert sorted(p.name for p in (straight.checkpoint_dir / "live").iterdir()) == [
            f"step_{n:06d}" for n in range(1, 5)]

    def stop_at_two(state, result, seconds):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    halves = make_trainer(project, tmp_path / "b", params, live_every=live_every)
    with pytest.raises(StopRequested):
        halves.fit(on_log=stop_at_two)
    resumed = make_trainer(project, tmp_path / "b", params, live_every=live_every)
    assert resumed.state.step == 2
    assert any(f"step_000002 at step 2" in m for m in resumed.messages)
    resumed.fit()
    assert_resumed_exactly(checkpoint_of(tmp_path / "a", 4), checkpoint_of(tmp_path / "b", 4), base,
                           resumed_at=2, ema=True)
    a = trained_weights(tmp_path / "a", 4)
    if family == "zimage":
        assert all(k.startswith("transformer.") for k in a)
    assert not all(torch.equal(a[k], trained_weights(tmp_path / "b", 2)[k]) for k in a)  # it did train


def test_resume_with_more_steps_is_allowed_and_logged(latents_project, tmp_path):
    make_trainer(latents_project, tmp_path, train_params(latents_project, num_steps=2)).fit()
    resumed = make_trainer(latents_project, tmp_path, train_params(latents_project, num_steps=3))
    assert resumed.state.step == 2
    assert any("train.num_steps: 2 -> 3" in m for m in resumed.messages)
    assert resumed.fit()["steps"] == 3


def test_changed_settings_start_a_new_run_and_explicit_unsafe_resume_is_refused(latents_project, tmp_path):
    from tuneline.train.checkpoint import ResumeRefused

    make_trainer(latents_project, tmp_path, train_params(latents_project)).fit()
    other = make_trainer(latents_project, tmp_path, train_params(latents_project, lr=2e-3))
    assert other.state.step == 0 and any("starts from the base model" in m for m in other.messages)
    with pytest.raises(ResumeRefused, match=r"train.lora: .*rank.*delete"):
        make_trainer(latents_project, tmp_path, train_params(latents_project, lora={"rank": 4}),
                     resume_from=checkpoint_of(tmp_path, 2))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(latents_project, tmp_path):
    from tuneline.train.trainer import StopRequested

    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project, num_steps=10))
    with pytest.raises(StopRequested, match="resume"):
        trainer.fit(on_log=lambda state, result, s: os.kill(os.getpid(), signal.SIGTERM))
    assert (trainer.checkpoint_dir / "latest").read_text().strip() == "step_000001"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    again = make_trainer(latents_project, tmp_path, train_params(latents_project, num_steps=10))
    assert again.state.step == 1


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(latents_project, tmp_path):
    poisoned = tmp_path / "project"
    shutil.copytree(latents_project.root / "data/latents", poisoned / "data/latents")

    def nan_mean(record, data: bytes) -> bytes:
        tensors = load(data)
        tensors["mean"] = torch.full_like(tensors["mean"], float("nan"))
        return save(tensors)

    replace_members(poisoned / "data/latents", "latents", nan_mean)
    project = Project.__new__(Project)
    project.root, project.params_data = poisoned, latents_project.params_data
    from tuneline.train.trainer import TrainingDiverged

    trainer = make_trainer(project, tmp_path / "run", train_params(project))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 1 \(items \["):
        trainer.fit()
    assert not (trainer.checkpoint_dir / "latest").exists()


def test_loss_weight_scales_each_sample(latents_project, tmp_path):
    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project))
    indices = trainer.sampler.all_batches(0)[0]

    def loss_with(weight: float) -> float:
        generator = torch.Generator().manual_seed(3)
        import random

        batch = trainer.data.batch(indices, generator, random.Random(3), "cpu")
        batch["loss_weight"] = torch.full_like(batch["loss_weight"], weight)
        with torch.no_grad():
            return float(trainer.adapter.loss(trainer.modules, batch, generator, 0)[0])

    assert loss_with(0.5) == pytest.approx(loss_with(1.0) * 0.5, rel=1e-6)


@pytest.mark.parametrize("settings", [
    {"mode": "lora", "text_encoder_1": {"mode": "lora"}, "text_encoder_2": {"mode": "frozen"},
     "lora": {"rank": 4, "alpha": 2.0, "targets": "all"}, "optimizer": {"name": "adafactor"},
     "loss": {"min_snr_gamma": 5.0, "noise_offset": 0.05, "min_sigma": 0.5, "min_sigma_warmup_steps": 2}},
    {"mode": "full", "text_encoder_2": {"mode": "full", "lr": 1e-5}, "optimizer": {"name": "lion"},
     "prediction_type": "v_prediction", "zero_terminal_snr": True, "gradient_checkpointing": True,
     "caption_shuffle": True, "gradient_accumulation": 2, "ema": {"enabled": True, "on_cpu": True}},
    {"mode": "lora", "lora": {"targets": "attention_mlp"}, "optimizer": {"name": "prodigy"}, "lr": 1.0,
     "num_steps": None, "num_epochs": 1, "attention": "eager", "seed": None},
])
def test_training_modes_run_and_save(latents_project, tmp_path, settings):
    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project, **settings))
    summary = trainer.fit()
    assert summary["steps"] == trainer.total_steps > 0
    assert summary["final_loss"] == pytest.approx(summary["final_loss"]) and summary["final_loss"] > 0
    out = trainer.save_outputs(tmp_path / "out")
    if settings["mode"] == "lora" or settings.get("text_encoder_1", {}).get("mode") == "lora":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    if settings["mode"] == "full":
        assert (out / "pipeline/unet/diffusion_pytorch_model.safetensors").is_file()
    lrs = {g["name"]: g["lr"] for g in trainer.units[0].optimizer.param_groups}
    assert "unet" in lrs
    if settings.get("text_encoder_2", {}).get("lr"):
        assert lrs["text_encoder_2"] == pytest.approx(1e-5)


def test_lora_loads_in_diffusers_with_alpha_and_weights(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from tuneline.models.ref import resolve_model

    params = train_params(latents_project, lora={"rank": 4, "alpha": 2.0})
    trainer = make_trainer(latents_project, tmp_path, params)
    trainer.fit()
    out = trainer.save_outputs(tmp_path / "out")
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny-sdxl"))
    pipe.load_lora_weights(out)
    config = pipe.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (4, 2.0)
    trained = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.modules["unet"]))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_bucket_sampler_invariants():
    from tuneline.train.sampler import BucketBatchSampler, SampleRef

    items = [SampleRef(i, (64, 64) if i < 5 else (96, 32), repeats=2 if i % 2 else 1) for i in range(9)]
    sampler = BucketBatchSampler(items, lambda b: 2 if b == (64, 64) else 3, seed=1)
    epoch0 = sampler.all_batches(0)
    assert epoch0 == sampler.all_batches(0) and epoch0 != sampler.all_batches(1)
    bucket_of = {item.index: item.bucket for item in items}
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in epoch0)
    flat = sorted(i for batch in epoch0 for i in batch)
    assert flat == sorted(i for item in items for i in [item.index] * item.repeats)
    assert len(sampler) == len(epoch0)
    ranks = [BucketBatchSampler(items, lambda b: 2, seed=1, num_replicas=2, rank=r).batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {tuple(b) for b in ranks[0]} & {tuple(b) for b in ranks[1]}


def test_caption_dropout_and_shuffle_keep_the_trigger_word():
    import random

    from tuneline.train.captions import augment_caption
    from tuneline.train.config import TrainConfig

    config = TrainConfig(caption_shuffle=True, keep_tokens=1)
    rng = random.Random(0)
    shuffled = {augment_caption("ohwx, red, blue, green, tall", config, rng) for _ in range(30)}
    assert len(shuffled) > 1 and all(s.startswith("ohwx, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted("ohwx, red, blue, green, tall".split(", ")) for s in shuffled)
    dropped = [augment_caption("ohwx, red", TrainConfig(caption_dropout=0.5), rng) for _ in range(400)]
    assert 150 < dropped.count("") < 250


@pytest.mark.slow
def test_loss_falls_on_fixed_noise(latents_project, tmp_path):
    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project, num_steps=40, lr=3e-3,
                                                                    mode="full", optimizer={"name": "adamw"}))
    before = trainer.evaluate(seed=0)
    trainer.fit()
    after = trainer.evaluate(seed=0)
    # Measured 0.196 (0.857 -> 0.168). With a tenth of the learning rate it reaches 0.42, with the
    # optimizer stepping at every 4th step only 0.51: both fail here (0.8 let them pass).
    assert after < 0.3 * before, (before, after)


def run_cli(root: Path, *args: str, launcher: tuple[str, ...] = ("-m", "tuneline.cli")) -> subprocess.Popen:
    """`python <launcher> <args>` in `root` on this checkout's code (not the venv's editable install)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.Popen([sys.executable, *launcher, *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def launch_two_processes(root: Path, *args: str) -> str:
    """`accelerate launch` of `args` on two CPU processes (DDP) in `root`; its output, after checking it ran."""
    process = run_cli(root, *args, launcher=(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no"))
    output = process.communicate(timeout=400)[0]
    assert process.returncode == 0, output
    return output


def stage_project(project: Project, tmp_path: Path, **train) -> Path:
    root = tmp_path / "stage"
    shutil.copytree(project.root / "data/latents", root / "data/latents")
    data = {**project.params_data, "train": {"seed": 5, "checkpoint": {"every_steps": 2}, **train}}
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    return root


def base_weights(root: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of the stage project at `root` before step 1 (same seed: same LoRA draws)."""
    from tuneline.config import validate_params

    project = Project.__new__(Project)
    project.root, project.params_data = root, yaml.safe_load((root / "params.yaml").read_text("utf-8"))
    return make_trainer(project, tmp_path, validate_params(project.params_data)).trained_weights()


@pytest.mark.slow
# The process-level path (kill -9, checkpoint files, a fresh process) is the trainer core's, the same for every
# family; each family's own resume state is test_resume_is_exact's, parametrized (CI time: about 30 s a family).
@pytest.mark.parametrize("family", ["sdxl"])
def test_kill_9_then_resume_matches_a_straight_run(request, family, tmp_path):
    import time

    from tuneline.config import load_params
    from tuneline.orchestration import registry

    project = family_project(request, family)
    settings = {"num_steps": 6, "ema": {"enabled": True, "decay": 0.9}}
    # The straight run in this process (the stage function the CLI calls; a process start costs
    # more than the run): the killed and resumed runs are the CLI's, as a user's are.
    straight = stage_project(project, tmp_path / "straight", **settings)
    registry.stage("train").run(load_params(straight / "params.yaml"), straight, None)
    killed = stage_project(project, tmp_path / "killed", **settings)
    process = run_cli(killed, "train")
    deadline = time.time() + 300
    while not list(killed.glob("checkpoints/train/*/step_000004")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = latest_step(killed / "checkpoints/train")
    # Step 4's folder was there; `latest` still names step 2 if the kill landed between the rename and its update.
    assert 2 <= stopped_at < 6, f"the kill landed after the run finished (latest step {stopped_at}): nothing resumed"
    resumed = run_cli(killed, "train")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and f"step_{stopped_at:06d} at step {stopped_at}" in output, output
    assert_resumed_exactly(checkpoint_at(straight / "checkpoints/train", 6), checkpoint_at(killed / "checkpoints/train", 6),
                           base_weights(killed, tmp_path / "base"), resumed_at=stopped_at, ema=True)
    state = yaml.safe_load((killed / "models/train/trainer_state.json").read_text())
    assert state["family"] == family and state["step"] == 6 and state["ema_weights"]
    assert (killed / "models/train/pytorch_lora_weights.safetensors").is_file()


# Runs the train stage as the CLI does and, in every process, keeps that process's trained weights as
# they are when the stage writes its result: DDP must leave the two processes with the same weights.
PER_PROCESS_WEIGHTS = """
import sys
from pathlib import Path

from safetensors.torch import save_file

from tuneline.cli import main
from tuneline.train.trainer import Trainer

write_result = Trainer.save_outputs


def save_outputs(self, *args, **kwargs):
    save_file(self.trained_weights(), Path(sys.argv[1]) / f"rank{self.accelerator.process_index}.safetensors")
    return write_result(self, *args, **kwargs)


Trainer.save_outputs = save_outputs
sys.exit(main(["train"]))
"""


@pytest.mark.slow
# accelerate's process group, the sampler's sharding and the gradients' all-reduce are the trainer core's, the
# same for every family (CI time: about 20 s a family).
@pytest.mark.parametrize("family", ["sdxl"])
def test_two_processes_under_accelerate_launch(request, family, tmp_path):
    """DDP on two CPU processes (Z-Image: list inputs, list outputs): one result, the same in both."""
    project = family_project(request, family)
    root = stage_project(project, tmp_path, num_steps=2)
    script, weights = tmp_path / "per_process_weights.py", tmp_path / "weights"
    script.write_text(PER_PROCESS_WEIGHTS, "utf-8")
    weights.mkdir()
    launch_two_processes(root, str(script), str(weights))
    state = yaml.safe_load((root / "models/train/trainer_state.json").read_text())
    assert state["family"] == family and state["step"] == 2 and state["processes"] == 2
    assert sorted(p.name for p in root.glob("checkpoints/train/*/step_000002/rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    rank0, rank1 = (load_file(weights / f"rank{rank}.safetensors") for rank in (0, 1))
    assert_same_tensors(rank0, rank1, "the two processes' weights")
    assert_same_tensors(rank0, load_file(checkpoint_at(root / "checkpoints/train", 2) / "trained.safetensors"),
                        "process weights against the checkpoint")
    base = base_weights(root, tmp_path / "base")
    assert base.keys() == rank0.keys() and all(not torch.equal(rank0[k], base[k]) for k in base)


def test_text_encoder_lora_leaves_out_layers_the_unet_never_sees(latents_project, tmp_path):
    """SDXL conditions on each encoder's penultimate hidden state, plus the second encoder's pooled
    output (its last layer): CLIP-L's last layer changes nothing, so it gets no adapter."""
    from tuneline.models.loading import load_text_encoders
    from tuneline.models.sdxl.text import conditioning_layers, encode_prompts

    params = train_params(latents_project, lora={"rank": 4, "targets": "attention_mlp"},
                          text_encoder_1={"mode": "lora"}, text_encoder_2={"mode": "lora"})
    tokenizers, encoders = load_text_encoders(params.model, latents_project.root, "fp32", "cpu")
    assert [conditioning_layers(e) for e in encoders] == [[0, 1], [0, 1, 2]]  # tiny encoders: 3 layers each
    with torch.no_grad():
        before = encode_prompts(tokenizers, encoders, ["alf, a red thing"], "cpu")
        for encoder, changed in zip(encoders, ([False, False], [False, True])):  # (prompt embeds, pooled)
            last = encoder.get_submodule(f"{'text_model.' if encoder is encoders[1] else ''}encoder.layers.2")
            for parameter in last.parameters():
                parameter.add_(1.0)
            after = encode_prompts(tokenizers, encoders, ["alf, a red thing"], "cpu")
            assert [not torch.equal(a, b) for a, b in zip(before, after)] == changed
            before = after

    trainer = make_trainer(latents_project, tmp_path, params)
    trainer.fit()
    lora = load_file(trainer.save_outputs(tmp_path / "out") / "pytorch_lora_weights.safetensors")
    layers = {(k.split(".")[0], k.split("layers.")[1].split(".")[0]) for k in lora if not k.startswith("unet.")}
    assert layers == {("text_encoder", "0"), ("text_encoder", "1"),
                      ("text_encoder_2", "0"), ("text_encoder_2", "1"), ("text_encoder_2", "2")}
    untrained = [k for k, v in lora.items() if "lora_B" in k and not v.abs().sum()]
    assert untrained == []  # every exported up weight learned something


# --- built for the GPU: dtypes, what is loaded, host syncs ------------------------------------

def test_bf16_lora_holds_the_frozen_base_in_bf16_and_trains_in_fp32(latents_project, tmp_path):
    params = train_params(latents_project, mixed_precision="bf16", num_steps=1, text_encoder_2={"mode": "lora"},
                          caption_dropout=0.2)
    trainer = make_trainer(latents_project, tmp_path, params, live_every=1)  # live samples render under autocast
    for name in ("unet", "text_encoder_2"):
        module = trainer.accelerator.unwrap_model(trainer.modules[name])
        frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
        trained = {p.dtype for p in module.parameters() if p.requires_grad}
        assert frozen == {torch.bfloat16} and trained == {torch.float32}, name
    [frozen_encoder] = trainer.adapter.frozen_modules().values()  # text_encoder_1: frozen, in bf16
    assert {p.dtype for p in frozen_encoder.parameters()} == {torch.bfloat16}
    summary = trainer.fit()
    assert summary["final_loss"] > 0
    state = trainer.units[0].optimizer.state_dict()["state"]
    assert state and {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert [p.name for p in (trainer.checkpoint_dir / "live" / "step_000001").iterdir()] == ["0.png"]


def test_text_encoders_are_loaded_only_when_a_step_needs_them(latents_project, tmp_path):
    from tuneline.stages.render.generate import pipeline_from_training

    cached = make_trainer(latents_project, tmp_path / "cached", train_params(latents_project))
    assert cached.data.text_cache and cached.adapter.text_encoders == [] and cached.adapter.tokenizers == []
    # Rendering needs them: loaded then, frozen, without touching any RNG stream.
    before = torch.get_rng_state()
    pipeline = pipeline_from_training(cached.adapter, cached.modules)
    assert torch.equal(before, torch.get_rng_state())
    assert pipeline.text_encoder is cached.adapter.text_encoders[0] and cached.adapter.text_encoders_loaded_for_inference
    dropout = make_trainer(latents_project, tmp_path / "dropout", train_params(latents_project, caption_dropout=0.3))
    assert not dropout.data.text_cache and len(dropout.adapter.text_encoders) == 2


def test_resume_is_exact_on_cached_text_with_sparse_logging(latents_project, tmp_path):
    """The deferred loss checks and the lazily loaded live-sample text encoders keep a stopped and
    resumed run bit-identical to a straight one."""
    from tuneline.train.trainer import StopRequested

    extra = {"num_steps": 3, "log_every": 2, "lora": {"dropout": 0.1}}
    bases = []

    def run(folder, on_log=None):
        trainer = make_trainer(latents_project, folder, train_params(latents_project, **extra), live_every=2)
        assert trainer.adapter.text_encoders == []
        bases.append(trainer.trained_weights())
        trainer.fit(on_log=on_log)
        return trainer

    run(tmp_path / "a")
    logged = []

    def stop_at_two(state, result, seconds):
        logged.append(state.step)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested):
        run(tmp_path / "b", stop_at_two)
    resumed = run(tmp_path / "b", lambda state, result, seconds: logged.append(state.step))
    assert resumed.state.step == 3 and logged == [2]  # step 3 is checked at the end, not logged
    assert sorted(p.name for p in (resumed.checkpoint_dir / "live").iterdir()) == ["step_000002"]
    a, b = trained_weights(tmp_path / "a", 3), trained_weights(tmp_path / "b", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_tensors(bases[0], bases[1], "the base of both runs")
    assert_resumed_exactly(checkpoint_of(tmp_path / "a", 3), checkpoint_of(tmp_path / "b", 3), bases[0],
                           resumed_at=2, ema=False)


def test_a_nan_between_logging_steps_still_stops_naming_its_step(latents_project, tmp_path):
    from tuneline.train.trainer import TrainingDiverged

    params = train_params(latents_project, num_steps=6, log_every=5, checkpoint={"every_steps": 1, "keep_last": 5})
    trainer = make_trainer(latents_project, tmp_path, params)
    original = trainer.adapter.loss

    def poisoned_at_step_two(modules, batch, generator, step):
        loss, extra = original(modules, batch, generator, step)
        return (loss * float("nan") if step == 1 else loss), extra

    trainer.adapter.loss = poisoned_at_step_two
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2 \(items \[.+\]\).*step_000001") as caught:
        trainer.fit()
    assert "No checkpoint" not in str(caught.value)
    assert (trainer.checkpoint_dir / "latest").read_text().strip() == "step_000001"  # step 2 was never written


def test_a_step_result_reads_its_numbers_only_when_asked(latents_project, tmp_path):
    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project))
    result = trainer.train_step(trainer.next_batches(), sync=False)
    assert isinstance(result.loss_value, torch.Tensor) and isinstance(result.grad_norm_value, torch.Tensor)
    assert isinstance(result.loss, float) and result.loss > 0 and result.grad_norm > 0
    assert set(result.extra) == {"timestep_mean"}


@pytest.mark.parametrize("family, settings", [
    ("sdxl", {"mixed_precision": "bf16", "gradient_checkpointing": True, "lora": {"rank": 4, "targets": "all"}}),
    ("sdxl", {"caption_dropout": 0.2, "text_encoder_2": {"mode": "lora"}, "ema": {"enabled": True}}),
    ("zimage", {"mixed_precision": "bf16", "gradient_checkpointing": True, "lora": {"rank": 4, "targets": "all"}}),
    ("zimage", {"mode": "full", "ema": {"enabled": True}}),
])
def test_the_memory_estimate_counts_weights_and_optimizer_state_exactly(request, family, settings, tmp_path):
    """The estimate is built from configs on the meta device; its weight, trained-parameter and
    optimizer-state bytes equal the real tensors' of a trainer on the same settings."""
    from tuneline.stages.train.memory import estimate_training_memory
    from tuneline.train import memory
    from tuneline.train.config import OptimizerConfig
    from tuneline.train.optim import build_optimizer

    project = family_project(request, family)
    params = train_params(project, **settings)
    trainer = make_trainer(project, tmp_path, params)
    real_weights: dict[str, int] = {}
    real_trained = 0
    modules = [*trainer.modules.values(), *trainer.adapter.frozen_modules().values()]
    for tensor in {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values():
        if tensor.requires_grad:
            real_trained += tensor.numel() * tensor.element_size()
        else:
            name = memory.dtype_name(tensor.dtype)
            real_weights[name] = real_weights.get(name, 0) + tensor.numel() * tensor.element_size()
    estimate = estimate_training_memory(params, project.root, bucket=(64, 64), batch_size=2)
    assert estimate.weights == real_weights and estimate.trained == estimate.gradients == real_trained
    assert ("bf16" in estimate.weights) == (params.train.mixed_precision == "bf16")
    assert estimate.ema == (real_trained if params.train.ema.enabled else 0)
    assert 0 < estimate.activations and estimate.peak > estimate.weights_total + estimate.optimizer
    for name in ("adamw", "lion", "adafactor", "prodigy"):
        optimizer = build_optimizer(OptimizerConfig(name=name), [
            {**group, "lr": 1.0 if name == "prodigy" else 1e-4} for group in trainer.adapter.param_groups(
                {k: trainer.accelerator.unwrap_model(m) for k, m in trainer.modules.items()})])
        for parameter in trainer.parameters:
            parameter.grad = torch.full_like(parameter, 1e-3)
        optimizer.step()
        real = memory.real_optimizer_state_bytes(optimizer)
        assert memory.optimizer_state_bytes(name, trainer.parameters) == real, name
        if name == "prodigy":  # meta tensors hide which LoRA weights are all zero: their p0 is counted in full
            assert estimate.optimizers[name] >= real
        else:
            assert estimate.optimizers[name] == real, name
    assert estimate.optimizer == estimate.optimizers["adamw"]
    trainer.fit()  # the trainer's own optimizer, after real steps
    assert estimate.optimizers["adamw"] == memory.real_optimizer_state_bytes(trainer.units[0].optimizer)


def saved_tensor_bytes(trainer, batch) -> tuple[int, int]:
    """(bytes, largest) of the distinct storages autograd saves for backward in one real CPU forward of the
    trainer's loss on `batch`, parameters and buffers excluded (a quantized weight by its inner tensors,
    tuneline.models.quantize.stored_tensors): what the estimate's activation term counts."""
    from tuneline.models.quantize import quantized_layers, stored_tensors

    modules = [*trainer.modules.values(), *trainer.adapter.frozen_modules().values()]
    layers = list(quantized_layers(modules))
    quantized = {id(layer.weight) for layer in layers}
    owned = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]
             if id(t) not in quantized}
    owned |= {t.untyped_storage().data_ptr() for layer in layers for t in stored_tensors(layer).values()}
    saved: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in owned:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    for module in trainer.modules.values():
        module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), trainer.accelerator.autocast():
        loss, _ = trainer.adapter.loss(trainer.modules, batch, torch.Generator().manual_seed(0), 0)
    assert loss.requires_grad
    return sum(saved.values()), max(saved.values())


# The estimate (meta device) against the tensors a real CPU step saves on the same batch. Without
# mixed precision CPU and CUDA save the same tensors: measured 1.03-1.05 (the estimate counts a few
# extra small tensors). Under bf16 the estimate follows CUDA autocast's op lists, the CPU run its
# own (group norm in bf16): SDXL 1.15, Z-Image 1.01.
ACTIVATION_BOUNDS = {"no": (0.98, 1.10), "bf16": (0.95, 1.25)}


@pytest.mark.parametrize("family, settings", [
    ("sdxl", {}), ("zimage", {}), ("sdxl", {"mode": "full", "mixed_precision": "bf16"}),
    ("zimage", {"lora": {"rank": 4, "targets": "all"}, "mixed_precision": "bf16"}),
])
def test_the_activation_estimate_is_bounded_by_the_tensors_a_cpu_step_saves(request, family, settings, tmp_path):
    from tuneline.stages.train.memory import estimate_training_memory

    project = family_project(request, family)
    params = train_params(project, **settings)
    trainer = make_trainer(project, tmp_path, params)
    estimate = estimate_training_memory(params, project.root, bucket=(64, 64), batch_size=2)
    batch = trainer.adapter.example_batch(2, (64, 64), "cpu", with_text=trainer.data.text_cache)
    saved, largest = saved_tensor_bytes(trainer, batch)
    low, high = ACTIVATION_BOUNDS[params.train.mixed_precision]
    assert estimate.detail["checkpointed_block"] == 0
    assert low <= estimate.detail["saved"] / saved <= high, (estimate.detail, saved)
    assert low <= estimate.activations / (saved + 2 * largest) <= high, (estimate.detail, saved, largest)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_estimates_less_but_at_least_what_stays_saved(request, family, tmp_path):
    """With checkpointing a step keeps the blocks' inputs (and what runs outside them) through the whole
    forward, and one block's saves at a time in backward: the estimate lies between the tensors kept
    outside the blocks and the estimate without checkpointing."""
    from tuneline.stages.train.memory import estimate_training_memory

    project = family_project(request, family)
    plain, checkpointed = (train_params(project, gradient_checkpointing=on) for on in (False, True))
    trainer = make_trainer(project, tmp_path, checkpointed)
    batch = trainer.adapter.example_batch(2, (64, 64), "cpu", with_text=trainer.data.text_cache)
    kept, _ = saved_tensor_bytes(trainer, batch)  # inside a checkpointed block autograd saves nothing
    with_blocks, without = (estimate_training_memory(p, project.root, bucket=(64, 64), batch_size=2)
                            for p in (checkpointed, plain))
    assert with_blocks.detail["checkpointed_block"] > 0
    assert kept <= with_blocks.detail["saved"] + with_blocks.detail["checkpointed_block"]
    assert kept <= with_blocks.activations < 0.5 * without.activations, (kept, with_blocks.detail, without.detail)


def test_check_prints_the_gpu_memory_estimate(latents_project, capsys):
    from tuneline.cli import main

    root = latents_project.root
    data = {**latents_project.params_data, "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}}
    (root / "check.yaml").write_text(yaml.safe_dump(data), "utf-8")
    assert main(["--root", str(root), "--params", str(root / "check.yaml"), "check"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for part in ("frozen weights, bf16", "trained parameters, fp32", "optimizer state (adamw)",
                 "activations at 64x64, batch 2 (estimated)", "peak (estimated)", "8 GiB yes"):
        assert part in out, part
    assert main(["--root", str(root), "--params", str(root / "check.yaml"), "check", "--no-memory"]) == 0
    assert "peak" not in capsys.readouterr().out


def test_speed_settings_leave_the_run_key_and_resume_alone():
    from tuneline.train.config import TrainConfig
    from tuneline.train import checkpoint

    def key(config):
        return checkpoint.run_key(config.model_dump(mode="json"), {"base": "m"}, "data", 1, {"64x64": 2})

    plain = TrainConfig()
    faster = TrainConfig(compile=True, compile_scope="model", channels_last=True, mixed_precision="bf16")
    assert key(plain) == key(faster)
    # Another batch size or data is another run (its saved sampler position indexes other batches):
    # a bucket.batch_size change under `dvc repro` trains anew, never "resumes".
    config = plain.model_dump(mode="json")
    assert len({key(plain), checkpoint.run_key(config, {"base": "m"}, "data", 1, {"64x64": 1}),
                checkpoint.run_key(config, {"base": "m"}, "other data", 1, {"64x64": 2})}) == 3
    # A checkpoint written before these settings existed resumes without a note about them.
    older = {k: v for k, v in plain.model_dump(mode="json").items() if k not in ("compile_scope", "channels_last")}
    assert checkpoint.compare_configs(older, plain.model_dump(mode="json")) == ([], [])
    safe, unsafe = checkpoint.compare_configs(older, faster.model_dump(mode="json"))
    assert unsafe == [] and [line.split(":")[0] for line in safe] == ["train.compile", "train.mixed_precision"]


def protocol_members(protocol: type) -> dict[str, object]:
    """name -> the protocol's own definition (a function, or None for a data attribute), over its bases."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False) or klass.__name__ == "Protocol":
            continue
        members.update({name: None for name in klass.__dict__.get("__annotations__", {})})
        members.update({name: value for name, value in klass.__dict__.items()
                        if not name.startswith("_") and (callable(value) or isinstance(value, property))})
    return members


def assert_implements(instance: object, protocol: type) -> None:
    """Every member of `protocol` is on `instance`; methods take the protocol's parameters, by name."""
    import inspect

    for name, definition in protocol_members(protocol).items():
        assert hasattr(instance, name), f"{type(instance).__name__} lacks {protocol.__name__}.{name}"
        if inspect.isfunction(definition):
            wanted = list(inspect.signature(definition).parameters)[1:]
            found = list(inspect.signature(getattr(instance, name)).parameters)
            assert found[:len(wanted)] == wanted, f"{type(instance).__name__}.{name}{found} is not {wanted}"


def test_every_adapter_implements_the_whole_trainer_contract(latents_project, tmp_path):
    """The trainer probes nothing: SDXL, Z-Image and the autoencoder implement every member of the
    Protocol it calls (the diffusion families the memory estimate's and live samples' too), every
    config section and data source what the trainer reads of them."""
    from tuneline.models.autoencoder.config import AutoencoderConfig
    from tuneline.models.config import ModelConfig
    from tuneline.models.family import FAMILIES
    from tuneline.models.registry import AUTOENCODER_KL, AUTOENCODER_VQ, build_adapter
    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.train.stage import latent_data
    from tuneline.train.adapter import DiffusionAdapter, TrainerAdapter, TrainerConfig, TrainingData
    from tuneline.train.config import TrainConfig

    assert {"load", "unit_losses", "optimization_units", "ema_modules", "compiled_module"} <= \
        set(protocol_members(TrainerAdapter))
    assert {"loss", "example_batch", "prediction_type"} <= set(protocol_members(DiffusionAdapter))
    for family in FAMILIES:
        adapter = build_adapter(family, ModelConfig(base=f"tiny-{family}"), TrainConfig(), tmp_path)
        assert_implements(adapter, DiffusionAdapter)
        assert adapter.family == family and adapter.compiled_module in ("unet", "transformer")
    assert_implements(build_adapter(AUTOENCODER_VQ, ModelConfig(), AutoencoderConfig(kind="vq", mode="full"), tmp_path),
                      TrainerAdapter)
    autoencoder = build_adapter(AUTOENCODER_KL, ModelConfig(), AutoencoderConfig(), tmp_path)
    assert_implements(autoencoder, TrainerAdapter)
    # The check itself catches what the autoencoder does not offer: load(empty_weights), prediction_type, loss.
    with pytest.raises(AssertionError, match=r"AutoencoderAdapter\.load\['conditioning_cached'\] is not"):
        assert_implements(autoencoder, DiffusionAdapter)
    autoencoder.load = lambda conditioning_cached=False, empty_weights=False: None
    with pytest.raises(AssertionError, match=r"AutoencoderAdapter lacks DiffusionAdapter\.(prediction_type|loss)"):
        assert_implements(autoencoder, DiffusionAdapter)
    for section in (TrainConfig(), AutoencoderConfig()):
        assert_implements(section, TrainerConfig)
    params = train_params(latents_project)
    assert_implements(latent_data(params, latents_project.root / "data/latents"), TrainingData)
    assert_implements(ImageData.__new__(ImageData), TrainingData)


def test_the_run_key_is_the_one_older_checkpoints_were_written_under(latents_project, tmp_path):
    """Checkpoints written before the trainer took a ModelSource still resume: the run key (their folder's
    name) and what a resume compares are computed from the same values as then (the model section with
    the identity models.ref.identify gives model.base and model.vae)."""
    from tuneline.models.ref import identify
    from tuneline.tiny import resolve_tiny
    from tuneline.train import checkpoint

    vae = tmp_path / "my-vae"
    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", vae)
    plain = train_params(latents_project)
    with_vae = plain.model_copy(update={"model": plain.model.model_copy(update={"vae": str(vae)})})
    for params in (plain, with_vae):
        trainer = make_trainer(latents_project, tmp_path / str(bool(params.model.vae)), params)
        identity = {key: entry["identity"] for key, entry in
                    identify(params, latents_project.root, ("model.base", "model.vae")).items()}
        assert sorted(identity) == (["model.base", "model.vae"] if params.model.vae else ["model.base"])
        assert trainer.model.identity == identity
        # The model section as it was dumped before model.variant / quantize / training_adapter existed.
        older = {key: value for key, value in params.model.model_dump(mode="json").items()
                 if key not in ("variant", "quantize", "training_adapter")}
        assert trainer.run_key == checkpoint.run_key(
            params.train.model_dump(mode="json"), {**older, "identity": identity},
            trainer.data.digest(), 1, trainer.data.batching())
        saved = checkpoint.read_state(trainer.save())
        assert saved["model"] == params.model.model_dump(mode="json") and saved["model_identity"] == identity
        assert set(saved) == {"train_state", "train_config", "model", "data_digest", "processes", "batching",
                              "model_identity"}
