"""A DVC remote shared by copies of the project: `dvc push --run-cache` on one; on a git
clone of it `dvc pull --run-cache` then `dvc repro` runs no stage but the scan of the raw files; a copy
without its dvc.lock restores the other stages from the run cache (`dvc repro --pull`).

This needs every output DVC-cached: a `cache: false` output (the metrics files once were)
is pushed by neither `dvc push` nor the run cache, and metrics/ is git-ignored, so a
clone would rerun every stage.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_TREES

REPO = Path(__file__).resolve().parents[1]
STAGES = ("scan", "ingest", "bucket")  # the run-cache works the same for every stage; these are fast
CACHED = ("ingest", "bucket")  # scan runs on every repro (always_changed): it is the check of the raw files


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   cwd=cwd, check=True, capture_output=True)


def project_copy(root: Path, remote: Path) -> Path:
    """The demo with dvc.yaml trimmed to STAGES, committed to git, the remote as its default."""
    root.mkdir(parents=True)
    for name in ("params.yaml", ".dvcignore", "prompts.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for name in PROJECT_TREES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    document = yaml.safe_load((REPO / "dvc.yaml").read_text())
    document["stages"] = {name: spec for name, spec in document["stages"].items() if name in STAGES}
    (root / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {"enabled": False}  # MLflow has no part in what the remote carries
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "remote", "add", "-d", "shared", str(remote))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_clone_pulls_outputs_and_run_cache_from_the_remote_and_runs_nothing(tmp_path):
    remote = tmp_path / "remote"
    first = project_copy(tmp_path / "first", remote)
    out = dvc(first, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    dvc(first, "push", "--run-cache")
    assert list(remote.glob("runs/*/*/*")), "no run-cache entries pushed"
    git(first, "add", "-A")
    git(first, "commit", "-q", "-m", "repro")  # dvc.lock and metrics/, as a team would share them

    # Another machine: a clone, nothing computed, an empty DVC cache and item store.
    second = tmp_path / "second"
    git(tmp_path, "clone", "-q", str(first), str(second))
    assert not (second / "data/ingested").exists() and not (second / ".dvc/cache").exists()
    dvc(second, "pull", "--run-cache")
    assert list((second / ".dvc/cache/runs").glob("*/*/*")), "no run-cache entries pulled"
    out = dvc(second, "repro")
    assert re.findall(r"Running stage '(\w+)'", out) == ["scan"], out
    for stage in CACHED:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    for folder in ("data/scanned", "data/ingested", "data/bucketed"):
        assert tree(second / folder) == tree(first / folder), folder
    assert not any((second / ".tuneline/store" / stage).exists() for stage in CACHED)  # no item computed

    # A copy that never got dvc.lock (another branch, an experiment): the run cache alone.
    # (`dvc pull --run-cache` would fail here: without dvc.lock there are no outputs to check out.)
    third = project_copy(tmp_path / "third", remote)
    out = dvc(third, "repro", "--pull")
    assert re.findall(r"Running stage '(\w+)'", out) == ["scan"], out
    for stage in CACHED:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    for folder in ("data/ingested", "data/bucketed", "metrics"):
        assert tree(third / folder) == tree(first / folder), folder
    assert not any((third / ".tuneline/store" / stage).exists() for stage in CACHED)
