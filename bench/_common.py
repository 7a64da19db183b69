"""What every bench shares: the goal record, the goals table, the exit rule."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def goal(bench: str, name: str, measured: float, display: str, target: str, passed: bool,
         kind: str = "goal") -> dict[str, Any]:
    """kind 'goal' is reported PASS/MISS; kind 'check' is correctness and fails the run when false; kind
    'info' is a goal's measure taken where the goal does not apply (tiny shapes): shown, not judged."""
    return {"bench": bench, "name": name, "measured": measured, "display": display, "goal": target,
            "passed": bool(passed), "kind": kind}


def print_goals(goals: Sequence[dict[str, Any]], console: Any, title: str, with_bench: bool = False) -> None:
    """The goals table: measured next to goal, PASS/MISS (goals) or OK/FAIL (correctness checks)."""
    from rich.table import Table

    table = Table(title=title)
    columns = (["bench"] if with_bench else []) + ["measure", "measured", "goal", "result"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("measured", "goal") else "left")
    for g in goals:
        if g["kind"] == "check":
            verdict = "[green]OK[/]" if g["passed"] else "[red]FAIL[/]"
        elif g["kind"] == "info":  # measured, but not at the scale the goal is about
            verdict = "n/a"
        else:
            verdict = "[green]PASS[/]" if g["passed"] else "[yellow]MISS[/]"
        table.add_row(*([g["bench"]] if with_bench else []), g["name"], g["display"], g["goal"], verdict)
    console.print(table)


def note_load(console: Any, machine: dict[str, Any]) -> None:
    """Say so when other processes shared the cores during the run."""
    load = machine["load_average"]
    if max(load) > machine["usable_cpus"]:
        console.print(f"[yellow]note:[/] load average {load[0]} -> {load[1]} on {machine['usable_cpus']} usable "
                      "cores: other processes were running; ratios compare runs under the same load")


def rounds_table(rows: Sequence[dict[str, Any]], title: str, digits: int = 2) -> Any:
    """The trainer-vs-bare table: each variant's steps/s per round, median, per-round ratios to the bare
    loop and their median (rows as the train and zimage benches record them)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("variant", "rounds (steps/s)", "median steps/s", "per-round vs bare", "vs bare"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], ", ".join(f"{x:.{digits}f}" for x in r["steps_per_s"]), f"{r['median']:.2f}",
                      ", ".join(f"{x:.2f}" for x in r["ratios"]), f"{r['vs_bare']:.2f}x")
    return table


def failed_checks(result: dict[str, Any]) -> list[str]:
    return [g["name"] for g in result["goals"] if g["kind"] == "check" and not g["passed"]]


def bench_main(run: Callable[[list[str]], dict[str, Any]], argv: Sequence[str]) -> int:
    """`python -m bench.<name>`: run, print the JSON record; exit 1 only when a correctness check failed."""
    from tuneline.core.logs import quiet_libraries

    quiet_libraries()  # the libraries' import chatter (torchao, bitsandbytes) stays off the terminal
    result = run(list(argv))
    print(json.dumps(result, separators=(",", ":")))
    return 1 if failed_checks(result) else 0


def make_photo(size: tuple[int, int], rng: np.random.Generator) -> Any:
    """A smooth photo-like RGB image (gradients + noise) that compresses and decodes like a photo."""
    from PIL import Image

    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(40, 200, 3)[None, None, :]
    pixels = (base + 50 * np.sin(6 * x + rng.uniform(0, 6)) + 50 * np.cos(5 * y + rng.uniform(0, 6))
              + rng.normal(0, 4, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")



def ensure_project(work: Path, data: dict[str, Any], images: int, seed: int, version: int,
                   through: str) -> tuple[Path, Any, float]:
    """A generated project in work/project run through stage `through` (reused while the spec
    matches), its params and the seconds spent. The images are square photos a bit larger than the
    bucket (every one lands in one bucket), dealt round the data sets; up to the caption stage each
    gets a sidecar caption."""
    import time

    from tuneline.config import validate_params
    from tuneline.orchestration.registry import STAGE_NAMES, stage

    root = work / "project"
    params = validate_params(data)
    spec = {"version": version, "images": images, "params": data}
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return root, params, 0.0
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    stages = STAGE_NAMES[STAGE_NAMES.index("scan"):STAGE_NAMES.index(through) + 1]
    rng = np.random.default_rng(seed)
    resolution = data["bucket"]["resolution"]
    for index in range(images):
        raw = root / data["datasets"][index % len(data["datasets"])]["path"]
        raw.mkdir(parents=True, exist_ok=True)
        side = int(resolution * rng.uniform(1.1, 1.5))
        make_photo((side, side), rng).save(raw / f"img{index:03d}.png", compress_level=1)
        if "caption" in stages:
            (raw / f"img{index:03d}.txt").write_text(f"a photo of a smooth gradient, number {index}", "utf-8")
    for name in stages:
        if name != "autoencoder":  # off in every bench project: a no-op
            stage(name).run(params, root)
    spec_file.write_text(json.dumps(spec))
    return root, params, time.perf_counter() - started


def make_trainer(adapter_class: type, params: Any, root: Path, run_dir: Path, fresh: bool = True) -> Any:
    """A set-up Trainer on root's cached latents, checkpoints in run_dir (emptied first unless `fresh` is
    false: then it resumes from them)."""
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import build_trainer

    AcceleratorState._reset_state(True)
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    trainer = build_trainer(params, root, root / "data/latents", run_dir / "checkpoints",
                            adapter_class(params.model, params.train, root))
    trainer.setup()
    return trainer


def image_cache(folder: Path, spec: dict[str, Any]) -> Path:
    """`folder`, a cache of generated images that later runs reuse: emptied first when its spec.json
    is missing or differs from `spec` (another generator version, seed or Pillow), then `spec` recorded."""
    spec_file = folder / "spec.json"
    if folder.exists() and (not spec_file.is_file() or json.loads(spec_file.read_text()) != spec):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def write_pack(folder: Path, pack: str, members: Sequence[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """Members as a stage output packs them (tuneline.core.packs): `folder/pack`; each member's manifest reference."""
    from tuneline.core.packs import member_ref, write_tar

    places = write_tar(Path(folder) / pack, members)
    return {name: member_ref(pack, name, *places[name]) for name, _ in members}
