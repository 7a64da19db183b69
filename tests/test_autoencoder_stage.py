"""Stage autoencoder in the pipeline, on the tiny RANDOM VAE: the stages after it use its VAE, a
SIGKILLed run resumes exactly through the CLI, and MLflow gets its curves, evaluations and sheets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import Project, save_photo
from resume_checks import AUTOENCODER_KINDS, assert_resumed_exactly, checkpoint_at, latest_step

REPO = Path(__file__).resolve().parents[1]


def stage_env() -> dict[str, str]:
    # This checkout's code, also when the venv's editable install points at another one.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> Project:
    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    project = Project(tmp_path_factory.mktemp("ae-stage"))
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=2)
    for i in range(3):
        save_photo(project.raw("alpha") / f"a{i}.png", (64, 64), seed=i)
        save_photo(project.raw("beta") / f"b{i}.png", (64, 64), seed=20 + i)
    params = project.params()
    project.ingest(params)
    project.bucket(params)
    return project


def cli_project(bucketed: Project, root: Path, **autoencoder) -> Path:
    shutil.copytree(bucketed.root / "data/bucketed", root / "data/bucketed")
    section = {"enabled": True, "crop_size": 32, "batch_size": 2, "num_steps": 6, "seed": 3, "lr": 1e-3,
               "eval_every": 3, "checkpoint": {"every_steps": 2, "keep_last": 5},
               "discriminator": {"start": 1, "every": 2, "channels": 8, "layers": 2, "lr": 1e-3}, **autoencoder}
    (root / "params.yaml").write_text(yaml.safe_dump({**bucketed.params_data, "autoencoder": section}), "utf-8")
    return root


def start(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneline.cli", "autoencoder"], cwd=root, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def base_weights(root: Path, run: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of the CLI project at `root` before step 1 (same seed: same discriminator)."""
    from accelerate.state import AcceleratorState

    from tuneline.config import validate_params
    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.autoencoder.stage import build_trainer

    params = validate_params(yaml.safe_load((root / "params.yaml").read_text("utf-8")))
    AcceleratorState._reset_state(True)
    trainer = build_trainer(params, root, ImageData(params, root / "data/bucketed"), run)
    trainer.setup()
    return trainer.trained_weights()


@pytest.mark.slow
# The process-level path is the trainer core's, the same for both kinds; each kind's own resume state (the
# VQ codebook's EMA included) is test_autoencoder's in-process resume, parametrized (CI time: about 40 s a kind).
@pytest.mark.parametrize("kind", ["kl"])
def test_kill_9_then_resume_matches_a_straight_run_and_mlflow_has_the_run(bucketed, tmp_path, kind):
    ema = {"ema": {"enabled": True, "decay": 0.9}, **AUTOENCODER_KINDS[kind]}
    straight = cli_project(bucketed, tmp_path / "straight", **ema)
    process = start(straight)
    output = process.communicate(timeout=400)[0]
    assert process.returncode == 0, output
    killed = cli_project(bucketed, tmp_path / "killed", **ema)
    process = start(killed)
    deadline = time.time() + 400
    while not list(killed.glob("checkpoints/autoencoder/*/step_000004")):
        assert time.time() < deadline and process.poll() is None, process.stdout.read() if process.poll() else ""
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = latest_step(killed / "checkpoints/autoencoder")
    # Step 4's folder was there; `latest` still names step 2 if the kill landed between the rename and its update.
    assert 2 <= stopped_at < 6, f"the kill landed after the run finished (latest step {stopped_at}): nothing resumed"
    resumed = start(killed)
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and f"step_{stopped_at:06d} at step {stopped_at}" in output, output
    [a] = [load_file(p) for p in straight.glob("checkpoints/autoencoder/*/step_000006/trained.safetensors")]
    [b] = [load_file(p) for p in killed.glob("checkpoints/autoencoder/*/step_000006/trained.safetensors")]
    assert {k.split(".")[0] for k in a} == {"vae", "discriminator"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_resumed_exactly(checkpoint_at(straight / "checkpoints/autoencoder", 6),
                           checkpoint_at(killed / "checkpoints/autoencoder", 6),
                           base_weights(killed, tmp_path / "base"), resumed_at=stopped_at, ema=True)
    # The written VAE: the same bytes either way, and a diffusers AutoencoderKL (kl) or VQModel (vq) folder.
    written = json.loads((straight / "models/autoencoder/config.json").read_text())["_class_name"]
    assert written == {"kl": "AutoencoderKL", "vq": "VQModel"}[kind]
    for name in ("diffusion_pytorch_model.safetensors", "config.json", "autoencoder_state.json", "sheets/alpha.png"):
        assert (straight / "models/autoencoder" / name).read_bytes() == (killed / "models/autoencoder" / name).read_bytes()
    metrics = json.loads((straight / "metrics/autoencoder.json").read_text())
    assert metrics["enabled"] == 1 and metrics["steps"] == 6
    assert set(metrics) >= {"psnr", "ssim", "psnr_base", "ssim_base", "psnr/alpha", "ssim/beta"}

    # MLflow: one run with the per-step terms of both units, the evaluations and the sheets.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{straight / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id],
                               "tags.`tuneline.stage` = 'autoencoder'")
    assert run.info.status == "FINISHED"
    names = ("loss/train", "autoencoder/grad_norm", "discriminator/stepped", "adaptive_weight", "disc_start", "disc_every",
             "disc_weight", "eval/psnr", "final/psnr", "base/psnr")
    vq_terms = ("commitment", "perplexity", "codebook_usage", "codes_restarted")
    metric = {name: [m.step for m in client.get_metric_history(run.info.run_id, name)]
              for name in names + vq_terms}
    assert metric["loss/train"] == metric["adaptive_weight"] == metric["disc_every"] == [1, 2, 3, 4, 5, 6]
    assert all(metric[name] == ([1, 2, 3, 4, 5, 6] if kind == "vq" else []) for name in vq_terms), metric
    assert metric["eval/psnr"] == [3, 6] and metric["final/psnr"] == [6] and metric["base/psnr"] == [6]
    stepped = [m.value for m in client.get_metric_history(run.info.run_id, "discriminator/stepped")]
    assert stepped == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # after disc_start (1), every 2nd step
    assert run.data.params["autoencoder.discriminator.every"] == "2"
    sheets = [a.path for a in client.list_artifacts(run.info.run_id, "autoencoder/sheets")]
    assert sheets == ["autoencoder/sheets/alpha.png", "autoencoder/sheets/beta.png"]


