"""`tuneline exp`: the experiments table, from a recorded `dvc exp show --json` (DVC 3.67, the demo with
4 steps, then `dvc exp run -n lr-hi -S train.lr=0.001` and `-n more-steps -S train.num_steps=6
-S train.lr=0.0002`; params trimmed to model and train, metrics to train and render), and the stage
summary's rows."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

from rich.console import Console

RECORDED = Path(__file__).parent / "data" / "dvc_exp_show.json"


def render(rows, width: int = 160) -> list[str]:
    from tuneline.orchestration.experiments import experiments_table

    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(experiments_table(rows, console.width))
    return console.export_text().splitlines()


def test_the_experiments_table_shows_each_run_within_160_columns():
    from tuneline.orchestration.experiments import experiments, sorted_rows

    document = json.loads(RECORDED.read_text("utf-8"))
    rows = list(experiments(document))
    assert [(r.name, r.kind) for r in rows] == [("workspace", "workspace"), ("master", "baseline"),
                                                ("more-steps", "experiment"), ("lr-hi", "experiment")]
    by_name = {r.name: r for r in rows}
    assert (by_name["lr-hi"].lr, by_name["lr-hi"].steps, by_name["lr-hi"].diff) == (0.001, 4, ("train.lr=0.001",))
    assert by_name["more-steps"].diff == ("train.num_steps=6", "train.lr=0.0002")
    assert (by_name["master"].loss, by_name["master"].val_loss, by_name["master"].diff) == (1.131102, 1.1658206582069397,
                                                                                             ())
    assert [r.name for r in sorted_rows(rows, "val_loss")][:2] == ["lr-hi", "master"]

    lines = render(rows)
    assert max(len(line) for line in lines) <= 160
    cells = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
             for line in lines if line.startswith("│")}
    assert cells["lr-hi"] == ["0.001", "4", "1.1298", "1.1641", "train.lr=0.001"]
    assert cells["more-steps"] == ["0.0002", "6", "1.0953", "1.1659", "train.num_steps=6, train.lr=0.0002"]
    assert cells["master (baseline)"] == ["0.0003", "4", "1.1311", "1.1658", "-"]

    # Many experiments with long names and many changed params: still one line each, within 160 columns.
    many = copy.deepcopy(document)
    template = many[1]["experiments"][0]
    for index in range(40):
        experiment = copy.deepcopy(template)
        experiment["name"] = f"a-rather-long-experiment-name-{index:02d}"
        train = experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]
        train.update({"seed": index, "gradient_accumulation": 2, "max_grad_norm": 0.5})
        many[1]["experiments"].append(experiment)
    lines = render(list(experiments(many)))
    assert max(len(line) for line in lines) <= 160
    assert sum(1 for line in lines if line.startswith("│")) == 44
    long_row = next(line for line in lines if "a-rather-long-experiment-na" in line)
    assert "│ train.seed=0, train.num_steps=6, train.lr=0.0002, train.gradient_accumulation=2, train.…" in long_row
    narrow = render(list(experiments(many)), width=80)
    assert max(len(line) for line in narrow) <= 80 and "│ 0.0002 │     6 │ 1.0953 │   1.1659 │" in narrow[-2]


def test_the_stage_summary_says_each_count_once_in_words():
    from tuneline.core.report import StageReport

    caption = StageReport("caption", computed=4, given=10)
    caption.extra.update({"model_loaded": True, "random_tiny_model": True, "from_sidecar": 10, "defaulted": 0,
                          "hand_edited": 0, "hand_edits_moved": 0})
    assert caption.title() == "caption: 14 items in 0.0 s"
    assert caption.rows() == [("computed", "4"), ("reused from store", "0"), ("rejected", "0"),
                              ("model loaded", "yes"), ("from sidecar", "10"), ("hand edits moved", "0")]
    train = StageReport("train", computed=3, reused=1)
    train.extra.update({"training_adapter": None})
    assert train.title() == "train: 4 steps in 0.0 s"
    assert train.rows()[:2] == [("steps trained", "3"), ("steps done before (resumed)", "1")]
    assert train.rows()[-1] == ("training adapter", "none")
    assert train.as_report()["computed"] == 3 and train.as_report()["reused"] == 1  # the keys tests read stay
    off = StageReport("autoencoder", metric_keys=("enabled",))
    off.extra["enabled"] = 0
    assert off.title() == "autoencoder: 0 steps in 0.0 s" and off.rows()[-1] == ("enabled", "no")
    assert off.metrics() == {"enabled": 0}
    assert StageReport("export", computed=1).title() == "export: 1 item in 0.0 s"
