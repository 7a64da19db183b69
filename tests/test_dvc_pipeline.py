"""`dvc repro` on a copy of the project with the embedded demo data: the README's main job."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_photo

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "ingest", "bucket", "caption", "latents", "train", "render", "export")


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / f"metrics/{stage}.json").read_text())


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_runs_the_demo_and_reruns_only_what_changed(tmp_path):
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "prompts.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("stages", "src", "data/raw", ".dvc"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    # The demo's 30 training steps and 8-step renders, three times over, would dominate the test:
    # 4 steps and 2-step 128 px renders prove the same.
    params = (tmp_path / "params.yaml").read_text()
    params = params.replace("num_steps: 30", "num_steps: 4", 1).replace("steps: 8 ", "steps: 2 ", 1)
    (tmp_path / "params.yaml").write_text(params.replace("height: 256", "height: 128", 1)
                                          .replace("width: 256", "width: 128", 1))

    out = dvc(tmp_path, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    manifest = (tmp_path / "data/bucketed/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 14
    assert metrics(tmp_path, "bucket")["computed"] == 14
    assert metrics(tmp_path, "latents")["computed"] == 14
    assert metrics(tmp_path, "train")["steps"] == 4
    assert (tmp_path / "models/train/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "renders/contact_sheet.png").is_file()
    assert (tmp_path / "export/tuneline-demo.safetensors").is_file()
    assert "metrics/train_loss.csv" in dvc(tmp_path, "plots", "show", "--json")

    out = dvc(tmp_path, "repro")
    # Only `models` runs (always_changed); its output is unchanged, so nothing else does.
    assert [line for line in out.splitlines() if "Running stage" in line] == ["Running stage 'models':"]

    # One new photo: one decode, one crop, one caption (no sidecar), one latent; a new training run.
    save_photo(tmp_path / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    out = dvc(tmp_path, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    for stage in ("ingest", "bucket", "caption", "latents"):
        found = metrics(tmp_path, stage)
        assert (found["computed"], found["reused"] + found.get("given", 0)) == (1, 14), stage

    # A bucket-only parameter reruns bucket, not ingest.
    params = (tmp_path / "params.yaml").read_text().replace("batch_size: 2", "batch_size: 1")
    (tmp_path / "params.yaml").write_text(params)
    out = dvc(tmp_path, "repro")
    assert "Running stage 'bucket'" in out and "Running stage 'ingest'" not in out
    assert metrics(tmp_path, "bucket")["computed"] == 0
    assert metrics(tmp_path, "latents")["computed"] == 0
    # The batch sequence changed: a new training run of all 4 steps, never a "resume" of the old one.
    assert (metrics(tmp_path, "train")["computed"], metrics(tmp_path, "train")["reused"]) == (4, 0)

    # A prompt edit rerenders; it never retrains.
    prompts = (tmp_path / "prompts.yaml").read_text()
    (tmp_path / "prompts.yaml").write_text(prompts.replace("shp", "shp, blue", 1))
    out = dvc(tmp_path, "repro")
    assert "Running stage 'render'" in out
    assert "Running stage 'train'" not in out and "Running stage 'latents'" not in out
    # Only the edited prompt is rendered again, base and trained; the other images come from the store.
    assert (metrics(tmp_path, "render")["base_rendered"], metrics(tmp_path, "render")["final_rendered"]) == (1, 1)

    # More steps: DVC reruns train, which resumes; the loss curve keeps steps 1-4 (DVC deletes the
    # declared plot file before the stage runs; the run's history lives with its checkpoints).
    params = (tmp_path / "params.yaml").read_text().replace("num_steps: 4", "num_steps: 6", 1)
    (tmp_path / "params.yaml").write_text(params)
    dvc(tmp_path, "repro", "train")
    assert (metrics(tmp_path, "train")["reused"], metrics(tmp_path, "train")["computed"]) == (4, 2)
    steps = [line.split(",")[0] for line in (tmp_path / "metrics/train_loss.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, 7)]

    # Code deps that move (as when modules are reorganised) rerun the data stages, but item keys
    # hold code versions, not paths: every item comes from the store.
    dvc_yaml = (tmp_path / "dvc.yaml").read_text()
    for stage in ("ingest", "bucket", "caption", "latents"):
        dvc_yaml = dvc_yaml.replace(f"      - stages/{stage}.py\n",
                                    f"      - stages/{stage}.py\n      - src/tuneline/core/layout.py\n", 1)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml)
    out = dvc(tmp_path, "repro", "latents")
    for stage in ("ingest", "bucket", "caption", "latents"):
        assert f"Running stage '{stage}'" in out
        assert metrics(tmp_path, stage)["computed"] == 0, stage
        assert metrics(tmp_path, stage)["reused"] + metrics(tmp_path, stage).get("given", 0) == 15, stage
