"""`dvc repro` on a copy of the project with the embedded demo data: the README's main job,
and the Prefect flow in the same workspace, neither invalidating the other."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_TREES, save_photo
from test_flows import prefect_env  # noqa: F401  (autouse: ephemeral Prefect, one PREFECT_HOME per session)

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "scan", "ingest", "bucket", "autoencoder", "caption", "latents", "train", "render", "export")


def metrics(root: Path, stage: str) -> dict:
    """metrics/<stage>.json: the numbers DVC tracks."""
    return json.loads((root / f"metrics/{stage}.json").read_text())


def run_report(root: Path, stage: str) -> dict:
    """reports/<stage>.json: what the stage's last run did (computed, reused, ...)."""
    return json.loads((root / f"reports/{stage}.json").read_text())


def dvc(cwd: Path, *args: str, terminal: list[str] | None = None) -> str:
    """dvc's stdout; `terminal` gets the lines of both streams (the stages' warnings go to stderr)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    if terminal is not None:
        terminal.extend((done.stdout + done.stderr).splitlines())
    return done.stdout


def flow(root: Path) -> dict:
    """The Prefect flow (what `python -m flows.pipeline --root <root>` runs), in this process: one
    ephemeral Prefect server for both runs (and test_flows' in the same worker); returns its summary."""
    from tuneline.orchestration.flow import pipeline

    return pipeline(root=str(root))["stages"]


def tracked_files(root: Path) -> dict[str, str]:
    """sha256 of every file under every outs / metrics / plots path of dvc.yaml, and of dvc.lock."""
    paths = {"dvc.lock"}
    for spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for field in ("outs", "metrics", "plots"):
            paths |= {next(iter(entry)) if isinstance(entry, dict) else entry for entry in spec.get(field, [])}
    found = {}
    for path in sorted(paths):
        for file in [root / path] if (root / path).is_file() else sorted((root / path).rglob("*")):
            if file.is_file():
                found[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


@pytest.mark.slow
def test_dvc_repro_runs_the_demo_and_reruns_only_what_changed(tmp_path):
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "prompts.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in PROJECT_TREES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    # The demo's 30 training steps and 8-step renders, three times over, would dominate the test:
    # 4 steps and 2-step 128 px renders prove the same.
    params = (tmp_path / "params.yaml").read_text()
    params = params.replace("num_steps: 30", "num_steps: 4", 1).replace("steps: 8 ", "steps: 2 ", 1)
    (tmp_path / "params.yaml").write_text(params.replace("height: 256", "height: 128", 1)
                                          .replace("width: 256", "width: 128", 1))

    terminal: list[str] = []
    out = dvc(tmp_path, "repro", terminal=terminal)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    # Every warning once (tiny models, the autoencoder that is off), and none from DVC about an empty output.
    warnings = [line for line in terminal if line.lower().startswith("warning")]
    assert warnings and len(warnings) == len(set(warnings)), warnings
    assert not [line for line in terminal if "is empty" in line]
    manifest = (tmp_path / "data/bucketed/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 14
    assert run_report(tmp_path, "bucket")["computed"] == 14
    assert run_report(tmp_path, "latents")["computed"] == 14
    assert metrics(tmp_path, "train")["steps"] == 4
    assert (tmp_path / "models/train/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "renders/contact_sheet.png").is_file()
    assert (tmp_path / "export/tuneline-demo.safetensors").is_file()
    # The render prompts (and transfer prompts) were cached by latents: render loaded no text encoder.
    assert run_report(tmp_path, "render")["prompt_embeddings"] == "cache (data/prompt_embeds)"
    assert "metrics/train_loss.csv" in dvc(tmp_path, "plots", "show", "--json")
    # Offline plots: the page's Vega plots need a CDN, the loss picture is a file beside it.
    dvc(tmp_path, "plots", "show", "--out", str(tmp_path / "plots-html"))
    page = (tmp_path / "plots-html/index.html").read_text()
    picture = next((tmp_path / "plots-html/static").glob("*train_loss.png"))
    assert f'<img src="static/{picture.name}">' in page
    assert picture.read_bytes() == (tmp_path / "metrics/train_loss.png").read_bytes()
    # Tracked metrics: a few numbers, each decided by the inputs (what the run did is in reports/).
    assert {stage: sorted(metrics(tmp_path, stage)) for stage in ("models", "scan", "bucket", "train", "render",
                                                                   "export")} == {
        "models": ["items"], "scan": ["items", "problems"], "bucket": ["items", "rejected"],
        "train": ["loss", "seconds_per_step", "steps", "val_loss_best", "val_loss_best_step"],
        "render": ["items", "mean_abs_diff_vs_base"], "export": ["bytes", "items"]}
    # The demo holds one shape out and validates every 10 steps and on the last: a row each, a DVC plot.
    assert "metrics/train_val.csv" in dvc(tmp_path, "plots", "show", "--json")
    steps = metrics(tmp_path, "train")["steps"]
    validated = [int(row.split(",")[0]) for row in (tmp_path / "metrics/train_val.csv").read_text().splitlines()[1:]]
    assert validated == sorted({*range(10, steps + 1, 10), steps})
    assert metrics(tmp_path, "train")["val_loss_best_step"] in validated

    # The Prefect flow in the same workspace: it has no records yet, so every stage runs, computes
    # nothing (all from the item store, training resumes at its last step) and writes the same bytes.
    before = tracked_files(tmp_path)
    started = time.monotonic()
    stages = flow(tmp_path)
    first_flow_s = time.monotonic() - started
    assert not any(result["cached"] for result in stages.values())
    done = {stage: (result["report"]["computed"], result["report"]["items"]) for stage, result in stages.items()}
    raw_files = sum(1 for path in (tmp_path / "data/raw").rglob("*") if path.is_file())
    assert done == {"models": (0, 2), "scan": (0, raw_files), "ingest": (0, 14), "bucket": (0, 14), "autoencoder": (0, 0),
                    "caption": (0, 14), "latents": (0, 14), "train": (0, 4), "render": (0, 9), "export": (0, 1)}, done
    assert stages["train"]["report"]["reused"] == 4  # 0 steps trained, 4 done before
    assert (stages["render"]["report"]["base_rendered"], stages["render"]["report"]["final_rendered"]) == (0, 0)
    after = tracked_files(tmp_path)
    assert [path for path in sorted(set(before) | set(after)) if before.get(path) != after.get(path)] == []
    # Nothing DVC tracks changed: `dvc status` names only `models` and `scan` (always_changed)...
    status = json.loads(dvc(tmp_path, "status", "--json"))
    assert status == {"models": ["always changed"], "scan": ["always changed"]}, status

    out = dvc(tmp_path, "repro")
    # ...and `dvc repro` runs only those two; their outputs are unchanged, so nothing else runs.
    assert [line for line in out.splitlines() if "Running stage" in line] == ["Running stage 'models':",
                                                                             "Running stage 'scan':"]
    assert tracked_files(tmp_path) == after
    # It kept its previous identity (a persistent output), so it knows nothing changed and says nothing.
    assert (run_report(tmp_path, "models")["computed"], run_report(tmp_path, "models")["warnings"]) == (0, [])
    assert "identity changed" not in out
    # The flow again after DVC: every stage is a cache hit (`models` and `scan` run always, computing nothing).
    started = time.monotonic()
    stages = flow(tmp_path)
    second_flow_s = time.monotonic() - started
    assert {stage for stage, result in stages.items() if not result["cached"]} == {"models", "scan"}
    assert stages["models"]["report"]["computed"] == stages["scan"]["report"]["computed"] == 0
    assert tracked_files(tmp_path) == after
    print(f"flow after dvc repro: {first_flow_s:.1f} s; flow again: {second_flow_s:.1f} s")
    # The loss picture is an artifact of the training run (DVC's, which trained the steps).
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id],
                              "tags.`tuneline.stage` = 'train'", order_by=["attributes.start_time ASC"])
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "train")] == ["train/train_loss.png"]
    # From here on without MLflow: each tracked stage process pays about 3.5 s for it, and what follows
    # asserts on DVC and the store. `tracking` is no dvc.yaml param, so DVC reruns nothing for it.
    document = yaml.safe_load((tmp_path / "params.yaml").read_text())
    document["tracking"] = {**document.get("tracking", {}), "enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))

    # A prompt edit rerenders; it never retrains. latents reruns to cache the new prompt's embeddings
    # (data/prompt_embeds), every item reused and data/latents byte for byte as it was, so train does not.
    latents_files = {path: digest for path, digest in tracked_files(tmp_path).items() if path.startswith("data/latents/")}
    prompts = (tmp_path / "prompts.yaml").read_text()
    (tmp_path / "prompts.yaml").write_text(prompts.replace("shp", "shp, blue", 1))
    out = dvc(tmp_path, "repro")
    assert "Running stage 'latents'" in out and "Running stage 'render'" in out
    assert "Running stage 'train'" not in out
    latents = run_report(tmp_path, "latents")
    assert (latents["computed"], latents["reused"], latents["prompt_embeddings_computed"]) == (0, 14, 1)
    assert {path: digest for path, digest in tracked_files(tmp_path).items()
            if path.startswith("data/latents/")} == latents_files
    # Only the edited prompt is rendered again, base and trained; the other images come from the store.
    assert (run_report(tmp_path, "render")["base_rendered"], run_report(tmp_path, "render")["final_rendered"]) == (1, 1)
    assert run_report(tmp_path, "render")["prompt_embeddings"] == "cache (data/prompt_embeds)"

    # (A bucket-only parameter: test_bucket's counts, test_train's run key. Code deps that move: item
    # keys hold CODE versions, never dvc.yaml's paths, test_layout.)
    # More steps: DVC reruns train, which resumes; the loss curve keeps steps 1-4 (DVC deletes the
    # declared plot file before the stage runs; the run's history lives with its checkpoints).
    params = (tmp_path / "params.yaml").read_text().replace("num_steps: 4", "num_steps: 6", 1)
    (tmp_path / "params.yaml").write_text(params)
    dvc(tmp_path, "repro", "train")
    assert (run_report(tmp_path, "train")["reused"], run_report(tmp_path, "train")["computed"]) == (4, 2)
    steps = [line.split(",")[0] for line in (tmp_path / "metrics/train_loss.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, 7)]

    # One new photo: one decode, one crop, one caption (no sidecar), one latent (through latents: that
    # new latents start a new training run is the run key's, test_train).
    save_photo(tmp_path / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    out = dvc(tmp_path, "repro", "latents")
    for stage in ("ingest", "bucket", "caption", "latents"):
        assert f"Running stage '{stage}'" in out
        found = run_report(tmp_path, stage)
        assert (found["computed"], found["reused"] + found.get("given", 0)) == (1, 14), stage

    # The autoencoder stage, enabled: it trains the VAE, and latents (which now encode with it)
    # recompute every item, because the VAE's identity is in the latent key; nothing upstream runs.
    document = yaml.safe_load((tmp_path / "params.yaml").read_text())
    document["autoencoder"].update(enabled=True, num_steps=2, crop_size=64, batch_size=2, eval_every=2,
                                   discriminator={"start": 0, "every": 1, "channels": 8, "layers": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    out = dvc(tmp_path, "repro", "latents")
    assert [line for line in out.splitlines() if "Running stage" in line] == [
        "Running stage 'models':", "Running stage 'scan':", "Running stage 'autoencoder':", "Running stage 'latents':"]
    assert metrics(tmp_path, "autoencoder")["enabled"] == 1 and metrics(tmp_path, "autoencoder")["steps"] == 2
    assert (tmp_path / "models/autoencoder/sheets/shapes.png").is_file()
    assert (run_report(tmp_path, "latents")["computed"], run_report(tmp_path, "latents")["reused"]) == (15, 0)
    assert json.loads((tmp_path / "data/latents/latents.json").read_text())["vae"] == "models/autoencoder"
    # Off again: the no-op's output is the one DVC saw before, so DVC restores the base VAE's latents
    # from its run cache without running the stage.
    document["autoencoder"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    out = dvc(tmp_path, "repro", "latents")
    assert "Running stage 'autoencoder'" in out and "Running stage 'latents'" not in out
    assert "Stage 'latents' is cached - skipping run, checking out outputs" in out
    assert json.loads((tmp_path / "data/latents/latents.json").read_text())["vae"] == "tiny-sdxl"
