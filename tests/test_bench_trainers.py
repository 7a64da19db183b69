"""bench/autoencoder.py and bench/zimage.py --small: the trainer core against a bare loop on the same
model (two optimizers on the autoencoder; flow matching on Z-Image), tiny shapes, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bench,options", [("autoencoder", []), ("autoencoder", ["--kind", "vq"]), ("zimage", [])],
                         ids=["autoencoder", "autoencoder-vq", "zimage"])
def test_trainer_bench_runs_small(bench, options, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", f"bench.{bench}", "--small", "--work", str(tmp_path), *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RANDOM" in done.stdout and "steps/s" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == bench and result["small"] is True
    ours, bare = result["rows"]
    assert ours["variant"].startswith("ours") and bare["variant"].startswith("bare")
    for row in (ours, bare):  # both figures, every round, and the ratio (never a timing threshold)
        assert len(row["steps_per_s"]) == result["settings"]["rounds"] and row["median"] > 0
    assert ours["vs_bare"] > 0 and bare["vs_bare"] == 1.0
    [ratio] = [g for g in result["goals"] if g["name"].startswith("trainer steps/s")]
    assert ratio["kind"] == "info" and ratio["display"].endswith("x")  # tiny shapes judge no goal
    checks = [g for g in result["goals"] if g["kind"] == "check"]
    assert checks and all(g["passed"] for g in checks), checks
    if bench == "autoencoder":  # same weights, data and random streams: the two loops compute the same losses
        assert result["losses"]["compared_steps"] >= 3
        assert result["settings"]["kind"] == ("vq" if options else "kl")
        assert ours["variant"].endswith("VQAdapter" if options else "AutoencoderAdapter")
    else:  # the same objective before training; finite losses
        assert len(checks) == 2
    work = tmp_path / ("small-vq" if options else "small")
    assert (work / f"{bench}.json").is_file() and not (work / "run").exists()
