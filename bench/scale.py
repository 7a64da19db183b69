"""Bench: the data stages at scale under `dvc repro latents`, as they are today.

    python -m bench.scale [--scales 1000,10000,50000] [--small] [--work bench/out/scale] [--keep]

For each scale N it builds a fresh project (the repo's dvc.yaml, params.yaml, .dvcignore,
prompts.yaml, stages/, src/ and .dvc/ copied, `git init`), whose one data set holds N generated
JPEGs of 384-768 px (varied sizes, deterministic from the seed) with sidecar captions, hard-linked
from an image cache under WORK/images that later runs reuse. Params: `caption.mode: sidecar_only`,
`bucket.resolution: 256` (`--resolution`), `bucket.batch_size: 1` (no small-bucket merges: one added image cannot
move others), the tiny RANDOM models (the defaults). Every DVC command runs with OMP_NUM_THREADS=1
and PYTHONPATH at the project's src/. Measured per scale:

  cold           `dvc repro latents` on the fresh project (models, scan, ingest, bucket, autoencoder (off),
                 caption, latents): seconds, and seconds per 1,000 images
  no-op          `dvc repro latents` again, and `dvc status latents`: seconds
  +1 image       one more JPEG + sidecar, `dvc repro latents`: total seconds; per stage that ran,
                 reports/<stage>.json's computed/reused/given and seconds (the stage's own work), and
                 its process's wall time (sampled); DVC's overhead = total - the stages' seconds
  disk           derived bytes (data/ingested, bucketed, captioned, latents + .tuneline/store +
                 .dvc/cache, each inode counted once) / one copy (the outputs' bytes, each inode
                 once); file counts
  peak RSS       VmHWM of every process under the dvc command, sampled every 0.1 s (a high-water
                 mark: a late sample holds the peak), the largest stage process and dvc itself

Goals (issue 28): +1 image at the largest scale
<= 2x the same at the smallest; no-op repro and `dvc status` at the largest <= 5 s; derived bytes
<= 1.2x one copy; peak RSS of the stage processes at the largest <= 1.5x at the smallest. The ratio
goals need two scales (one scale shows them as n/a); `--small` (40 images, for CI) judges no goal.
A MISS is a measurement: the exit status is 1 only when a check fails (every +1 run must compute
exactly one item in ingest, bucket and latents, scan must hash exactly the two new files, and caption
must take every caption as given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench._common import bench_main, goal, image_cache, note_load, print_goals

NAME = "scale"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
DEFAULT_SCALES = (1000, 10000, 50000)
SMALL_SCALE = 40
GENERATOR_VERSION = 1  # bump when image content or naming changes: the image cache is then regenerated
SEED = 20261206
QUALITY = 90
EXTRA_INDEX = 10**7  # the image added for the +1 run: outside any scale's range
DATASET = "gen"
DATA_STAGES = ("scan", "ingest", "bucket", "caption", "latents")
DERIVED = ("data/scanned", "data/ingested", "data/bucketed", "data/captioned", "data/latents")
STORE = ".tuneline/store"
DVC_CACHE = ".dvc/cache"
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "prompts.yaml")
PROJECT_TREES = ("stages", "src", "data/caption_edits", ".dvc")

GOAL_PLUS_ONE = 2.0  # +1 image at the largest scale / at the smallest
GOAL_NOOP_S = 5.0  # no-op repro and dvc status at the largest scale
GOAL_BYTES = 1.2  # derived bytes on disk / one copy
GOAL_RSS = 1.5  # peak RSS of the stage processes at the largest scale / at the smallest


# --- images --------------------------------------------------------------------------------


def image_name(index: int) -> str:
    return "zz_extra.jpg" if index == EXTRA_INDEX else f"img_{index:07d}.jpg"


def write_image(folder: Path, index: int) -> None:
    """One JPEG of 384-768 px a side (a smooth random field upsampled, plus mild noise: it decodes
    and compresses like a photo, at a few ms) and its sidecar caption."""
    from PIL import Image

    rng = np.random.default_rng([SEED, index])
    width, height = (int(v) for v in rng.integers(384, 769, 2))
    coarse = rng.integers(30, 226, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC), np.int16)
    pixels = pixels + rng.integers(-4, 5, (height, width, 1), dtype=np.int16)
    path = folder / image_name(index)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(tmp, format="JPEG", quality=QUALITY)
    path.with_suffix(".txt").write_text(f"a generated picture, number {index}", "utf-8")
    os.replace(tmp, path)  # a JPEG that exists is complete (its caption was written first)


def ensure_images(work: Path, count: int) -> tuple[Path, float]:
    """WORK/images with images 0..count-1 and the extra one, generated where missing; seconds spent."""
    from PIL import Image

    folder = image_cache(work / "images", {"generator": GENERATOR_VERSION, "seed": SEED, "quality": QUALITY,
                                           "pillow": Image.__version__})
    missing = [i for i in [*range(count), EXTRA_INDEX] if not (folder / image_name(i)).is_file()]
    started = time.perf_counter()
    if missing:
        print(f"generating {len(missing)} images into {folder} (once; not measured) ...", flush=True)
    for index in missing:
        write_image(folder, index)
    return folder, time.perf_counter() - started


def link_image(images: Path, raw: Path, index: int) -> None:
    for suffix in (".jpg", ".txt"):
        name = Path(image_name(index)).with_suffix(suffix).name
        os.link(images / name, raw / name)


# --- the project -----------------------------------------------------------------------------


def make_project(root: Path, images: Path, count: int, tracking: bool = True, resolution: int = 256) -> None:
    """A fresh DVC project as tests/test_dvc_pipeline.py makes one, with `count` images in data/raw/gen."""
    import yaml

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, root / name)
    for name in PROJECT_TREES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = [{"name": DATASET, "path": f"data/raw/{DATASET}"}]
    params["caption"]["mode"] = "sidecar_only"
    params["bucket"]["resolution"] = resolution
    params["bucket"]["batch_size"] = 1
    params["tracking"]["enabled"] = tracking
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw = root / "data" / "raw" / DATASET
    raw.mkdir(parents=True)
    for index in range(count):
        link_image(images, raw, index)


class TreeSampler:
    """Samples the process tree under `pid` every `interval` s: each process's VmHWM (its peak RSS so
    far) and the time it was last seen, labelled by the stage whose command it runs or descends from."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _label(self, process: Any) -> str:
        try:
            found = re.search(r"stages\.(\w+)", " ".join(process.cmdline()))
        except Exception:  # noqa: BLE001 - the process ended between listing and reading
            found = None
        if found:
            return found.group(1)
        parent = self.seen.get(process.ppid() if process.is_running() else -1)
        return parent["label"] if parent else "dvc"

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            now = time.time()
            for process in processes:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    entry = self.seen.get(process.pid)
                    if entry is None:
                        entry = self.seen[process.pid] = {"label": self._label(process), "hwm_kib": 0,
                                                          "started": process.create_time(), "last": now}
                except (OSError, psutil.Error):
                    continue
                found = re.search(r"VmHWM:\s+(\d+) kB", status)
                entry["hwm_kib"] = max(entry["hwm_kib"], int(found.group(1)) if found else 0)
                entry["last"] = now
            self._stop.wait(self.interval)

    def by_label(self) -> dict[str, dict[str, float]]:
        """{label: {peak_rss_mib: the largest process's peak, process_s: first start to last sighting}}."""
        out: dict[str, dict[str, float]] = {}
        for entry in self.seen.values():
            row = out.setdefault(entry["label"], {"peak_rss_mib": 0.0, "started": entry["started"], "last": 0.0})
            row["peak_rss_mib"] = max(row["peak_rss_mib"], entry["hwm_kib"] / 1024)
            row["started"], row["last"] = min(row["started"], entry["started"]), max(row["last"], entry["last"])
        return {label: {"peak_rss_mib": round(r["peak_rss_mib"], 1), "process_s": round(r["last"] - r["started"], 2)}
                for label, r in out.items()}


