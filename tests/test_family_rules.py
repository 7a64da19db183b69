"""Family rules are checked up front: a setting the train, render or export stage would refuse for
the model family (an SDXL-only key on Z-Image, a flow-matching key on SDXL), or an autoencoder crop
no bucket can hold, stops `tuneline check` and the first stage of a run, before anything computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import save_photo
from test_flows import demo_project, prefect_env  # noqa: F401  (autouse: ephemeral Prefect, one PREFECT_HOME)

REPO = Path(__file__).resolve().parents[1]

# Settings Z-Image refuses (dotted key -> a value away from the default), each one on its own.
ZIMAGE_REFUSES = {
    "train.loss.min_snr_gamma": 5.0,
    "train.loss.noise_offset": 0.05,
    "train.loss.min_sigma": 0.1,
    "train.loss.min_sigma_warmup_steps": 10,
    "train.prediction_type": "v_prediction",
    "train.zero_terminal_snr": True,
    "train.text_encoder_1.mode": "lora",
    "train.text_encoder_1.lr": 1e-5,
    "train.text_encoder_2.mode": "full",
    "train.lora.use_dora": True,
    "train.attention": "eager",
    "render.sampler": "dpmpp_2m",
    "render.karras": True,  # with the default sampler euler: fine for SDXL
    "render.width": 1000,  # a multiple of 8 (SDXL) but not of 16
}
# Settings SDXL refuses: every flow-matching key.
SDXL_REFUSES = {
    "train.flow_matching.timestep_sampling": "uniform",
    "train.flow_matching.logit_mean": 0.5,
    "train.flow_matching.logit_std": 2.0,
    "train.flow_matching.mode_scale": 1.0,
    "train.flow_matching.shift": 3.0,
    "train.flow_matching.loss_weighting": "cosmap",
}


def shown(value: Any) -> str:
    """A value as the messages show it: as params.yaml writes it (true, 5.0, 'lora')."""
    return "true" if value is True else repr(value)


def nested(dotted: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def project(root: Path, base: str = "tiny-zimage", **extra: Any) -> Path:
    """One data set of one photo; `extra` sections merged into params.yaml."""
    save_photo(root / "data/raw/a/a0.png", (96, 96), seed=1)
    data = merge({"datasets": [{"name": "a", "path": "data/raw/a"}], "model": {"base": base},
                  "ingest": {"min_size": 64, "workers": 1}, "bucket": {"resolution": 64, "divisible_by": 32}}, extra)
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    return root / "params.yaml"


def cli(root: Path, capsys, *command: str) -> tuple[int, str]:
    from tuneline.cli import main

    code = main(["--root", str(root), "--params", str(root / "params.yaml"), *command])
    return code, " ".join(capsys.readouterr().out.split())


def refused_up_front(root: Path, capsys, key: str, value: Any) -> None:
    """`tuneline check` and the ingest stage both refuse, naming the key and its value; ingest wrote nothing."""
    for command in (("check", "--no-memory"), ("ingest",)):
        code, out = cli(root, capsys, *command)
        assert code == 2, (command, out)
        assert f"{key}: {shown(value)}" in out and "allowed:" in out, (command, out)
    assert not (root / "data/ingested").exists()


@pytest.fixture(autouse=True)
def tiny_home(tmp_path_factory, monkeypatch):
    # No test here builds a tiny model: finding the family of a tiny id reads nothing.
    monkeypatch.setenv("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "rules-home"))


@pytest.mark.parametrize("key", list(ZIMAGE_REFUSES))
def test_each_sdxl_only_setting_on_zimage_stops_check_and_the_first_stage(tmp_path, capsys, key):
    project(tmp_path, "tiny-zimage", **nested(key, ZIMAGE_REFUSES[key]))
    refused_up_front(tmp_path, capsys, key, ZIMAGE_REFUSES[key])


@pytest.mark.parametrize("key", list(SDXL_REFUSES))
def test_each_flow_matching_setting_on_sdxl_stops_check_and_the_first_stage(tmp_path, capsys, key):
    project(tmp_path, "tiny-sdxl", **nested(key, SDXL_REFUSES[key]))
    refused_up_front(tmp_path, capsys, key, SDXL_REFUSES[key])


def test_each_family_takes_the_settings_the_other_refuses():
    """The rules refuse only what is foreign: SDXL takes every SDXL setting Z-Image refuses (but Z-Image's
    side multiple), Z-Image every flow-matching setting; the defaults pass for both."""
    from tuneline.config import validate_params
    from tuneline.models.family import FAMILIES

    base = {"datasets": [{"name": "a", "path": "data/raw/a"}]}
    for name in ("sdxl", "zimage"):
        params = validate_params(base)
        assert FAMILIES[name].unsupported_settings(params.train, params.render) == [], name
    for key, value in ZIMAGE_REFUSES.items():
        params = validate_params(merge(base, nested(key, value)))
        assert FAMILIES["zimage"].unsupported_settings(params.train, params.render), key
        if key != "render.width":
            assert FAMILIES["sdxl"].unsupported_settings(params.train, params.render) == [], key
    every = base
    for key, value in SDXL_REFUSES.items():
        every = merge(every, nested(key, value))
    params = validate_params(every)
    assert FAMILIES["zimage"].unsupported_settings(params.train, params.render) == []
    # ...and all of them together on the other family: one line per key.
    found = FAMILIES["sdxl"].unsupported_settings(params.train, params.render)
    assert [line.split(":")[0] for line in found] == list(SDXL_REFUSES)


def test_the_adapter_refuses_with_the_same_rules(tmp_path):
    """The adapter, built straight (tests, benches), names what the family's rules name."""
    from tuneline.core.params import ParamsError
    from tuneline.models.config import ModelConfig
    from tuneline.models.family import FAMILIES
    from tuneline.train.config import TrainConfig

    train = TrainConfig(loss={"noise_offset": 0.05}, attention="eager")
    lines = FAMILIES["zimage"].unsupported_settings(train)
    assert [line.split(":")[0] for line in lines] == ["train.loss.noise_offset", "train.attention"]
    with pytest.raises(ParamsError) as caught:
        FAMILIES["zimage"].build_adapter(ModelConfig(base="tiny-zimage"), train, tmp_path)
    assert all(line in str(caught.value) for line in lines)
    assert "Z-Image family" in str(caught.value)


