"""What a person sees: the stage table and warnings on the terminal, library chatter in the
stage's log file, progress bars in a Prefect log at most every few seconds."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import save_photo

REPO = Path(__file__).resolve().parents[1]


def test_progress_redraws_reach_a_log_at_most_every_interval():
    from tuneline.orchestration.runner import OutputLines

    now = [0.0]
    records: list[str] = []
    lines = OutputLines(records.append, interval_s=5.0, clock=lambda: now[0])
    lines.feed("starting\n\r  0%|          | 0/30 [00:00<?, ?it/s]")
    for step in range(1, 31):
        now[0] += 0.5  # a redraw every half second: 15 s in all
        lines.feed(f"\r {step * 100 // 30:3d}%|#| {step}/30 [step {step}]")
        if step == 12:
            lines.feed("\r")  # a CRLF line end split across two reads
            lines.feed("\n")
    lines.feed("\nstage table\n\n")
    lines.close()
    progress = [r for r in records if "/30" in r]
    assert records[0] == "starting" and records[-1] == "stage table"
    assert "" not in records  # blank lines are not records
    # One redraw per 5 s (the first at once), the line ended at step 12, and the final state.
    assert len(progress) <= 6, progress
    assert progress[0].endswith("0/30 [00:00<?, ?it/s]") and progress[-1].endswith("30/30 [step 30]")
    assert any(r.endswith("12/30 [step 12]") for r in progress)


def test_a_stage_shows_its_table_and_sends_library_chatter_to_its_log(tmp_path):
    root = tmp_path / "project"
    for i in range(2):
        save_photo(root / "data/raw/set" / f"p{i}.jpg", (320, 256), seed=i, quality=90)
    (root / "params.yaml").write_text("datasets:\n  - {name: set, path: data/raw/set}\n", "utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DO_NOT_TRACK": "1"}

    def ingest() -> str:  # the scan, then ingest (which reads the scan's list)
        output = ""
        for stage in ("scan", "ingest"):
            done = subprocess.run([sys.executable, "-m", "tuneline.cli", stage], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            output = done.stdout + done.stderr
        return output

    first = ingest()
    assert "ingest: 2 items" in first and "computed" in first
    assert "mlflow" not in first.lower() and "INFO" not in first  # MLflow's database and monitor lines
    log = (root / ".tuneline/logs/ingest.log").read_text("utf-8")
    assert "mlflow" in log  # ... are in the stage's log
    with sqlite3.connect(root / "mlflow.db") as db:
        runs = db.execute("select count(*) from runs").fetchone()[0]
        computed = db.execute("select value from tags where key = 'tuneline.report.computed'").fetchone()[0]
    assert runs == 1 and int(computed) == 2  # the run's report (a tag: issue 30), beside any curves

    again = ingest()  # nothing to do: no MLflow run, no mlflow import
    assert "computed" in again and "mlflow" not in again.lower()
    with sqlite3.connect(root / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == runs
