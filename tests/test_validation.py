"""The validation loss (train.validation) and the best checkpoint, both families: the same number twice on
the same weights, the same numbers in a resumed run as in a straight one, training unchanged by it, the
best step's checkpoint kept by keep_last pruning and exported by `export.weights: best`, and where it shows
(MLflow metric names, metrics/train_val.csv, the picture's third panel, metrics/train.json).

The held-out split itself (datasets[].validation) is another part of the work: here the tests move items
of the latents project from `items` to `validation` by hand (`held_out`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_trainer, train_params
from resume_checks import assert_same_tensors, checkpoint_at
from test_train_zimage import zimage_project  # noqa: F401  (a fixture: the Z-Image latents project)

FAMILIES = ["sdxl", "zimage"]


def hold_out(data, count_per_dataset: int = 1):
    """Move the first `count_per_dataset` items (by id) of each data set from data.items to data.validation."""
    from tuneline.train.data import LatentItem

    held = set()
    for dataset in sorted({item.record["dataset"] for item in data.items}):
        mine = sorted((item for item in data.items if item.record["dataset"] == dataset), key=lambda i: i.record["id"])
        held |= {item.record["id"] for item in mine[:count_per_dataset]}
    train = [item for item in data.items if item.record["id"] not in held]
    out = [item for item in data.items if item.record["id"] in held]
    data.items = [LatentItem(i, it.record, it.bucket, it.repeats, it.loss_weight) for i, it in enumerate(train)]
    data.validation = [LatentItem(i, it.record, it.bucket, it.repeats, it.loss_weight) for i, it in enumerate(out)]
    return data


@pytest.fixture
def held_out(monkeypatch):
    """The train stage's latents with one item of each data set held out."""
    import tuneline.stages.train.stage as stage

    original = stage.latent_data
    monkeypatch.setattr(stage, "latent_data", lambda params, latents_dir: hold_out(original(params, latents_dir)))


@pytest.fixture(params=FAMILIES)
def family_project(request, latents_project):
    return latents_project if request.param == "sdxl" else request.getfixturevalue("zimage_project")


def params_of(project, **train):
    return train_params(project, **train)


VALIDATION = {"every_steps": 1}


def fit_logged(trainer) -> dict[int, dict[str, float]]:
    logged: dict[int, dict[str, float]] = {}
    trainer.fit(on_validate=lambda state, metrics: logged.__setitem__(state.step, metrics))
    return logged


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_validation_loss_is_the_same_number_twice_and_leaves_the_rng(family_project, held_out, tmp_path, mode):
    import random

    params = params_of(family_project, mode=mode, validation={**VALIDATION, "points": 3})
    trainer = make_trainer(family_project, tmp_path, params)
    held = trainer.validation.data.validation
    assert len(held) == 2 and not {i.record["id"] for i in held} & {i.record["id"] for i in trainer.data.items}
    streams = (trainer.random.torch.get_state(), torch.get_rng_state(), random.getstate(),
               trainer.random.python.getstate())
    first, second = trainer.validate(), trainer.validate()
    assert first == second
    datasets = sorted({i.record["dataset"] for i in held})
    assert sorted(first) == sorted(["val/loss", "val/loss_unweighted", *(f"val/loss/{d}" for d in datasets),
                                    "val/loss/t250", "val/loss/t500", "val/loss/t750"])
    assert all(value > 0 and value == value for value in first.values())
    # The mean is the mean of the per-level means (every level sees every item once).
    levels = [first[f"val/loss/t{t}"] for t in (250, 500, 750)]
    assert first["val/loss"] == pytest.approx(sum(levels) / 3, rel=1e-12)
    assert len(set(levels)) == 3  # other noise levels, other losses
    after = (trainer.random.torch.get_state(), torch.get_rng_state(), random.getstate(),
             trainer.random.python.getstate())
    assert torch.equal(streams[0], after[0]) and torch.equal(streams[1], after[1])
    assert streams[2:] == after[2:]