def test_a_family_found_from_model_index_json_is_checked_too(tmp_path, capsys):
    """Not a tiny id: the family comes from the base's model_index.json (nothing else is read)."""
    base = tmp_path / "models/my-zimage"
    base.mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}), "utf-8")
    project(tmp_path, "models/my-zimage", train={"prediction_type": "v_prediction"})
    refused_up_front(tmp_path, capsys, "train.prediction_type", "v_prediction")
    # model.family overrides detection: the same folder, told it is SDXL, passes.
    project(tmp_path, "models/my-zimage", train={"prediction_type": "v_prediction"}, model={"family": "sdxl"})
    code, out = cli(tmp_path, capsys, "check", "--no-memory")
    assert code == 0, out


def test_a_stage_process_refuses_before_it_writes(tmp_path):
    """As `dvc repro` runs it: the stage in its own process exits 2 naming the key; nothing is written."""
    project(tmp_path, "tiny-zimage", train={"loss": {"min_snr_gamma": 5.0}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    for stage in ("models", "ingest"):
        done = subprocess.run([sys.executable, "-m", "tuneline.cli", stage], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        out = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 2, out
        assert "train.loss.min_snr_gamma: 5.0 is SDXL only" in out
    assert not (tmp_path / "data/ingested").exists() and not (tmp_path / "models/identity").exists()


def test_a_crop_no_bucket_can_hold_stops_check_and_the_first_stage(tmp_path, capsys):
    """Buckets at resolution 256 on a 64 grid: 192x320, 256x256, 320x192. A crop over 256 fits none."""
    buckets = {"resolution": 256, "divisible_by": 64}
    project(tmp_path, "tiny-sdxl", bucket=buckets, autoencoder={"enabled": True, "crop_size": 100000})
    for command in (("check", "--no-memory"), ("ingest",)):
        code, out = cli(tmp_path, capsys, *command)
        assert code == 2, out
        assert "autoencoder.crop_size: 100000 is longer than the shorter side of every bucket" in out
        assert "allowed: a multiple of 8 from 16 to 256" in out
    assert not (tmp_path / "data/ingested").exists()
    project(tmp_path, "tiny-sdxl", bucket=buckets, autoencoder={"enabled": True, "crop_size": 264})
    assert cli(tmp_path, capsys, "check", "--no-memory")[0] == 2
    # 256 fits the square bucket: valid, with a warning that the 192-side buckets would cut it.
    project(tmp_path, "tiny-sdxl", bucket=buckets, autoencoder={"enabled": True, "crop_size": 256})
    code, out = cli(tmp_path, capsys, "check", "--no-memory")
    assert code == 0, out
    assert "autoencoder.crop_size: 256 is longer than the shorter side of some buckets: 192x320 (a), 320x192 (a)" in out
    # Off, the stage never crops: no rule.
    project(tmp_path, "tiny-sdxl", bucket=buckets, autoencoder={"enabled": False, "crop_size": 100000})
    code, out = cli(tmp_path, capsys, "check", "--no-memory")
    assert code == 0 and "crop_size" not in out, out


def test_the_flow_checks_the_family_rules_before_its_first_task(tmp_path):
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.flow import pipeline

    # The case: the SDXL demo (min_snr_gamma 5.0) pointed at a Z-Image base from the form.
    root = demo_project(tmp_path, ("models", "scan", "ingest"))
    with pytest.raises(ParamsError, match=r"train\.loss\.min_snr_gamma: 5\.0 is SDXL only"):
        pipeline(root=str(root), overrides={"model.base": "tiny-zimage"})
    assert not (root / "data/ingested").exists() and not (root / ".tuneline/prefect/records").exists()


def test_tuneline_repro_checks_before_dvc_starts(tmp_path, capsys, monkeypatch):
    from tuneline.orchestration import services

    started = []
    monkeypatch.setattr(services, "run_repro", lambda *args: started.append(args) or 0)
    project(tmp_path, "tiny-zimage", train={"loss": {"min_snr_gamma": 5.0}})
    code, out = cli(tmp_path, capsys, "repro")
    assert code == 2 and "train.loss.min_snr_gamma: 5.0 is SDXL only" in out and not started
    project(tmp_path, "tiny-zimage")
    assert cli(tmp_path, capsys, "repro")[0] == 0 and len(started) == 1
