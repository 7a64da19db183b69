"""Never a stale result, never a needless rerun: `dvc repro` on the demo after a model is
replaced in place and after a rename, with exact per-stage computed counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from test_dvc_pipeline import REPO, dvc, run_report
from test_flows import demo_project

# Through latents: that a new latent starts a new training run (never a resume) is test_dvc_pipeline's.
STAGES = ("models", "ingest", "bucket", "autoencoder", "caption", "latents")


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def demo(tmp_path):
    """The demo through `latents`, under git and DVC."""
    demo_project(tmp_path, STAGES)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


@pytest.mark.slow
def test_renames_and_models_replaced_in_place(demo):
    from tuneline.tiny import resolve_tiny

    assert ran(dvc(demo, "repro")) == set(STAGES)

    # A rename (image and sidecar, same bytes): ingest and bucket rerun and compute nothing, and
    # nothing after them runs: their outputs hold no paths, so they are byte for byte the same.
    source = next(p for p in sorted((demo / "data/raw/shapes").glob("*.jpg")) if p.with_suffix(".txt").is_file())
    source.rename(source.with_name("renamed.jpg"))
    source.with_suffix(".txt").rename(source.with_name("renamed.txt"))
    out = dvc(demo, "repro")
    assert ran(out) == {"models", "ingest", "bucket"}, out
    assert (run_report(demo, "ingest")["computed"], run_report(demo, "bucket")["computed"]) == (0, 0)
    sources = [json.loads(line)["source"] for line in (demo / "data/ingested/manifest.jsonl").read_text().splitlines()]
    assert "data/raw/shapes/renamed.jpg" in sources

    # A local copy of the base's VAE: the same bytes, the same identity, so nothing recomputes.
    vae = demo / "my-vae"
    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", vae)
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["model"]["vae"] = "my-vae"
    (demo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (autoencoder reads the model too: off, it reruns as the no-op it is)
    assert ran(dvc(demo, "repro")) == {"models", "autoencoder", "caption", "latents"}
    assert (run_report(demo, "caption")["computed"], run_report(demo, "latents")["computed"]) == (0, 0)
    first_identity = json.loads((demo / "models/identity/models.json").read_text())["model.vae"]["identity"]

    # The same path, other weights; nothing in params.yaml or dvc.yaml changed.
    weights = vae / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    out = dvc(demo, "repro")
    assert ran(out) == {"models", "autoencoder", "caption", "latents"}, out  # caption reruns, computes nothing
    assert json.loads((demo / "models/identity/models.json").read_text())["model.vae"]["identity"] != first_identity
    assert (run_report(demo, "caption")["computed"], run_report(demo, "latents")["computed"]) == (0, 14)

    assert ran(dvc(demo, "repro")) == {"models"}  # unchanged: only the identity check runs
