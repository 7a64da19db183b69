"""bench/ingest_bucket.py on 8 images: the incremental rerun computes one item per stage, every output
has the naive path's size, and the ours-vs-naive PSNR is there (its manifests hold ids, not paths:
the bench maps them back through data/ingested, as users' tools must)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ingest_bucket_bench_runs_on_eight_images(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "bench.ingest_bucket", "--images", "8", "--resolution", "256",
                           "--workers", "1", "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "ingest_bucket.json").read_text())
    checks = {goal["name"]: goal for goal in result["goals"] if goal["kind"] == "check"}
    assert checks["incremental computed (ingest, bucket)"]["display"] == "(1, 1)"
    assert checks["outputs same size as naive"]["display"] == "8/8"
    assert all(goal["passed"] for goal in checks.values())
    assert result["psnr_db_vs_naive"]["images"] == 8 and result["psnr_db_vs_naive"]["min"] > 25
    assert [row["images"] for row in result["rows"]] == [8, 8, 2, 1]  # naive, cold, N/4, incremental
