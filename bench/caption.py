"""Bench: the caption stage's batched Florence-2 path against one image per generate call.

    python -m bench.caption [--images 32] [--batch-size 8] [--beams 1] [--max-new-tokens 20] [--repeats 2]

Both sides run tuneline.stages.caption.stage.generate_captions (load, batches with out-of-memory
halving, store writes, unload) on the same images, in this process, with the tiny
RANDOM-weight Florence-2 on CPU: its captions mean nothing, but every call is the real
one. A warm-up run first pays for imports and first-call setup; then the variants
alternate `--repeats` times and each keeps its best time. The ratio is informative: on
a GPU with a real model batching matters far more than on a tiny CPU model. A check
confirms that both sides wrote the same captions. Prints a table and a final JSON line;
`run()` returns the same data for bench.run_all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

NAME = "caption"
GOAL_RATIO = 1.0  # batched images/s over one-at-a-time images/s
# Bucket-like sizes (multiples of 64, about 0.05 MP): decoding stays a small part of the time.
SIZES = ((256, 192), (192, 256), (256, 256), (320, 192))


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` deterministic smooth RGB PNGs of bucket-like sizes."""
    paths = []
    for index in range(count):
        rng = np.random.default_rng([2024, index])
        width, height = SIZES[index % len(SIZES)]
        ramp = np.linspace(0.6, 1.2, width)[None, :, None] * np.linspace(1.1, 0.7, height)[:, None, None]
        pixels = np.clip(rng.uniform(60, 200, 3)[None, None, :] * ramp + rng.normal(0, 6, (height, width, 3)), 0, 255)
        path = folder / f"image_{index:03d}.png"
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(path, compress_level=1)
        paths.append(path)
    return paths


def time_variant(images: list[Path], batch_size: int, args: argparse.Namespace, work: Path,
                 label: str) -> tuple[float, dict[str, str]]:
    """Seconds of one generate_captions run on an empty store, and the captions it stored by image name."""
    from tuneline.stages.caption.stage import generate_captions
    from tuneline.stages.caption.florence import resolve_device_dtype
    from tuneline.stages.caption.config import CaptionConfig
    from tuneline.models.ref import resolve_model
    from tuneline.core.report import StageReport
    from tuneline.core.store import ItemStore

    config = CaptionConfig(batch_size=batch_size, num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    source = resolve_model(config.model)
    store = ItemStore(Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work)), "caption")
    items = [(path, f"{index:064x}") for index, path in enumerate(images)]
    started = time.perf_counter()
    generate_captions(config, source, device, dtype, items, store, StageReport("caption"))
    seconds = time.perf_counter() - started
    return seconds, {path.name: store.read_json(key)["caption"] for path, key in items}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="batched side's caption.batch_size (default 8)")
    parser.add_argument("--beams", type=int, default=1, help="caption.num_beams (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="caption.max_new_tokens (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side, best kept (default 2)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"bench {NAME}: {args.images} images, tiny RANDOM-weight Florence-2 (captions mean nothing), "
                  f"batch {args.batch_size} vs 1, beams {args.beams}, max_new_tokens {args.max_new_tokens}")
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        work = Path(tmp)
        images = make_images(work, args.images)
        time_variant(images[: args.batch_size], args.batch_size, args, work, "warmup")
        best = {1: float("inf"), args.batch_size: float("inf")}
        captions: dict[int, dict[str, str]] = {}
        for _ in range(max(1, args.repeats)):
            for batch_size in (1, args.batch_size):
                seconds, captions[batch_size] = time_variant(images, batch_size, args, work, f"b{batch_size}")
                best[batch_size] = min(best[batch_size], seconds)

    single_ips = args.images / best[1]
    batched_ips = args.images / best[args.batch_size]
    ratio = batched_ips / single_ips
    same = captions[1] == captions[args.batch_size]
    rows = [{"variant": "one image per call", "batch_size": 1, "seconds": round(best[1], 3),
             "images_per_s": round(single_ips, 2)},
            {"variant": "batched (stage path)", "batch_size": args.batch_size,
             "seconds": round(best[args.batch_size], 3), "images_per_s": round(batched_ips, 2)}]
    goals = [
        {"bench": NAME, "name": f"batched ({args.batch_size}) / one per call, images/s", "measured": round(ratio, 2),
         "display": f"{ratio:.2f}x", "goal": f"> {GOAL_RATIO:.1f}x", "passed": ratio > GOAL_RATIO, "kind": "goal"},
        {"bench": NAME, "name": "same captions batched and one per call", "measured": same,
         "display": "same" if same else "differ", "goal": "same", "passed": same, "kind": "check"},
    ]

    table = Table(title=f"caption: {args.images} images, best of {args.repeats}")
    for column in ("variant", "batch", "seconds", "images/s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], str(r["batch_size"]), f"{r['seconds']:.2f}", f"{r['images_per_s']:.1f}")
    console.print(table)
    for g in goals:
        verdict = ("OK" if g["passed"] else "FAIL") if g["kind"] == "check" else ("PASS" if g["passed"] else "MISS")
        console.print(f"{g['name']}: {g['display']} (goal {g['goal']}) {verdict}", markup=False)
    result = {"bench": NAME, "images": args.images, "rows": rows, "goals": goals}
    print(json.dumps(result, separators=(",", ":")))
    return result


def main() -> None:
    run()


if __name__ == "__main__":
    main()