def test_the_weighted_loss_carries_the_data_set_weights(latents_project, held_out, tmp_path):
    """beta has loss_weight 0.5 in the project: its weighted loss is half its unweighted one (no min-SNR)."""
    params = params_of(latents_project, validation=VALIDATION)
    trainer = make_trainer(latents_project, tmp_path, params)
    validation = trainer.validation
    [beta] = [i for i, item in enumerate(validation.data.validation) if item.record["dataset"] == "beta"]
    batch = validation.data.validation_batch([beta], 0, trainer.accelerator.device)
    with torch.no_grad():
        weighted, plain = validation.adapter.per_sample_losses(
            trainer.modules, batch, batch["noise"], torch.tensor([500]), 0)
    assert torch.equal(weighted, plain * 0.5)
    # The noise is fixed by (seed, item id): another batch composition, the same noise.
    both = validation.data.validation_batch([0, 1], 0, trainer.accelerator.device)
    assert torch.equal(both["noise"][beta], batch["noise"][0])
    other_seed = validation.data.validation_batch([beta], 1, trainer.accelerator.device)
    assert not torch.equal(other_seed["noise"], batch["noise"])


def test_a_resumed_run_validates_as_a_straight_one_and_trains_the_same(family_project, held_out, tmp_path):
    """Validation every step: the logged values of a run stopped at step 2 and resumed equal a straight
    run's at every step (==), the weights are exact after resume, and a run without validation trains
    the same weights (the validation touches no training stream)."""
    steps = {"num_steps": 4, "checkpoint": {"every_steps": 2, "keep_last": 2}}
    straight = make_trainer(family_project, tmp_path / "straight", params_of(family_project, **steps,
                                                                           validation=VALIDATION))
    straight_logged = fit_logged(straight)
    assert sorted(straight_logged) == [1, 2, 3, 4]

    first = make_trainer(family_project, tmp_path / "resumed", params_of(family_project, **{**steps, "num_steps": 2},
                                                                        validation=VALIDATION))
    resumed_logged = fit_logged(first)
    second = make_trainer(family_project, tmp_path / "resumed", params_of(family_project, **steps,
                                                                         validation=VALIDATION))
    assert second.state.step == 2
    resumed_logged |= fit_logged(second)
    assert resumed_logged == straight_logged
    assert (second.state.best_validation_step, second.state.best_validation_loss) == \
        (straight.state.best_validation_step, straight.state.best_validation_loss)
    assert_same_tensors(straight.trained_weights(), second.trained_weights(), "weights after resume")

    plain = make_trainer(family_project, tmp_path / "plain", params_of(family_project, **steps))
    assert plain.validation is None
    plain.fit()
    assert_same_tensors(straight.trained_weights(), plain.trained_weights(), "weights with validation off")


def scripted_losses(monkeypatch, losses: dict[int, float]) -> None:
    """Trainer.validate gives `losses[step]` as val/loss (the real computation, then the scripted mean): a
    best step that is not the last, whatever the tiny random model does."""
    from tuneline.train.trainer import Trainer

    real = Trainer.validate

    def validate(self):
        metrics = real(self)
        return {**metrics, "val/loss": losses[self.state.step]}

    monkeypatch.setattr(Trainer, "validate", validate)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_best_checkpoint_survives_pruning_and_is_exported(family, latents_project, held_out, monkeypatch,
                                                             tmp_path, request):
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import run as run_train

    project = latents_project if family == "sdxl" else request.getfixturevalue("zimage_project")
    scripted_losses(monkeypatch, {1: 3.0, 2: 1.0, 3: 2.0, 4: 1.5, 5: 1.0})
    params = params_of(project, num_steps=5, lora={"rank": 4, "alpha": 2.0},
                       checkpoint={"every_steps": 3, "keep_last": 1}, validation=VALIDATION)
    AcceleratorState._reset_state(True)
    report = run_train(params, project.root, project.root / "data/latents", tmp_path / "models/train",
                       tmp_path / "metrics", checkpoint_dir=tmp_path / "checkpoints")
    # Step 2 was not on the schedule (every 3): saved for its loss, and kept though keep_last is 1.
    [run_dir] = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000002", "step_000005"]
    best = checkpoint_at(tmp_path / "checkpoints", 2)
    state = json.loads((tmp_path / "models/train/trainer_state.json").read_text())
    assert (state["best_validation_step"], state["best_validation_loss"], state["best_weights"]) == (2, 1.0, True)
    assert json.loads((tmp_path / "metrics/train.json").read_text())["val_loss_best_step"] == 2
    assert report.extra["val_loss_best"] == 1.0  # a tie later (step 5) does not replace the earlier best

    # models/train/best/ holds the step-2 weights, in the final weights' layout.
    from tuneline.train.output import LORA_FILE

    checkpoint_weights = load_file(best / "trained.safetensors")
    best_file = load_file(tmp_path / "models/train/best" / LORA_FILE)
    final_file = load_file(tmp_path / "models/train" / LORA_FILE)
    assert len(best_file) == len(checkpoint_weights) == len(final_file)
    assert sorted(tuple(t.flatten()[:4].tolist()) for t in best_file.values()) == \
        sorted(tuple(t.flatten()[:4].tolist()) for t in checkpoint_weights.values())
    assert any(not torch.equal(best_file[k], final_file[k]) for k in best_file)

    # export.weights: best ships exactly those tensors and says so.
    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run as run_export

    data = params.model_dump(mode="json")
    data["export"] = {"name": "demo", "samples": 0, "weights": "best"}
    run_export(validate_params(data), project.root, tmp_path / "models/train", tmp_path / "renders",
               tmp_path / "export", tmp_path / "metrics")
    [exported] = (tmp_path / "export").glob("demo*.safetensors")
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert header["tuneline.exported_step"] == "2"
    assert header["tuneline.exported_weights"] == "best validation loss 1 at step 2 of 5"
    lora = [t for key, t in tensors.items() if "alpha" not in key]
    assert sorted(tuple(t.float().flatten()[:4].tolist()) for t in lora) == \
        sorted(tuple(t.flatten()[:4].tolist()) for t in checkpoint_weights.values())
    card = (tmp_path / "export" / "README.md").read_text()
    assert "exported weights: best validation loss 1 at step 2 of 5" in card