def test_later_stages_use_the_trained_vae_and_only_latents_recompute(latents_project, tmp_path):
    """Enabled, latents encode with models/autoencoder (every latent recomputes: the VAE's identity is
    in the key); disabled again, every latent comes back from the store."""
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.registry import stage
    from tuneline.stages.autoencoder import with_trained_vae
    from tuneline.tiny import resolve_tiny

    root = tmp_path / "project"
    for folder in ("data/captioned", "data/latents", ".tuneline/store"):
        shutil.copytree(latents_project.root / folder, root / folder)
    count = len((root / "data/latents/manifest.jsonl").read_text().splitlines())
    enabled = validate_params({**latents_project.params_data, "autoencoder": {"enabled": True, "crop_size": 32}})
    with pytest.raises(ParamsError, match="models/autoencoder holds no trained VAE"):
        stage("latents").run(enabled, root)
    # A "trained" VAE: the tiny base VAE with other weights.
    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", root / "models/autoencoder")
    weights = root / "models/autoencoder/diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 0.1
    tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"] + 0.1
    save_file(tensors, weights)
    assert with_trained_vae(enabled, root).model.vae == "models/autoencoder"
    assert stage("latents").uses_vae and not stage("caption").uses_vae and not stage("autoencoder").uses_vae

    report = stage("latents").run(enabled, root)
    assert (report.computed, report.reused) == (count, 0)
    assert json.loads((root / "data/latents/latents.json").read_text())["vae"] == "models/autoencoder"
    disabled = validate_params(latents_project.params_data)
    assert with_trained_vae(disabled, root) is disabled
    report = stage("latents").run(disabled, root)
    assert (report.computed, report.reused) == (0, count)


def test_render_puts_the_reconstruction_sheets_beside_its_contact_sheet(tmp_path):
    from PIL import Image

    from tuneline.config import validate_params
    from tuneline.stages.render.stage import autoencoder_sheets

    data = {"datasets": [{"name": "a", "path": "data/raw/a"}]}
    for name in ("alpha", "beta"):
        (tmp_path / "models/autoencoder/sheets").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 2), name == "alpha" and "red" or "blue").save(tmp_path / f"models/autoencoder/sheets/{name}.png")
    placed = autoencoder_sheets(validate_params({**data, "autoencoder": {"enabled": True}}), tmp_path, tmp_path / "renders")
    assert [p.relative_to(tmp_path).as_posix() for p in placed] == ["renders/autoencoder/alpha.png",
                                                                     "renders/autoencoder/beta.png"]
    assert placed[0].read_bytes() == (tmp_path / "models/autoencoder/sheets/alpha.png").read_bytes()
    # Off: the stale sheets go, none are placed.
    assert autoencoder_sheets(validate_params(data), tmp_path, tmp_path / "renders") == []
    assert not (tmp_path / "renders/autoencoder").exists()


