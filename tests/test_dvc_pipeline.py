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


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_runs_the_demo_and_reruns_only_what_changed(tmp_path):
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("stages", "src", "data/raw", ".dvc"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    out = dvc(tmp_path, "repro")
    assert "Running stage 'ingest'" in out and "Running stage 'bucket'" in out
    manifest = (tmp_path / "data/bucketed/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 14
    assert json.loads((tmp_path / "metrics/bucket.json").read_text())["computed"] == 14

    out = dvc(tmp_path, "repro")
    assert "Running stage" not in out and "up to date" in out

    save_photo(tmp_path / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    out = dvc(tmp_path, "repro")
    assert "Running stage 'ingest'" in out and "Running stage 'bucket'" in out
    for stage in ("ingest", "bucket"):
        metrics = json.loads((tmp_path / f"metrics/{stage}.json").read_text())
        assert (metrics["computed"], metrics["reused"]) == (1, 14)

    # A bucket-only parameter reruns bucket, not ingest.
    params = (tmp_path / "params.yaml").read_text().replace("batch_size: 2", "batch_size: 1")
    (tmp_path / "params.yaml").write_text(params)
    out = dvc(tmp_path, "repro")
    assert "Running stage 'bucket'" in out and "Running stage 'ingest'" not in out
    assert json.loads((tmp_path / "metrics/bucket.json").read_text())["computed"] == 0
