"""Bench: the latents stage (cold) against a bare batched VAE-encode loop over the same tensors.

    python -m bench.latents [--images 64] [--resolution 192] [--batch-size 4] [--rounds 3]

Generates photo-like PNGs once into bench/out/latents (reused while the generator spec
matches), runs ingest + bucket on them and writes data/captioned as the caption stage
does. Then, in one process with the tiny RANDOM SDXL VAE on CPU (fp32):

  bare loop   every image decoded to a [-1, 1] tensor beforehand (not timed), the VAE
              loaded beforehand (not timed); timed: vae.encode over the same batches the
              stage makes (same bucket, same batch size), mean and std copied to the CPU
  stage cold  run_latents on an empty store: manifest, VAE identity, VAE load, PNG decode,
              encode, safetensors writes (atomic, fsync), output folder; text embeddings
              and flip off so both sides do the same VAE work

Rounds alternate bare, stage, bare, stage, ... and each side keeps its best round, so a
noisy neighbour on a shared machine hurts neither side more. Every distinct batch shape
is encoded once before any timing (oneDNN builds its kernels per shape). Checks: the
stage's stored means equal the bare loop's, and a rerun computes nothing without
loading the VAE. Prints a table and the goals; `run()` returns the same as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench._common import bench_main, goal, make_photo, note_load, print_goals

NAME = "latents"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
# Bump when image content or naming changes: cached images are then regenerated.
GENERATOR_VERSION = 1
SEED = 7
DATASETS = ("set_a", "set_b")
# Aspect ratios of the generated photos (width, height); buckets follow from them.
RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2))
GOAL_RATIO = 0.85  # stage images/s over bare-loop images/s


def bench_params(resolution: int, batch_size: int, store_dir: str) -> Any:
    from tuneline.config import validate_params

    return validate_params({
        "store_dir": store_dir,
        "datasets": [{"name": name, "path": f"data/raw/{name}"} for name in DATASETS],
        "ingest": {"min_size": 64},
        "bucket": {"resolution": resolution, "divisible_by": 64, "batch_size": batch_size},
        "model": {"base": "tiny-sdxl"},
        "latents": {"batch_size": batch_size, "dtype": "fp32", "device": "cpu", "flip": False,
                    "text_embeddings": False},
    })


def ensure_project(work: Path, images: int, resolution: int, batch_size: int) -> tuple[Path, float]:
    """A project root with data/captioned for `images` generated photos; (root, seconds spent making it)."""
    from tuneline.stages.bucket.stage import run as run_bucket
    from tuneline.stages.ingest.stage import run as run_ingest
    from tuneline.stages.scan.stage import run as run_scan
    from tuneline.core.manifest import read_jsonl, write_jsonl

    root = work / "project"
    spec = {"version": GENERATOR_VERSION, "images": images, "resolution": resolution, "batch_size": batch_size}
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return root, 0.0
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(SEED)
    for index in range(images):
        ratio = RATIOS[index % len(RATIOS)]
        scale = rng.uniform(1.2, 2.0) * resolution / max(ratio)
        size = (int(ratio[0] * scale), int(ratio[1] * scale))
        path = root / "data/raw" / DATASETS[index % 2] / f"img{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_photo(size, rng).save(path, compress_level=1)
    params = bench_params(resolution, batch_size, ".tuneline/store")
    run_scan(params, root, root / "data/scanned")
    run_ingest(params, root, root / "data/scanned", root / "data/ingested")
    run_bucket(params, root, root / "data/ingested", root / "data/bucketed")
    # data/captioned as the caption stage writes it: the bucketed images plus a caption.
    shutil.rmtree(root / "data/captioned", ignore_errors=True)
    shutil.copytree(root / "data/bucketed", root / "data/captioned", copy_function=os.link)
    records = read_jsonl(root / "data/bucketed/manifest.jsonl")
    write_jsonl(root / "data/captioned/manifest.jsonl", [{**r, "caption": f"photo {r['id'][:8]}"} for r in records])
    spec_file.write_text(json.dumps(spec))
    return root, time.perf_counter() - started


def bare_loop(vae: Any, batches: list[Any]) -> tuple[float, list[Any]]:
    """Seconds to encode every pre-made batch, and the means (on the CPU)."""
    import torch

    means = []
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels in batches:
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean.cpu())
            dist.std.cpu()
    return time.perf_counter() - started, means


def stage_cold(root: Path, params: Any) -> tuple[float, Any]:
    from tuneline.stages.latents.stage import run as run_latents

    shutil.rmtree(root / params.store_dir, ignore_errors=True)
    started = time.perf_counter()
    report = run_latents(params, root, root / "data/captioned", root / "data/latents")
    return time.perf_counter() - started, report


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--resolution", type=int, default=192, help="bucket side (default 192; tiny VAE, CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="VAE batch size of both sides (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; best kept (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of both sides (default: torch's, one per core)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/latents)")
    args = parser.parse_args(argv)
    wall = time.perf_counter()

    import torch

    from tuneline.stages.latents.vae import image_file, latent_batches, load_pixels
    from tuneline.core.manifest import read_manifest
    from tuneline.models.loading import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    root, generation_s = ensure_project(work, args.images, args.resolution, args.batch_size)
    records = read_manifest(root / "data/captioned")
    params = bench_params(args.resolution, args.batch_size, ".tuneline/bench-store")
    order = latent_batches(records, list(range(len(records))), args.batch_size)  # the stage's batches
    batches = [torch.stack([load_pixels(image_file(root / "data/captioned", records[i])) for i in batch])
               for batch in order]
    vae = load_vae(params.model, root, "fp32", "cpu")
    with torch.inference_mode():  # one batch per shape: kernels are built before any timing
        for shape in {tuple(b.shape) for b in batches}:
            vae.encode(next(b for b in batches if tuple(b.shape) == shape))
    print(f"bench {NAME}: {len(records)} images in {len(batches)} batches of <= {args.batch_size}, "
          f"buckets {sorted({tuple(r['bucket']) for r in records})}, torch threads {torch.get_num_threads()}",
          flush=True)

    load_before = os.getloadavg()[0]
    bare_s, stage_s, report, means = [], [], None, []
    for _ in range(args.rounds):
        seconds, means = bare_loop(vae, batches)
        bare_s.append(seconds)
        seconds, report = stage_cold(root, params)
        stage_s.append(seconds)
    rerun_s, rerun = time.perf_counter(), None
    from tuneline.stages.latents.stage import run as run_latents

    rerun = run_latents(params, root, root / "data/captioned", root / "data/latents")
    rerun_s = time.perf_counter() - rerun_s

    from safetensors.torch import load_file

    stored = {r["id"]: r for r in read_manifest(root / "data/latents")}
    worst = 0.0
    for batch, batch_means in zip(order, means):
        for b, i in enumerate(batch):
            mean = load_file(root / "data/latents" / stored[records[i]["id"]]["latents"])["mean"]
            worst = max(worst, float((mean - batch_means[b]).abs().max()))

    count = len(records)
    best_bare, best_stage = min(bare_s), min(stage_s)
    ratio = best_bare / best_stage  # = (count / stage) / (count / bare), unrounded
    rows = [
        {"variant": "bare loop (pre-made tensors, VAE loaded)", "seconds": [round(s, 3) for s in bare_s],
         "best_s": round(best_bare, 3), "images_per_s": round(count / best_bare, 2)},
        {"variant": "stage cold (run_latents, empty store)", "seconds": [round(s, 3) for s in stage_s],
         "best_s": round(best_stage, 3), "images_per_s": round(count / best_stage, 2)},
        {"variant": "stage rerun (all cached)", "seconds": [round(rerun_s, 3)], "best_s": round(rerun_s, 3),
         "images_per_s": round(count / rerun_s, 2)},
    ]
    goals = [
        goal(NAME, "stage cold / bare encode loop, images/s", ratio, f"{ratio:.2f}x", f">= {GOAL_RATIO}x",
             ratio >= GOAL_RATIO),
        goal(NAME, "stage computed all, rejected none", report.computed, f"{report.computed}/{count}",
             f"{count}/{count}", report.computed == count and not report.rejected, kind="check"),
        goal(NAME, "stored means = bare loop means (max abs diff)", worst, f"{worst:.1e}", "<= 1e-5", worst <= 1e-5,
             kind="check"),
        goal(NAME, "rerun computed, VAE loaded", rerun.computed, f"{rerun.computed}, {rerun.extra['vae_loaded']}",
             "0, False", rerun.computed == 0 and not rerun.extra["vae_loaded"], kind="check"),
    ]
    result = {
        "bench": NAME,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    # Other processes competing for the cores make both sides noisy (OpenMP suffers most).
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "settings": {"images": count, "resolution": args.resolution, "batch_size": args.batch_size,
                     "rounds": args.rounds, "model": "tiny-sdxl VAE (RANDOM weights), fp32, CPU"},
        "rows": rows, "goals": goals,
        "generation_s": round(generation_s, 1), "total_s": round(time.perf_counter() - wall, 1),
    }
    print_report(result)
    (work / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root / params.store_dir, ignore_errors=True)
    shutil.rmtree(root / "data/latents", ignore_errors=True)
    return result


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(120, Console().width))
    s = result["settings"]
    console.print(f"{s['images']} images, resolution {s['resolution']}, batch {s['batch_size']}, {s['model']}, "
                  f"torch threads {result['machine']['torch_threads']}")
    table = Table(title=f"{NAME}: stage vs bare VAE loop (alternating rounds, best kept)")
    for column in ("variant", "rounds (s)", "best s", "images/s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in result["rows"]:
        table.add_row(r["variant"], ", ".join(f"{x:.2f}" for x in r["seconds"]), f"{r['best_s']:.2f}",
                      f"{r['images_per_s']:.1f}")
    console.print(table)
    note_load(console, result["machine"])
    print_goals(result["goals"], console, f"{NAME}: goals")
    console.print(f"total {result['total_s']:.0f} s (image generation {result['generation_s']:.0f} s, not measured)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