def test_best_weights_without_validation_are_a_clear_error(latents_project, tmp_path):
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError
    from tuneline.preflight import best_weights_problems
    from tuneline.train.output import choose_weights

    data = train_params(latents_project).model_dump(mode="json")
    data["export"] = {"weights": "best"}
    data["render"] = {**data["render"], "weights": "best"}
    problems = best_weights_problems(validate_params(data))
    assert [p.split(":")[0] for p in problems] == ["render.weights", "export.weights"]
    assert all("train.validation.every_steps" in p and "final, best" in p for p in problems)
    data["train"]["validation"] = {"every_steps": 5}
    # Validation on, but no data set holds an image out: still nothing to choose the best by.
    problems = best_weights_problems(validate_params(data))
    assert len(problems) == 2 and all("no data set holds images out" in p for p in problems)
    data["datasets"][0]["validation"] = 1
    assert best_weights_problems(validate_params(data)) == []
    with pytest.raises(ParamsError, match=r"export.weights: 'best' .*\(allowed: final, best\)"):
        choose_weights(tmp_path, False, None, "best", "export.weights")
    with pytest.raises(ValueError, match="timesteps"):
        validate_params({**data, "train": {"validation": {"timesteps": [0, 500]}}})


class RecordingTracker:
    active = False  # no MLflow run: the train stage logs through it all the same

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path, folder):
        pass