def dvc(root: Path, *args: str) -> dict[str, Any]:
    """One timed DVC command in `root`; raises when it fails."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root / "src")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with TreeSampler(process.pid) as sampler:
        output, _ = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {process.returncode}) in {root}:\n{output[-4000:]}")
    ran = re.findall(r"Running stage '(\w+)'", output)
    return {"seconds": round(seconds, 2), "ran": ran, "processes": sampler.by_label(), "output": output}


def stage_reports(root: Path, stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """reports/<stage>.json of the stages that ran (a stage that did not run has last time's)."""
    keys = ("computed", "reused", "given", "items", "seconds")
    found = {}
    for stage in stages:
        report = json.loads((root / "reports" / f"{stage}.json").read_text())
        found[stage] = {key: report.get(key, 0) for key in keys}
    return found


def disk(root: Path) -> dict[str, Any]:
    """Bytes (st_size) and files of the outputs, the store and DVC's cache; each inode counted once
    over all three, in the order listed (a file linked from an output and the store counts once)."""
    seen: set[tuple[int, int]] = set()
    parts: dict[str, dict[str, int]] = {}
    for part, folders in (("outputs", DERIVED), ("store", (STORE,)), ("dvc_cache", (DVC_CACHE,))):
        files = unique_bytes = 0
        for folder in folders:
            for path in (root / folder).rglob("*"):
                stat = path.lstat()
                if not path.is_file() or path.is_symlink():
                    continue
                files += 1
                key = (stat.st_dev, stat.st_ino)
                if key not in seen:
                    seen.add(key)
                    unique_bytes += stat.st_size
        parts[part] = {"files": files, "unique_bytes": unique_bytes}
    # One copy: what the outputs hold (each inode once). The rest is overhead: the store's packs an added
    # image superseded, its index and model captions, copies DVC made instead of links.
    one_copy = parts["outputs"]["unique_bytes"]
    raw_bytes = sum(p.stat().st_size for p in (root / "data/raw").rglob("*") if p.is_file())
    derived = sum(p["unique_bytes"] for p in parts.values())
    return {"derived_bytes": derived, "one_copy_bytes": one_copy, "raw_bytes": raw_bytes,
            "ratio": round(derived / one_copy, 2) if one_copy else None, "parts": parts}


def measure_scale(work: Path, images: Path, count: int, keep: bool, tracking: bool = True,
                  resolution: int = 256) -> dict[str, Any]:
    root = work / f"n{count}"
    make_project(root, images, count, tracking, resolution)
    print(f"  {count} images: cold dvc repro latents ...", flush=True)
    cold = dvc(root, "repro", "latents")
    cold_reports = stage_reports(root, [s for s in cold["ran"] if (root / "reports" / f"{s}.json").is_file()])
    print(f"  {count} images: no-op repro, dvc status ...", flush=True)
    noop = dvc(root, "repro", "latents")
    status = dvc(root, "status", "latents")
    link_image(images, root / "data" / "raw" / DATASET, EXTRA_INDEX)
    print(f"  {count} images: +1 image ...", flush=True)
    plus = dvc(root, "repro", "latents")
    plus_reports = stage_reports(root, [s for s in plus["ran"] if (root / "reports" / f"{s}.json").is_file()])
    stage_s = sum(r["seconds"] for r in plus_reports.values())
    for stage, report in plus_reports.items():
        report["process_s"] = plus["processes"].get(stage, {}).get("process_s")
        report["peak_rss_mib"] = plus["processes"].get(stage, {}).get("peak_rss_mib")
    used = disk(root)
    stage_rss = [p["peak_rss_mib"] for label, p in cold["processes"].items() if label != "dvc"]
    result = {
        "images": count,
        "cold_s": cold["seconds"], "cold_s_per_1000": round(cold["seconds"] * 1000 / count, 1),
        "cold_ran": cold["ran"], "cold_reports": cold_reports,
        "noop_repro_s": noop["seconds"], "noop_ran": noop["ran"],
        "noop_models": stage_reports(root, ["models"])["models"] if "models" in noop["ran"] else None,
        "status_s": status["seconds"],
        "status_clean": "Data and pipelines are up to date" in status["output"],
        "plus_one_s": plus["seconds"], "plus_one_ran": plus["ran"], "plus_one_stages": plus_reports,
        "plus_one_stage_s": round(stage_s, 2), "plus_one_dvc_s": round(plus["seconds"] - stage_s, 2),
        "disk": used,
        "peak_rss_stages_mib": max(stage_rss, default=0.0),
        "peak_rss_dvc_mib": max((p["peak_rss_mib"] for r in (cold, noop, status, plus)
                                 for label, p in r["processes"].items() if label == "dvc"), default=0.0),
        "cold_processes": cold["processes"],
    }
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def plus_one_check(row: dict[str, Any]) -> tuple[bool, str]:
    """+1 image: scan hashes exactly two files (the image and its sidecar caption); ingest, bucket and
    latents compute exactly one item; caption (sidecar_only) computes none and takes every caption as
    given (its counts cannot show one item's work)."""
    reports = row["plus_one_stages"]
    n = row["images"] + 1

    def counts(stage: str) -> tuple[int, int]:
        report = reports.get(stage, {})
        return report.get("computed", -1), report.get("given", 0)

    shown = ", ".join(f"{s} {counts(s)[0]}" + (f" (given {counts(s)[1]})" if counts(s)[1] else "") for s in DATA_STAGES)
    ok = (counts("scan")[0] == 2 and all(counts(s)[0] == 1 for s in ("ingest", "bucket", "latents"))
          and counts("caption") == (0, n) and all(s in reports for s in DATA_STAGES))
    return ok, shown


# --- the run and its report ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    import dvc as dvc_module

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable, "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "dvc": dvc_module.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def make_goals(rows: Sequence[dict[str, Any]], small: bool) -> list[dict[str, Any]]:
    first, last = rows[0], rows[-1]
    two = len(rows) > 1 and not small
    judged = "goal" if not small else "info"
    ratio_kind = "goal" if two else "info"
    at = f"{last['images']:,}"
    goals = []
    for row in rows:
        ok, shown = plus_one_check(row)
        goals.append(goal(NAME, f"+1 image at {row['images']:,}: computed per data stage", 1.0 if ok else 0.0, shown,
                          "scan 2 files; ingest, bucket, latents 1; caption 0 (all given)", ok, kind="check"))
    plus = last["plus_one_s"] / first["plus_one_s"]
    goals.append(goal(NAME, f"+1 image at {at} / at {first['images']:,} ({last['plus_one_s']:.1f} / "
                            f"{first['plus_one_s']:.1f} s)", plus, f"{plus:.2f}x", f"<= {GOAL_PLUS_ONE:.0f}x",
                      plus <= GOAL_PLUS_ONE, kind=ratio_kind))
    for key, label in (("noop_repro_s", "no-op dvc repro latents"), ("status_s", "dvc status latents")):
        goals.append(goal(NAME, f"{label} at {at}", last[key], f"{last[key]:.1f} s", f"<= {GOAL_NOOP_S:.0f} s",
                          last[key] <= GOAL_NOOP_S, kind=judged))
    ratio = last["disk"]["ratio"] or 0.0
    goals.append(goal(NAME, f"derived bytes / one copy at {at}", ratio, f"{ratio:.2f}x", f"<= {GOAL_BYTES}x",
                      ratio <= GOAL_BYTES, kind=judged))
    rss = last["peak_rss_stages_mib"] / first["peak_rss_stages_mib"]
    goals.append(goal(NAME, f"peak RSS of stage processes at {at} / at {first['images']:,} "
                            f"({last['peak_rss_stages_mib']:.0f} / {first['peak_rss_stages_mib']:.0f} MiB)",
                      rss, f"{rss:.2f}x", f"<= {GOAL_RSS}x", rss <= GOAL_RSS, kind=ratio_kind))
    return goals


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(140, Console().width))
    m = result["machine"]
    console.print(f"machine: {m['cpu_count']} CPUs ({m['usable_cpus']} usable), {m['cpu']}, python {m['python']}, "
                  f"dvc {m['dvc']}; load average {m['load_average']}")
    console.print("images: generated JPEGs of 384-768 px (q90) + sidecar captions; caption.mode sidecar_only, "
                  f"bucket.resolution {result['settings']['resolution']}, bucket.batch_size 1, tiny models; "
                  "OMP_NUM_THREADS=1", soft_wrap=True)
    table = Table(title=f"{NAME}: dvc repro latents per scale")
    columns = ("images", "cold s", "cold s/1k", "no-op repro s", "dvc status s", "+1 total s (DVC / stages)",
               "derived (raw)", "/ one copy", "files (outputs, store, cache)", "peak RSS stages / dvc MiB")
    for column in columns:
        table.add_column(column, justify="right")
    for r in result["scales"]:
        d = r["disk"]
        files = ", ".join(f"{d['parts'][p]['files']:,}" for p in ("outputs", "store", "dvc_cache"))
        plus = f"{r['plus_one_s']:.1f} ({r['plus_one_dvc_s']:.1f} / {r['plus_one_stage_s']:.1f})"
        table.add_row(f"{r['images']:,}", f"{r['cold_s']:.1f}", f"{r['cold_s_per_1000']:.1f}",
                      f"{r['noop_repro_s']:.2f}", f"{r['status_s']:.2f}", plus,
                      f"{mb(d['derived_bytes'])} ({mb(d['raw_bytes'])})", f"{d['ratio']}x", files,
                      f"{r['peak_rss_stages_mib']:.0f} / {r['peak_rss_dvc_mib']:.0f}")
    console.print(table)
    for r in result["scales"]:
        detail = Table(title=f"+1 image at {r['images']:,}: each stage that ran ({r['plus_one_s']:.1f} s in all, "
                             f"{r['plus_one_dvc_s']:.1f} s not in any stage's own seconds)")
        for column in ("stage", "computed", "reused", "given", "stage s (report)", "process s (sampled)",
                       "peak RSS MiB"):
            detail.add_column(column, justify="left" if column == "stage" else "right")
        for stage, s in r["plus_one_stages"].items():
            detail.add_row(stage, str(s["computed"]), str(s["reused"]), str(s["given"]), f"{s['seconds']:.2f}",
                           "-" if s["process_s"] is None else f"{s['process_s']:.1f}",
                           "-" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f}")
        console.print(detail)
        models = r["noop_models"]
        console.print(f"no-op at {r['images']:,}: ran {r['noop_ran'] or 'nothing'}"
                      + (f" (models computed {models['computed']})" if models else "")
                      + f"; dvc status clean: {r['status_clean']}", soft_wrap=True)
    print_goals(result["goals"], console, f"{NAME}: goals (issue 28)")
    note_load(console, m)
    console.print(f"total {result['total_s']:.0f} s (image generation {result['generation_s']:.0f} s, not measured)")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                        help="comma-separated image counts (default 1000,10000,50000)")
    parser.add_argument("--small", action="store_true", help=f"one scale of {SMALL_SCALE} images (CI); judges no goal")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/scale)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="bucket.resolution (default 256); a smaller one shortens the cold runs, and a +1 image "
                             "encodes one image whatever its size")
    parser.add_argument("--keep", action="store_true", help="keep each scale's project under WORK/n<N>")
    parser.add_argument("--no-tracking", action="store_true",
                        help="tracking.enabled: false (each tracked stage process that computes pays about 3.5 s for "
                             "MLflow; the default measures what a user runs)")
    args = parser.parse_args(argv)
    scales = [SMALL_SCALE] if args.small else sorted({int(v) for v in args.scales.split(",") if v.strip()})
    if not scales or min(scales) < 1:
        parser.error("--scales needs positive image counts")
    wall = time.perf_counter()
    work: Path = (args.work / "small" if args.small else args.work).resolve()
    images, generation_s = ensure_images(work, max(scales))
    print(f"bench {NAME}: scales {', '.join(f'{n:,}' for n in scales)}", flush=True)
    rows = [measure_scale(work, images, count, args.keep, not args.no_tracking, args.resolution) for count in scales]
    result = {"bench": NAME, "small": args.small, "machine": machine(),
              "settings": {"scales": scales, "resolution": args.resolution, "images": "JPEG 384-768 px q90, sidecar captions",
                           "omp_num_threads": 1, "tracking": not args.no_tracking},
              "scales": rows, "goals": make_goals(rows, args.small),
              "generation_s": round(generation_s, 1), "total_s": round(time.perf_counter() - wall, 1)}
    print_report(result)
    (work / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
