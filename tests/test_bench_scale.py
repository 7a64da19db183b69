"""bench/scale.py --small: the data stages under `dvc repro latents` on 40 generated images, cold, no-op,
`dvc status` and +1 image, with every figure the issue asks for, and the +1 run's per-stage counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_bench_runs_small(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # Without MLflow: about 3.5 s per tracked stage process that computes, which is not what this checks.
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--small", "--no-tracking", "--keep", "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dvc repro latents per scale" in done.stdout and "goals (issue 28)" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "scale" and result["small"] is True
    [row] = result["scales"]
    n = row["images"]
    assert n == 40
    # Cold: every data stage ran and computed every image (captions: all sidecars, taken as given).
    assert {"scan", "ingest", "bucket", "caption", "latents"} <= set(row["cold_ran"])
    cold = row["cold_reports"]
    assert [cold[s]["computed"] for s in ("ingest", "bucket", "latents")] == [n, n, n]
    assert (cold["caption"]["computed"], cold["caption"]["given"]) == (0, n)
    assert row["cold_s"] > 0 and row["cold_s_per_1000"] == pytest.approx(row["cold_s"] * 1000 / n, abs=0.1)
    # Cold, the scan hashed every raw file (images and sidecars).
    assert (cold["scan"]["computed"], cold["scan"]["reused"]) == (2 * n, 0)
    # No-op: only the always-changed `models` and `scan` stages run; `dvc status` finds nothing to do.
    assert row["noop_ran"] == ["models", "scan"] and row["noop_repro_s"] > 0
    assert row["status_clean"] and row["status_s"] > 0
    # +1 image: one item of work per data stage, the rest reused; DVC's share is what the stages' seconds leave.
    plus = row["plus_one_stages"]
    assert [(plus[s]["computed"], plus[s]["reused"]) for s in ("ingest", "bucket", "latents")] == [(1, n)] * 3
    assert (plus["scan"]["computed"], plus["scan"]["reused"]) == (2, 2 * n)  # the new image and its sidecar
    assert (plus["caption"]["computed"], plus["caption"]["given"]) == (0, n + 1)
    assert row["plus_one_stage_s"] == pytest.approx(sum(s["seconds"] for s in plus.values()), abs=0.02)
    assert row["plus_one_dvc_s"] == pytest.approx(row["plus_one_s"] - row["plus_one_stage_s"], abs=0.02)
    assert all(s["process_s"] is not None and s["process_s"] >= s["seconds"] for s in plus.values())
    # Disk: the store is one copy; outputs, store and DVC's cache hold at least that; file counts per part.
    disk = row["disk"]
    assert disk["one_copy_bytes"] > 0 and disk["derived_bytes"] >= disk["one_copy_bytes"]
    assert disk["ratio"] == pytest.approx(disk["derived_bytes"] / disk["one_copy_bytes"], abs=0.01)
    assert all(disk["parts"][p]["files"] > n for p in ("outputs", "store", "dvc_cache"))
    assert disk["raw_bytes"] > 0
    # Peak RSS: the latents process loads torch and the models, far above DVC's own process.
    assert row["peak_rss_stages_mib"] == row["cold_processes"]["latents"]["peak_rss_mib"] > row["peak_rss_dvc_mib"] > 0
    # The +1 check passed and --small judges no goal.
    checks = [g for g in result["goals"] if g["kind"] == "check"]
    assert len(checks) == 1 and checks[0]["passed"], checks
    assert {g["kind"] for g in result["goals"]} == {"check", "info"} and len(result["goals"]) == 6
    assert (tmp_path / "small" / "scale.json").is_file() and (tmp_path / "small" / "n40" / "dvc.lock").is_file()  # --keep

    # bench.scale_again on the kept project: one more image (one item per stage), the no-ops and status.
    again = subprocess.run([sys.executable, "-m", "bench.scale_again", str(tmp_path / "small" / f"n{n}"), "--rounds", "1",
                            "--repeats", "1"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    [project] = json.loads(again.stdout.strip().splitlines()[-1])["projects"]
    assert project["images"] == n + 2 and project["one_item_each"]  # the bench's extra image, and this one
    assert len(project["plus_one_s"]) == 1 and len(project["noop_s"]) == len(project["status_s"]) == 1
    assert project["stage_median_s"]["latents"] > 0 and project["noop_median_s"] > 0
