"""The Z-Image demo: params.zimage.yaml runs the whole pipeline under `dvc repro` on the embedded
demo data with the tiny RANDOM Z-Image; the Prefect flow in the same workspace adds a new photo
at the cost of one item in each data stage, and `dvc repro latents` after it recomputes nothing."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from conftest import PROJECT_TREES, item_tensors, save_photo
from test_dvc_pipeline import STAGES, dvc, flow, metrics, run_report, tracked_files
from test_flows import prefect_env  # noqa: F401  (autouse: ephemeral Prefect, one PREFECT_HOME per session)

REPO = Path(__file__).resolve().parents[1]


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), data


def test_the_zimage_params_are_the_demo_params_with_the_family_changes_only():
    from tuneline.config import load_params

    sdxl = dict(_leaves(yaml.safe_load((REPO / "params.yaml").read_text())))
    zimage = dict(_leaves(yaml.safe_load((REPO / "params.zimage.yaml").read_text())))
    changed = {key: zimage.get(key) for key in sdxl.keys() | zimage.keys() if sdxl.get(key) != zimage.get(key)}
    assert changed == {"model.base": "tiny-zimage", "train.loss.min_snr_gamma": None, "render.guidance_scale": None}
    assert load_params(REPO / "params.zimage.yaml").model.base == "tiny-zimage"


@pytest.mark.slow
def test_dvc_repro_runs_the_zimage_demo_and_reruns_only_what_changed(tmp_path):
    for name in ("dvc.yaml", ".dvcignore", "prompts.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in PROJECT_TREES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    document = yaml.safe_load((REPO / "params.zimage.yaml").read_text())
    # As in the SDXL demo test: 4 steps and 2-step 128 px renders prove the same as the demo's 30 and 8.
    document["train"]["num_steps"] = 4
    document["render"].update(steps=2, height=128, width=128, live_every=2)  # live samples at steps 2 and 4
    # MLflow is the SDXL tests' (test_dvc_pipeline, test_flows): each tracked stage process pays about
    # 3.5 s to import it and open its store, and this test starts 20 of them.
    document["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))

    out = dvc(tmp_path, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    assert run_report(tmp_path, "latents")["computed"] == 14
    latents = json.loads((tmp_path / "data/latents/latents.json").read_text())
    assert latents["family"] == "zimage" and latents["shift_factor"] == pytest.approx(0.1159)
    record = json.loads((tmp_path / "data/latents/manifest.jsonl").read_text().splitlines()[0])
    assert item_tensors(tmp_path / "data/latents", record)["mean"].shape[0] == 16
    # [tokens, hidden]: variable length
    assert item_tensors(tmp_path / "data/latents", record, "text_embeddings")["prompt_embeds"].ndim == 2
    state = json.loads((tmp_path / "models/train/trainer_state.json").read_text())
    assert state["family"] == "zimage" and metrics(tmp_path, "train")["steps"] == 4
    assert (tmp_path / "renders/contact_sheet.png").is_file() and list((tmp_path / "renders/transfer").glob("*.png"))
    assert run_report(tmp_path, "render")["live_steps"] == 2  # Z-Image live samples from the trainer's modules
    with safe_open(tmp_path / "export/tuneline-demo.safetensors", "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["modelspec.architecture"] == "Z-Image/lora"
    assert keys and all(key.startswith("diffusion_model.") for key in keys)

    # One new photo, through the Prefect flow (this family's flow run): one decode, one crop, one
    # caption, one latent; a new training run, rendered and exported.
    save_photo(tmp_path / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    stages = flow(tmp_path)
    assert not any(result["cached"] for result in stages.values())
    for stage in ("ingest", "bucket", "caption", "latents"):
        found = run_report(tmp_path, stage)
        assert (found["computed"], found["reused"] + found.get("given", 0)) == (1, 14), stage
    assert (stages["train"]["report"]["computed"], stages["train"]["report"]["reused"]) == (4, 0)
    assert stages["export"]["report"]["computed"] == 1
    # `dvc repro latents` after the flow: its outputs are not the ones in dvc.lock, so every data stage
    # runs, and each finds its items in the store; the bytes stay the flow's. (Through train, render and
    # export the same holds the other way round: test_dvc_pipeline runs the flow after `dvc repro`.)
    # (`models` counts the identities it writes again into the folder DVC cleared: same content.)
    data_stages = ("models", "scan", "ingest", "bucket", "autoencoder", "caption", "latents")
    before = {path: digest for path, digest in tracked_files(tmp_path).items() if path.startswith("data/")}
    out = dvc(tmp_path, "repro", "latents")
    assert [line for line in out.splitlines() if "Running stage" in line] == [
        f"Running stage '{stage}':" for stage in data_stages]
    for stage in data_stages[1:]:
        assert run_report(tmp_path, stage)["computed"] == 0, stage
    assert {path: digest for path, digest in tracked_files(tmp_path).items() if path.startswith("data/")} == before
