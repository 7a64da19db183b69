"""Faults and bad input: crafted checkpoints, batching in the run key, interrupted re-saves,
one writer per stage, checks before compute, and ingest's odd files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_trainer, save_photo, train_params

REPO = Path(__file__).resolve().parents[1]


def cli(root: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tuneline.cli", "--root", str(root), "--params",
                             str(root / "params.yaml"), *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


# --- checkpoints -----------------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(latents_project, tmp_path):
    from tuneline.train.checkpoint import UnsafeCheckpoint

    trainer = make_trainer(latents_project, tmp_path / "run", train_params(latents_project))
    trainer.fit()
    folder = trainer.checkpoint_dir / "step_000002"
    # The trainer's own files load with weights_only=True (numpy RNG state included).
    assert make_trainer(latents_project, tmp_path / "run", train_params(latents_project)).state.step == 2
    _RunsCode.marker = tmp_path / "pwned"
    training = torch.load(folder / "training.pt", weights_only=True)
    training["extra"] = _RunsCode()
    torch.save(training, folder / "training.pt")
    for resume_from in (folder, None):  # given explicitly, or found as the run's latest checkpoint
        with pytest.raises(UnsafeCheckpoint, match=r"refusing .*training\.pt.*run code"):
            make_trainer(latents_project, tmp_path / "run", train_params(latents_project), resume_from=resume_from)
    assert not _RunsCode.marker.exists()


def test_a_batch_size_change_starts_a_new_run(latents_project, tmp_path):
    from tuneline.config import validate_params
    from tuneline.train.checkpoint import ResumeRefused

    first = make_trainer(latents_project, tmp_path, train_params(latents_project))
    first.fit()
    data = train_params(latents_project).model_dump(mode="json")
    data["bucket"]["batch_size"] = 1
    smaller = validate_params(data)
    other = make_trainer(latents_project, tmp_path, smaller)
    assert other.state.step == 0 and other.run_key != first.run_key
    assert set(other.batching.values()) == {1} and set(first.batching.values()) == {2}
    with pytest.raises(ResumeRefused, match=r"batch size per bucket .*\{'64x64': 2.*-> \{'64x64': 1"):
        make_trainer(latents_project, tmp_path, smaller, resume_from=first.checkpoint_dir / "step_000002")


def test_an_interrupted_resave_never_loses_the_checkpoints(latents_project, tmp_path, monkeypatch):
    from tuneline.train import checkpoint

    params = train_params(latents_project, num_steps=4, checkpoint={"every_steps": 2, "keep_last": 3})
    trainer = make_trainer(latents_project, tmp_path, params)
    trainer.fit()
    run = trainer.checkpoint_dir
    renames = []
    real_rename = os.rename

    def killed_after_setting_aside(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # step_4 is aside, the new copy not yet in place: the process dies here
            raise SystemExit("killed")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", killed_after_setting_aside)
    with pytest.raises(SystemExit):
        trainer.save()  # step 4 again, as after a stop signal right after a periodic save
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert not (run / "step_000004").exists() and (run / ".step_000004.replaced").is_dir()
    resumed = make_trainer(latents_project, tmp_path, params)
    assert resumed.state.step == 4 and any("restored" in m for m in resumed.messages)
    # Gone altogether: the newest complete checkpoint is used, with a message, not step 0.
    import shutil

    shutil.rmtree(run / "step_000004")
    resumed = make_trainer(latents_project, tmp_path, params)
    assert resumed.state.step == 2 and any("using step_000002" in m for m in resumed.messages)


def test_the_nan_message_names_no_missing_checkpoint(latents_project, tmp_path):
    from tuneline.train.trainer import TrainingDiverged

    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project))
    trainer.adapter.loss = lambda *args: (torch.tensor(float("nan"), requires_grad=True), {})
    with pytest.raises(TrainingDiverged, match="No checkpoint was written before it") as caught:
        trainer.fit()
    assert str(trainer.checkpoint_dir) not in str(caught.value)


# --- one writer per stage output -----------------------------------------------------------

def test_a_second_train_is_refused_naming_the_holder(latents_project):
    from tuneline.core.lock import exclusive

    root = latents_project.root
    with exclusive(root / ".tuneline/locks/train.lock", "stage train", wait=False):
        done = cli(root, "train")
        output, _ = done.communicate(timeout=120)
    assert done.returncode == 1, output
    assert f"PID {os.getpid()}" in output and "stage train" in output


def test_a_second_data_stage_waits_for_the_first(project):
    from tuneline.core.lock import exclusive

    for i in range(2):
        save_photo(project.raw("alpha") / f"a{i}.jpg", (96, 80), seed=i)
    project.scan(project.params(tracking={"enabled": False}))
    held = threading.Event()
    with exclusive(project.root / ".tuneline/locks/ingest.lock", "stage ingest", wait=False):
        process = cli(project.root, "ingest")
        lines = []

        def read() -> None:
            for line in process.stdout:
                lines.append(line)
                if "waiting for stage ingest" in line:
                    held.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert held.wait(60), "".join(lines)
        time.sleep(0.5)
        assert process.poll() is None  # still waiting while the lock is held
    assert process.wait(timeout=120) == 0, "".join(lines)
    reader.join(10)
    assert f"PID {os.getpid()}" in "".join(lines)
    assert len(project.manifest("data/ingested")) == 2


def test_a_second_interrupt_exits_130_in_one_line(project, monkeypatch, capsys):
    from tuneline import cli as cli_module
    from tuneline.orchestration.registry import Stage

    project.params(tracking={"enabled": False})
    (project.raw("alpha") / "x.jpg").write_bytes(b"")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Stage, "run", interrupted)
    assert cli_module.run_stage("ingest", project.root / "params.yaml", project.root) == 130
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and "interrupted" in out[0] and "Traceback" not in "\n".join(out)


# --- checks before compute -------------------------------------------------------------------

def _check(root: Path, data: dict, capsys) -> tuple[int, str]:
    from tuneline.cli import main

    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    code = main(["--root", str(root), "--params", str(root / "params.yaml"), "check"])
    return code, " ".join(capsys.readouterr().out.split())


def test_check_catches_what_would_fail_later(tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    base = {"datasets": [{"name": "a", "path": "data"}]}

    (tmp_path / "params.yaml").write_text("datasets:\n  - {name: a, path: data}\ntrain:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    from tuneline.cli import main

    assert main(["--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"), "check"]) == 2
    assert "key 'lr' is given twice (lines 4 and 5)" in " ".join(capsys.readouterr().out.split())

    code, out = _check(tmp_path, {**base, "train": {"num_steps": True, "flip": 1}}, capsys)
    assert code == 2 and "train.num_steps: expected a number, got true" in out
    assert "train.flip: expected true or false, got 1" in out

    code, out = _check(tmp_path, {**base, "render": {"live_every": 5, "prompts_file": "missing.yaml"}}, capsys)
    assert code == 2 and "render.prompts_file: missing.yaml does not exist, and render.live_every=5" in out

    started = time.perf_counter()
    code, out = _check(tmp_path, {**base, "model": {"base": "./models/my-sdxl"}}, capsys)
    assert code == 2 and "model.base: './models/my-sdxl' is neither a folder nor a file" in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = _check(tmp_path, {**base, "model": {"base": "someone/no-such-model"}}, capsys)
    assert code == 2 and "nor a hub id that can be reached: HF_HUB_OFFLINE is set" in out
    assert time.perf_counter() - started < 10  # named at once, not after the loaders' retries

    code, out = _check(tmp_path, {**base, "train": {"optimizer": {"name": "adamw8bit"}}}, capsys)
    assert code == 2 and "train.optimizer.name: adamw8bit needs" in out and "Traceback" not in out

    code, out = _check(tmp_path, {"datasets": [{"name": "a", "path": "notes.txt"}]}, capsys)
    assert code == 2 and "datasets[a].path: notes.txt is a file" in out and "does not exist" not in out

    code, out = _check(tmp_path, {"datasets": [{"name": "a b", "path": "data"}, {"name": "a/b", "path": "data"}]},
                       capsys)
    assert code == 2 and "datasets[a/b].name: data sets 'a b' and 'a/b' map to the same folder" in out
    assert "{'datasets'" not in out and "(top level)" not in out

    code, out = _check(tmp_path, {"datasets": [{"name": "../shapes", "path": "data"}]}, capsys)
    assert code == 0 and "datasets[../shapes].name: used as the folder name 'shapes'" in out


# --- ingest: odd files -----------------------------------------------------------------------

def test_ingest_follows_symlinked_folders_and_rejects_fifos_and_loops(project):
    elsewhere = project.root / "elsewhere"
    save_photo(elsewhere / "linked.jpg", (96, 80), seed=1)
    save_photo(project.raw("alpha") / "own.jpg", (96, 80), seed=2)
    (project.raw("alpha") / "more").symlink_to(elsewhere, target_is_directory=True)
    (project.raw("alpha") / "loop").symlink_to(project.raw("alpha"), target_is_directory=True)
    os.mkfifo(project.raw("alpha") / "pipe.png")
    report = project.ingest()
    sources = sorted(item["source"] for item in project.manifest("data/ingested"))
    assert sources == ["data/raw/alpha/more/linked.jpg", "data/raw/alpha/own.jpg"]
    reasons = {item["source"]: item["reason"] for item in project.rejected("data/ingested")}
    assert reasons["data/raw/alpha/pipe.png"] == "not a regular file (a FIFO, socket or device)"
    assert "symbolic link loop" in reasons["data/raw/alpha/loop"]
    assert report.computed == 2


def test_duplicates_keep_a_caption_and_shared_sidecars_are_named(project):
    folder = project.raw("alpha")
    save_photo(folder / "a.jpg", (96, 80), seed=1)
    (folder / "b.jpg").write_bytes((folder / "a.jpg").read_bytes())
    (folder / "b.txt").write_text("the twin's caption", "utf-8")
    save_photo(folder / "good.jpg", (96, 80), seed=3)
    save_photo(folder / "good.png", (96, 80), seed=4)
    (folder / "good.txt").write_text("good", "utf-8")
    report = project.ingest()
    captions = {item["source"]: item["caption"] for item in project.manifest("data/ingested")}
    assert captions["data/raw/alpha/a.jpg"] == "the twin's caption"
    assert "data/raw/alpha/b.jpg" not in captions
    assert any("b.jpg duplicates data/raw/alpha/a.jpg: kept data/raw/alpha/a.jpg with" in w for w in report.warnings)
    assert any("good.txt captions 2 images" in w and "good.jpg, good.png" in w for w in report.warnings)


def test_max_pixels_above_pillows_guard_is_honoured(project, monkeypatch):
    from PIL import Image

    save_photo(project.raw("alpha") / "big.png", (120, 100), seed=1)
    save_photo(project.raw("beta") / "small.png", (90, 80), seed=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # stands in for Pillow's 89 MP guard
    project.ingest(project.params(ingest={"max_pixels": 10_000, "min_size": 64, "workers": 1}))
    assert [i["source"] for i in project.manifest("data/ingested")] == ["data/raw/beta/small.png"]
    [rejected] = project.rejected("data/ingested")
    assert rejected["reason"].startswith("too many pixels: 120x100 = 0.0 MP exceeds max_pixels")
    assert Image.MAX_IMAGE_PIXELS == 5_000  # restored


def test_outputs_get_the_default_modes(project):
    save_photo(project.raw("alpha") / "a.jpg", (96, 80), seed=1)
    project.ingest()
    umask = os.umask(0)
    os.umask(umask)
    assert (project.root / "data/ingested").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (project.root / "data/ingested/manifest.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


# --- identical content, identical bytes; one loss history per run -----------------------------

def test_identical_tensors_give_identical_files(tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    paths = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for path in paths:  # each write hashes with new keys, in one process as in many (no subprocess needed)
        save_file({"w": torch.ones(3)}, path, metadata={k: k * 2 for k in "abcdefgh"})
    assert len({p.read_bytes() for p in paths}) > 1  # safetensors writes metadata in hash order

    from tuneline.core.tensorfile import canonicalize

    for path in paths:
        canonicalize(path)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(paths[0], "pt") as handle:
        assert handle.metadata() == {k: k * 2 for k in "abcdefgh"}
    assert torch.equal(load_file(paths[0])["w"], torch.ones(3))


def test_the_loss_picture_is_the_same_bytes_for_the_same_history(tmp_path):
    """metrics/train_loss.png is a DVC output: drawn in two processes from the same rows, the same
    bytes (no Software text, no timestamp chunk); other rows, another picture."""
    import struct

    from PIL import Image

    rows = [{"step": str(s), "loss": f"{1 / s:.6f}", "lr": f"{1e-4 * (1 - s / 40):.6e}"} for s in range(1, 31)]
    code = ("import json, sys; from tuneline.stages.train.plot import write_loss_curve_png; "
            "write_loss_curve_png(json.loads(sys.argv[1]), sys.argv[2])")
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, json.dumps(rows), str(path)], check=True)
    data = paths[0].read_bytes()
    assert data == paths[1].read_bytes()
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append(kind.decode())
        offset += 12 + length
    assert not {"tEXt", "iTXt", "zTXt", "tIME"} & set(chunks), chunks
    with Image.open(paths[0]) as image:
        assert image.size == (800, 600)
    from tuneline.stages.train.plot import loss_curve_png

    assert loss_curve_png(rows) == data and loss_curve_png(rows[:-1]) != data


def test_the_trained_lora_file_has_a_sorted_header(latents_project, tmp_path):
    import json
    import struct

    trainer = make_trainer(latents_project, tmp_path, train_params(latents_project))
    trainer.fit()
    path = trainer.save_outputs(tmp_path / "out") / "pytorch_lora_weights.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_one_training_run_is_one_mlflow_run_and_an_idle_session_changes_nothing(latents_project, tmp_path):
    """Three sessions of one training run (a run to step 2, a resume to 4 after the first was
    left RUNNING as a SIGKILL leaves it, one with nothing to do) are one MLflow run with one
    curve from step 1 to 4. The idle session opens no run and changes no byte DVC tracks; MLflow
    ids and times are in the run record beside the checkpoints, not in DVC's outputs."""
    from accelerate.state import AcceleratorState
    from mlflow import MlflowClient

    from tuneline.core.tracking.tracker import Tracker
    from tuneline.stages.train.stage import LOSS_CURVE, LOSS_PICTURE, MLFLOW_RUN_FILE, RUN_RECORD
    from tuneline.stages.train.stage import run as run_train

    root = latents_project.root
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art"),
                "system_metrics": False}

    def session(steps: int, **settings):
        params = train_params(latents_project, num_steps=steps, **settings)
        params = params.model_copy(update={"tracking": params.tracking.model_copy(update=tracking)})
        AcceleratorState._reset_state(True)
        for name in (LOSS_CURVE, LOSS_PICTURE):  # DVC deletes declared outputs before the stage runs
            (tmp_path / "metrics" / name).unlink(missing_ok=True)
        with Tracker.start(params.tracking, root, run_name="train", stage="train") as tracker:
            return run_train(params, root, root / "data/latents", tmp_path / "out", tmp_path / "metrics",
                             tracker=tracker, checkpoint_dir=tmp_path / "checkpoints")

    def tracked() -> dict[str, bytes]:  # every file DVC tracks for the stage (checkpoints/train included)
        folders = [tmp_path / "out", tmp_path / "checkpoints", tmp_path / "metrics"]
        return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for f in folders for p in f.rglob("*")
                if p.is_file()}

    session(2)
    client = MlflowClient(tracking["tracking_uri"])
    (run_dir,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    client.update_run(run_id, status="RUNNING")  # as a SIGKILL during the next step would leave it
    second = session(4)  # resumes at 2 and continues the same MLflow run
    assert (second.computed, second.reused) == (2, 2)
    before = tracked()
    third = session(4)  # done already: trains nothing, opens no run
    assert (third.computed, third.reused) == (0, 4)
    after = tracked()
    assert sorted(after) == sorted(before) and [k for k in after if after[k] != before[k]] == []
    rows = (tmp_path / "metrics" / LOSS_CURVE).read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["step", "1", "2", "3", "4"]
    assert rows[0] == "step,loss,lr"  # no timings in the tracked curve

    (run,) = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [1, 2, 3, 4]
    assert run.data.tags["changed_param.train.num_steps"] == "2 -> 4"
    assert LOSS_PICTURE in {Path(a.path).name for a in client.list_artifacts(run_id, "train")}
    state = json.loads((tmp_path / "out/trainer_state.json").read_text())
    assert "history" not in state and not any("mlflow" in key for key in state)
    record = json.loads((tmp_path / "checkpoints" / state["run_key"] / RUN_RECORD).read_text())
    assert record["mlflow_run_id"] == run_id and record["steps"] == 4 and len(record["sessions"]) == 2
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert sorted(metrics) == ["loss", "seconds_per_step", "steps"] and metrics["steps"] == 4
    assert metrics["loss"] == float(rows[-1].split(",")[1]) and metrics["seconds_per_step"] > 0
    assert third.extra["session_final_loss"] is None  # the report says what this session did
    assert (tmp_path / "metrics" / LOSS_PICTURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Another training run (new settings) while the first is still marked RUNNING (killed, never
    # resumed): only one train runs per project, so that one is dead and is marked KILLED.
    client.update_run(run_id, status="RUNNING")
    session(1, lr=2e-3)
    assert client.get_run(run_id).info.status == "KILLED"