def test_where_it_shows_mlflow_csv_plot_and_a_resumed_csv(latents_project, held_out, tmp_path):
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.plot import loss_curve_png
    from tuneline.stages.train.stage import run as run_train

    def train(num_steps, tracker=None):
        params = params_of(latents_project, num_steps=num_steps, validation={"every_steps": 2, "timesteps": [300, 700]},
                           checkpoint={"every_steps": 2, "keep_last": 2})
        AcceleratorState._reset_state(True)
        return run_train(params, latents_project.root, latents_project.root / "data/latents",
                         tmp_path / "models/train", tmp_path / "metrics", checkpoint_dir=tmp_path / "checkpoints",
                         tracker=tracker)

    tracker = RecordingTracker()
    train(3, tracker)
    names = {"val/loss", "val/loss_unweighted", "val/loss/alpha", "val/loss/beta", "val/loss/t300", "val/loss/t700"}
    # Every 2 steps and on the last one (3).
    assert sorted(step for step, metrics in tracker.metrics.items() if names <= set(metrics)) == [2, 3]
    train(5)  # resumed: the csv holds the first session's rows too
    with open(tmp_path / "metrics/train_val.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]
    assert list(rows[0]) == ["step", "loss", "loss_unweighted", "loss/alpha", "loss/beta", "loss/t300", "loss/t700"]
    assert float(rows[0]["loss"]) == pytest.approx(tracker.metrics[2]["val/loss"], abs=1e-6)
    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    best = min(rows, key=lambda r: (float(r["loss"]), int(r["step"])))
    assert summary["val_loss_best_step"] == int(best["step"])
    assert summary["val_loss_best"] == pytest.approx(float(best["loss"]), abs=1e-6)
    # The picture has a third panel when there are validation rows (a taller figure).
    from PIL import Image
    import io

    with_panel = Image.open(tmp_path / "metrics/train_loss.png")
    without = Image.open(io.BytesIO(loss_curve_png([{"step": 1, "loss": 1.0, "lr": 1e-3}])))
    assert with_panel.size == (800, 800) and without.size == (800, 600)


def test_validation_is_safe_to_change_and_older_runs_resume(latents_project, tmp_path):
    """train.validation is left out of the run key (a run started before it existed keeps its folder) and
    changing it on resume is a safe change."""
    from tuneline.train import checkpoint

    base = params_of(latents_project).train.model_dump(mode="json")
    older = {key: value for key, value in base.items() if key != "validation"}
    on = {**base, "validation": {**base["validation"], "every_steps": 5}}
    args = ({"m": 1}, "digest", 1, {"64x64": 1})
    assert checkpoint.run_key(older, *args) == checkpoint.run_key(base, *args) == checkpoint.run_key(on, *args)
    assert checkpoint.compare_configs(older, base) == ([], [])
    safe, unsafe = checkpoint.compare_configs(base, on)
    assert unsafe == [] and len(safe) == 1 and safe[0].startswith("train.validation:")


def test_keep_last_pruning_keeps_the_steps_asked_for(tmp_path):
    from tuneline.train import checkpoint

    for step in range(1, 6):
        staging = checkpoint.begin(tmp_path, step)
        checkpoint.write_state(staging, {"step": step})
        checkpoint.finish(tmp_path, step, keep_last=2, keep=[2])
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000004", "step_000005"]
    assert Path(tmp_path / "latest").read_text().strip() == "step_000005"


TWO_PROCESS_VALIDATION = '''
import json
import sys
from pathlib import Path

import tuneline.stages.train.stage as stage
from tuneline.cli import main
from tuneline.train.trainer import Trainer

{hold_out}

real_validate = Trainer.validate


def validate(self):
    metrics = real_validate(self)
    out = Path(sys.argv[1]) / f"rank{{self.accelerator.process_index}}_step{{self.state.step}}.json"
    out.write_text(json.dumps(metrics))
    return metrics


Trainer.validate = validate
original = stage.latent_data
stage.latent_data = lambda params, latents_dir: hold_out(original(params, latents_dir))
sys.exit(main(["train"]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl"])  # the sharing and the sum are the trainer's, not the family's
def test_two_processes_share_the_validation_and_agree(request, family, held_out, tmp_path):
    """DDP on two CPU processes: each process validates its share of the batches, the sums are added up,
    both get the same numbers, and they equal one process's validation of the same weights."""
    import inspect

    import yaml

    from test_train import launch_two_processes, stage_project

    project = request.getfixturevalue("latents_project" if family == "sdxl" else "zimage_project")
    root = stage_project(project, tmp_path, num_steps=2, validation={"every_steps": 1})
    script, logged = tmp_path / "two_process_validation.py", tmp_path / "logged"
    script.write_text(TWO_PROCESS_VALIDATION.format(hold_out=inspect.getsource(hold_out)), "utf-8")
    logged.mkdir()
    launch_two_processes(root, str(script), str(logged))
    for step in (1, 2):
        rank0, rank1 = (json.loads((logged / f"rank{r}_step{step}.json").read_text()) for r in (0, 1))
        assert rank0 == rank1 and rank0["val/loss"] > 0
    state = json.loads((root / "models/train/trainer_state.json").read_text())
    assert state["processes"] == 2 and state["best_validation_step"] in (1, 2)

    # One process, the two-process run's final weights: the same validation loss.
    from tuneline.config import validate_params

    params = validate_params(yaml.safe_load((root / "params.yaml").read_text("utf-8")))
    trainer = make_trainer(project, tmp_path / "one", params)
    final = load_file(checkpoint_at(root / "checkpoints/train", 2) / "trained.safetensors")
    with torch.no_grad():
        for name, parameter in trainer._named_trained_parameters():
            parameter.copy_(final[name])
    assert trainer.validate() == rank0
