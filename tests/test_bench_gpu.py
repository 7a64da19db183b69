"""bench/gpu.py --small: the GPU bench's code, run on the CPU with the tiny SDXL's configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_small_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--small", "--work", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RANDOM" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu" and result["small"] is True
    speed = result["speed"]
    assert set(speed["median_steps_per_s"]) == {"trainer", "bare", "bare_fp32_frozen"}
    assert all(rate > 0 for rate in speed["median_steps_per_s"].values())
    assert speed["flops_per_step"] > 0 and 0 < speed["mfu"]["trainer"] < 1
    assert [row["case"] for row in result["memory"]] == ["batch 1 + gradient checkpointing", "batch 2"]
    for row in result["memory"]:
        assert row["measured"] > 0 and row["estimate"] > 0 and row["estimate_weights_exact"] is True
        assert row["how"].startswith("tensor bytes")
    assert result["compile"]["blocks"]["first_step_s"] > 0 and result["compile"]["blocks"]["compiled_vs_eager"] > 0
    assert {"sdpa flash", "channels-last"} <= set(result["variants_steps_per_s"])
    latents = result["latents"]
    assert latents["computed"] == latents["images"] == 8 and latents["ratio"] > 0 and latents["relative_diff"] <= 1e-5
    checks = [g for g in result["goals"] if g["kind"] == "check"]
    assert checks and all(g["passed"] for g in checks), checks
    assert {g["kind"] for g in result["goals"]} == {"check", "info"}  # tiny shapes judge no goal
    assert (tmp_path / "small" / "gpu.json").is_file() and not list((tmp_path / "small").glob("run-*"))


def test_zimage_gpu_bench_runs_small_on_the_cpu(tmp_path):
    """bench/gpu_zimage.py --small: every model.quantize level trains on tiny-zimage's shapes, and the
    estimate's frozen and trained bytes equal the real (quantized) tensors."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_zimage", "--small", "--work", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RANDOM" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_zimage" and result["small"] is True
    rows = {row["level"]: row for row in result["levels"]}
    assert list(rows) == ["none", "int8", "fp8", "nf4"]
    for level, row in rows.items():
        assert "failure" not in row, row
        assert row["frozen_exact"] is True and row["measured"] > 0 and row["median_steps_per_s"] > 0
    # Quantized frozen weights are smaller than the unquantized ones (nf4 the smallest).
    frozen = {level: sum(row["frozen_real"].values()) for level, row in rows.items()}
    assert frozen["nf4"] < min(frozen["int8"], frozen["fp8"]) and max(frozen["int8"], frozen["fp8"]) < frozen["none"]
    checks = [g for g in result["goals"] if g["kind"] == "check"]
    assert checks and all(g["passed"] for g in checks), checks
    assert {g["kind"] for g in result["goals"]} == {"check", "info"}
    assert (tmp_path / "small" / "gpu_zimage.json").is_file() and not list((tmp_path / "small").glob("run-*"))