def test_a_full_fine_tune_carries_the_vae_its_latents_were_made_with(latents_project, tmp_path):
    """With model.vae set (the autoencoder stage's VAE, or any other), the saved pipeline, and so the
    exported single-file checkpoint, holds that VAE, not the base's."""
    from conftest import make_trainer, train_params
    from tuneline.tiny import resolve_tiny

    vae = tmp_path / "my-vae"
    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", vae)
    tensors = load_file(vae / "diffusion_pytorch_model.safetensors")
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 0.5
    save_file(tensors, vae / "diffusion_pytorch_model.safetensors")
    params = train_params(latents_project, mode="full", num_steps=1)
    params = params.model_copy(update={"model": params.model.model_copy(update={"vae": str(vae)})})
    trainer = make_trainer(latents_project, tmp_path, params)
    trainer.fit()
    saved = load_file(trainer.save_outputs(tmp_path / "out") / "pipeline/vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], tensors[k]) for k in tensors)


def test_bf16_trains_and_fp16_is_refused_naming_the_allowed_values(bucketed, tmp_path):
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError
    from tuneline.stages.autoencoder.stage import run

    section = {"enabled": True, "crop_size": 32, "batch_size": 2, "num_steps": 2, "eval_every": 2,
               "discriminator": {"start": 0, "every": 1, "channels": 8, "layers": 2}}
    with pytest.raises(ParamsError, match="autoencoder.mixed_precision.*'no'.*'bf16'"):
        validate_params({**bucketed.params_data, "autoencoder": {**section, "mixed_precision": "fp16"}})
    params = validate_params({**bucketed.params_data, "autoencoder": {**section, "mixed_precision": "bf16"}})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one process, many trainers (a stage process has one)
    report = run(params, bucketed.root, bucketed.root / "data/bucketed", tmp_path / "out", tmp_path / "metrics",
                 checkpoint_dir=tmp_path / "checkpoints")
    assert report.extra["steps"] == 2 and report.extra["psnr"] == report.extra["psnr"]  # finite, not NaN


TWO_PROCESS_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

from tuneline.config import load_params
from tuneline.stages.autoencoder.data import ImageData
from tuneline.stages.autoencoder.stage import build_trainer

root = Path.cwd()
params = load_params(root / "params.yaml")
trainer = build_trainer(params, root, ImageData(params, root / "data/bucketed"), root / "checkpoints")
trainer.setup()

def digest():
    h = hashlib.sha256()
    for name in sorted(trainer.modules):
        for key, value in sorted(trainer.accelerator.unwrap_model(trainer.modules[name]).state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()

before = digest()
trainer.fit()
rank = trainer.accelerator.process_index
(root / f"digest-{rank}.json").write_text(json.dumps({"before": before, "after": digest()}))
"""


@pytest.mark.slow
def test_two_processes_train_one_autoencoder(bucketed, tmp_path):
    """Under `accelerate launch` with two processes, each unit's gradients are averaged over the processes
    (the VAE trains through encode/decode, not DDP's forward): both processes end with the same VAE,
    discriminator and codebook, different from where they started. Kind vq: its codebook statistics are
    summed over the processes too (kl has no state beyond the gradients; before the averaging, a kl run's
    two processes ended with different VAEs)."""
    from test_train import launch_two_processes

    root = tmp_path / "two"
    shutil.copytree(bucketed.root / "data", root / "data")
    section = {"enabled": True, "crop_size": 32, "batch_size": 2, "num_steps": 3, "eval_every": 100,
               "discriminator": {"start": 0, "every": 1, "channels": 8, "layers": 2},
               "checkpoint": {"every_steps": 100}}
    section.update(AUTOENCODER_KINDS["vq"])
    (root / "params.yaml").write_text(yaml.safe_dump({**bucketed.params_data, "autoencoder": section}), "utf-8")
    (root / "two.py").write_text(TWO_PROCESS_SCRIPT, "utf-8")
    launch_two_processes(root, "two.py")
    first, second = (json.loads((root / f"digest-{rank}.json").read_text()) for rank in (0, 1))
    assert first["before"] == second["before"]  # the same random start on both (the run's seed)
    assert first["after"] == second["after"]  # trained alike: the gradients were averaged
    assert first["after"] != first["before"]
