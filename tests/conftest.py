"""Shared fixtures: a throw-away project root with data sets under data/raw; the run-wide
settings that keep `make test` (two xdist workers on two cores) fast."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _share_the_cores() -> None:
    """Under `pytest -n N` each worker (and every stage process it starts) gets cores / N threads.

    torch and numpy otherwise start one OpenMP thread per core in every worker, the threads
    outnumber the cores, and OpenMP threads spin waiting for a descheduled peer. Measured on two
    cores, test_dvc_pipeline and test_flows side by side: 348 s and 294 s with the default threads,
    267 s and 216 s with one each (a training step on a busy machine: 2-13 s against 0.14-0.39 s).
    Set before numpy/torch load (they read it once); a value the caller set wins.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = os.cpu_count() or 1
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, str(max(1, cores // workers)))


_share_the_cores()

import numpy as np  # noqa: E402  (after the thread settings)
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

# The folders a copy of the project needs to run under DVC (each test adds its files and params).
PROJECT_TREES = ("stages", "src", "data/raw", "data/caption_edits", ".dvc")

# `make test` hands whole files to its two workers in this order (`--dist loadfile
# --no-loadscope-reorder`): the longest first, so that the last file a worker takes is a short
# one and neither waits long for the other at the end (measured). Other files follow
# in name order.
LONGEST_FIRST = (
    "test_dvc_pipeline.py", "test_flows.py", "test_zimage_pipeline.py", "test_train.py", "test_dask.py",
    "test_staleness.py", "test_fsdp_run.py",
    "test_train_zimage.py", "test_sharding.py", "test_autoencoder_stage.py", "test_bench_gpu.py",
    "test_export_stage.py", "test_autoencoder.py", "test_bench_trainers.py", "test_caption.py", "test_reliability.py",
    "test_memory_published.py", "test_quantize.py", "test_validation.py", "test_training_adapter.py",
    "test_split.py", "test_prompt_embeds.py", "test_bench_scale.py", "test_structure_loss.py", "test_overfitting.py", "test_autoencoder_vq.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


@pytest.fixture(scope="session", autouse=True)
def tuneline_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One TUNELINE_HOME for the whole run, shared by the xdist workers (their base temps lie in
    the controller's): each tiny model is built once (builders of one folder take turns under a
    lock). A TUNELINE_HOME set by the caller wins."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ.setdefault("TUNELINE_HOME", str(shared / "tuneline-home"))


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + noise): decodes like a real photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(40, 200, 3)[None, None, :]
    pixels = base + 50 * np.sin(6 * x + rng.uniform(0, 6)) + 50 * np.cos(5 * y) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def item_bytes(folder: Path, record: dict[str, Any], field: str = "image") -> bytes:
    """The bytes of a record's packed item file (tuneline.core.packs), as stages read them."""
    from tuneline.core.packs import read_member

    return read_member(folder, record[field])


def corrupt_member(folder: Path, ref: dict[str, Any]) -> None:
    """Overwrite one member of a pack in `folder` with garbage, as a bad disk would; the pack is replaced
    by a corrupted copy (a new file), so the links that share it elsewhere (the store) keep their bytes."""
    path = Path(folder) / ref["pack"]
    data = bytearray(path.read_bytes())
    data[ref["offset"]:ref["offset"] + ref["size"]] = b"x" * ref["size"]
    path.unlink()
    path.write_bytes(bytes(data))


def replace_members(folder: Path, field: str, change: Any) -> None:
    """Rewrite the `field` member of every record of `folder`'s manifest as `change(record, bytes)`
    returns it: new pack files (the links into the store keep their bytes) and the manifest's places."""
    from tuneline.core.manifest import MANIFEST, read_manifest, write_jsonl
    from tuneline.core.packs import read_member, write_tar

    folder = Path(folder)
    records = read_manifest(folder)
    packs: dict[str, list[tuple[str, bytes]]] = {}
    for record in records:
        ref = record[field]
        packs.setdefault(ref["pack"], []).append((ref["member"], change(record, read_member(folder, ref))))
    places = {}
    for pack, members in packs.items():
        (folder / pack).unlink()
        places[pack] = write_tar(folder / pack, members)
    for record in records:
        ref = record[field]
        ref["offset"], ref["size"] = places[ref["pack"]][ref["member"]]
    write_jsonl(folder / MANIFEST, records)


def packed_photo(folder: Path, name: str, size: tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """A photo as a stage output holds it: alone in pack `<name>.tar` of `folder`; its member reference."""
    import io

    from tuneline.core.packs import member_ref, write_tar

    data = io.BytesIO()
    photo(size, seed).save(data, format="PNG")
    folder.mkdir(parents=True, exist_ok=True)
    places = write_tar(folder / f"{name}.tar", [(f"{name}.png", data.getvalue())])
    return member_ref(f"{name}.tar", f"{name}.png", *places[f"{name}.png"])


def item_image(folder: Path, record: dict[str, Any]) -> Image.Image:
    import io

    return Image.open(io.BytesIO(item_bytes(folder, record)))


def item_tensors(folder: Path, record: dict[str, Any], field: str = "latents") -> dict[str, Any]:
    from safetensors.torch import load

    return load(item_bytes(folder, record, field))


def save_photo(path: Path, size: tuple[int, int], seed: int = 0, **save_args: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(size, seed).save(path, **save_args)
    return path


class Project:
    """A project root in tmp_path: params.yaml + data/raw/<data set>/..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.params_data: dict[str, Any] = {
            "datasets": [
                {"name": "alpha", "path": "data/raw/alpha"},
                {"name": "beta", "path": "data/raw/beta"},
            ],
            "ingest": {"min_size": 64, "workers": 1},
            "bucket": {"resolution": 128, "divisible_by": 32, "batch_size": 1, "workers": 1},
        }
        for dataset in ("alpha", "beta"):
            self.raw(dataset)

    def raw(self, dataset: str) -> Path:
        folder = self.root / "data" / "raw" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def params(self, **sections: Any):
        from tuneline.config import validate_params

        data = {**self.params_data}
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        (self.root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
        return validate_params(data)

    def scan(self, params=None):
        from tuneline.stages.scan.stage import run as run_scan

        return run_scan(params or self.params(), self.root, self.root / "data/scanned", self.root / "metrics")

    def ingest(self, params=None):
        """The scan stage, then ingest (which reads what the scan listed): ingest's report."""
        from tuneline.stages.ingest.stage import run as run_ingest

        params = params or self.params()
        self.scan(params)
        return run_ingest(params, self.root, self.root / "data/scanned", self.root / "data/ingested",
                          self.root / "metrics")

    def bucket(self, params=None):
        from tuneline.stages.bucket.stage import run as run_bucket

        return run_bucket(params or self.params(), self.root, self.root / "data/ingested",
                          self.root / "data/bucketed", self.root / "metrics")

    def manifest(self, stage_dir: str) -> list[dict[str, Any]]:
        """A stage's records; past ingest, each with its source file looked up by id (later
        manifests hold no paths, so a rename changes nothing after ingest)."""
        from tuneline.core.manifest import read_manifest

        records = read_manifest(self.root / stage_dir)
        if stage_dir != "data/ingested":
            sources = {r["id"]: r["source"] for r in read_manifest(self.root / "data/ingested")}
            records = [{**r, "source": sources.get(r["id"])} for r in records]
        return records

    def rejected(self, stage_dir: str) -> list[dict[str, Any]]:
        from tuneline.core.manifest import read_jsonl

        return read_jsonl(self.root / stage_dir / "rejected.jsonl")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


# --- a project through the latents stage, for training, render and export tests -------------

def make_latents_project(root: Path, **sections: Any) -> Project:
    """The small two-data-set project (alpha: 4 captioned JPEGs, beta: 2 PNGs) through
    ingest -> bucket -> caption (sidecars) -> latents; `sections` replace params sections."""
    project = Project(root)
    project.params_data["datasets"][0].update(trigger_word="alf", loss_weight=1.0)
    project.params_data["datasets"][1].update(trigger_word="bet", loss_weight=0.5, repeats=2)
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=2)
    project.params_data["caption"] = {"mode": "sidecar_only"}
    project.params_data["latents"] = {"flip": True}
    project.params_data["render"] = {"height": 64, "width": 64, "steps": 2, "live_prompts": 1}
    project.params_data.update(sections)
    (root / "prompts.yaml").write_text("- {prompt: 'alf, a red thing', seed: 1}\n- {prompt: 'bet, a thing', seed: 2}\n")
    for i in range(4):
        save_photo(project.raw("alpha") / f"a{i}.jpg", (96, 64), seed=i, quality=95)
        (project.raw("alpha") / f"a{i}.txt").write_text(f"a red thing, number {i}, outdoors", "utf-8")
    for i in range(2):
        save_photo(project.raw("beta") / f"b{i}.png", (64, 96), seed=10 + i)
    return through_latents(project)


def through_latents(project: Project) -> Project:
    """Run ingest -> bucket -> caption -> latents on the project's params."""
    from tuneline.stages.caption.stage import run as run_caption
    from tuneline.stages.latents.stage import run as run_latents

    root, params = project.root, project.params()
    project.ingest(params)
    project.bucket(params)
    run_caption(params, root, root / "data/bucketed", root / "data/captioned", root / "metrics")
    run_latents(params, root, root / "data/captioned", root / "data/latents", root / "metrics")
    return project


@pytest.fixture(scope="module")
def latents_project(tmp_path_factory):
    """ingest -> bucket -> caption (sidecars) -> latents once; tests train on the result."""
    return make_latents_project(tmp_path_factory.mktemp("train-project"))


def train_params(project: Project, **train):
    from tuneline.config import validate_params

    data = {**project.params_data, "train": {"num_steps": 2, "seed": 7, "lr": 1e-3,
                                              "checkpoint": {"every_steps": 2, "keep_last": 2}, **train}}
    return validate_params(data)


def tiny_adapters(root: Path, families: tuple[str, ...] = ("sdxl", "zimage")) -> dict[str, tuple[Any, dict[str, Any]]]:
    """family -> (an untrained LoRA adapter of its tiny model, loaded and set up for training, its trained
    modules): what the loss tests run their fixed batches through."""
    import torch

    from tuneline.models.config import ModelConfig
    from tuneline.models.registry import build_adapter
    from tuneline.train.config import TrainConfig

    loaded = {}
    for family in families:
        torch.manual_seed(0)
        adapter = build_adapter(family, ModelConfig(base=f"tiny-{family}"), TrainConfig(num_steps=1), root)
        adapter.load()
        adapter.setup_training()
        loaded[family] = adapter, adapter.trained_modules()
    return loaded


def prediction_and_target(family: str, adapter: Any, modules: dict[str, Any], batch: dict[str, Any], noise: Any,
                          timesteps: Any) -> tuple[Any, Any]:
    """(the denoiser's prediction, the usual target) of a tiny adapter (`tiny_adapters`), computed here: SDXL
    through its UNet; Z-Image through its adapter's forward on the batch without prior samples."""
    if family == "zimage":
        plain = {key: value for key, value in batch.items() if key != "prior"}
        return adapter._prediction_and_target(modules, plain, noise, timesteps.float() / 1000)[:2]
    scheduler = adapter.noise_scheduler
    noisy = scheduler.add_noise(batch["latents"], noise, timesteps)
    prediction = modules["unet"](noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs={
        "text_embeds": batch["pooled"], "time_ids": adapter.time_ids(batch, "cpu")}).sample
    target = (scheduler.get_velocity(batch["latents"], noise, timesteps) if adapter.prediction_type == "v_prediction"
              else noise)
    return prediction, target


def make_trainer(project: Project, run: Path, params, resume_from: Path | None = None, live_every: int = 0):
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import LiveEvaluation, build_trainer

    AcceleratorState._reset_state(True)  # one process, many trainers
    trainer = build_trainer(params, project.root, project.root / "data/latents", run / "checkpoints",
                            resume_from=resume_from,  # the adapter of model.base's family
                            live_eval=LiveEvaluation(params, project.root, None), live_every=live_every)
    trainer.setup()
    return trainer
