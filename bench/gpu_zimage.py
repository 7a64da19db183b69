"""Bench: Z-Image LoRA training at the published Z-Image-Turbo shape with RANDOM weights, on one GPU:
the frozen transformer in bf16 against model.quantize int8 / fp8 / nf4.

    python -m bench.gpu_zimage [--levels none,int8,fp8,nf4] [--steps 4] [--rounds 2]
    python -m bench.gpu_zimage --small        (the same code on the CPU with tiny-zimage's configs: CI)

Builds Z-Image-Turbo's transformer (6.15 B parameters; config from tests/data/published/z-image-turbo,
a copy of the published transformer/config.json) with RANDOM weights on the GPU (nothing is
downloaded; the Qwen3 text encoder and the VAE are never built: the trainer does not load them when
the text embeddings are cached), keeps its fp32 weights on the host, and gives each trainer its copy
through the production path (host -> frozen weights cast to bf16 -> model.quantize -> LoRA adapters
-> GPU). The images mean nothing: it measures memory and speed. For every level, at 1024x1024,
batch 1, LoRA rank 16 on attention, bf16 mixed precision, gradient checkpointing, AdamW, cached
caption embeddings of 128 tokens:

  memory   peak allocated (torch.cuda.max_memory_allocated) over two steps after a warm-up step,
           beside tuneline.train.memory's estimate (what `tuneline check` prints) and its error;
           the estimate's frozen-weight bytes against the real quantized tensors (exact)
  speed    steps/s of Trainer.train_step, levels in alternating rounds; each level's steps/s over
           bf16's (quantized weights are dequantized in every matmul: the price of the memory)

Goals (issue 25): int8 and fp8 peak <= 10 GiB (a 12 GB card), the estimate within 25 % of the
measured peak. --small runs every part on the CPU at 64x64 in fp32 (memory figures are then tensor
byte counts) and judges no goal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bench._common import bench_main, goal, make_trainer, print_goals, write_pack
from bench.gpu import TrainerLoop, free, measured_peak, random_state, random_weights_console, timed

NAME = "gpu_zimage"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
PUBLISHED = REPO / "tests" / "data" / "published" / "z-image-turbo"
SEED = 25
LEVELS = ("none", "int8", "fp8", "nf4")
GOAL_PEAK_GIB = 10.0  # int8 / fp8: a 12 GB card
GOAL_ESTIMATE_ERROR = 0.25
CAPTION_TOKENS = 128  # as the estimate assumes (models/zimage/adapter.py EXAMPLE_CAPTION_TOKENS)
LATENT_FACTOR = 8
# Z-Image's VAE (Flux's): what the latents stage records with every item.
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159


@dataclass
class Scale:
    small: bool
    device: str
    resolution: int
    mixed_precision: str
    items: int


def configs(small: bool) -> Path:
    """The folder whose transformer/config.json and scheduler config describe the model."""
    if small:
        from tuneline.models.ref import resolve_model

        return Path(resolve_model("tiny-zimage"))
    return PUBLISHED


def write_config_folder(folder: Path, source: Path) -> Path:
    """A ZImagePipeline folder of configs only (no weights): what the estimate and the adapter read."""
    shutil.rmtree(folder, ignore_errors=True)
    for name in ("transformer", "scheduler"):
        (folder / name).mkdir(parents=True)
        for file in (source / name).glob("*.json"):
            shutil.copy(file, folder / name / file.name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    (folder / "RANDOM_WEIGHTS.txt").write_text("configs of Z-Image-Turbo; the bench fills them with RANDOM weights\n")
    return folder


def random_transformer_state(folder: Path, device: str) -> tuple[dict[str, Any], int, float]:
    """(fp32 state dict on the host, parameter count, seconds): random init on `device`, copied out."""
    from diffusers import ZImageTransformer2DModel

    config = ZImageTransformer2DModel.load_config(folder, subfolder="transformer")
    return random_state(ZImageTransformer2DModel, config, device, SEED)


def make_adapter_class() -> type:
    from tuneline.models.zimage.adapter import ZImageAdapter

    class RandomWeightsAdapter(ZImageAdapter):
        """ZImageAdapter whose transformer weights come from the bench's host memory instead of files."""

        transformer_state: dict[str, Any] = {}

        def load(self, conditioning_cached: bool = False, empty_weights: bool = False) -> None:
            super().load(conditioning_cached, empty_weights=True)
            if not empty_weights:  # shared host tensors: setup_training casts copies, never these
                self.transformer.load_state_dict(self.transformer_state, assign=True, strict=True)

    return RandomWeightsAdapter


def write_latents(root: Path, scale: Scale, transformer: dict[str, Any]) -> Path:
    """data/latents as the latents stage writes it for Z-Image: `items` random latent distributions
    and cached caption embeddings ([tokens, cap_feat_dim], no pooled one)."""
    import torch
    from safetensors.torch import save

    from tuneline.core.manifest import write_jsonl

    folder = root / "data" / "latents"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "bench").mkdir(parents=True)
    side = scale.resolution // LATENT_FACTOR
    generator = torch.Generator().manual_seed(SEED)
    store = torch.bfloat16 if scale.device == "cuda" else torch.float32
    records, latents, texts = [], [], []
    for index in range(scale.items):
        name = f"img{index:04d}"
        mean = torch.randn(transformer["in_channels"], side, side, generator=generator)
        std = (0.1 * torch.rand(mean.shape, generator=generator)).to(store)
        latents.append((f"{name}.safetensors", save({"mean": mean.to(store), "std": std})))
        embeds = torch.randn(CAPTION_TOKENS, transformer["cap_feat_dim"], generator=generator).to(store)
        mask = torch.ones(CAPTION_TOKENS, dtype=torch.bool)
        texts.append((f"{name}.safetensors", save({"prompt_embeds": embeds, "attention_mask": mask})))
        records.append({"id": name, "dataset": "bench", "bucket": [scale.resolution] * 2,
                        "original_size": [scale.resolution] * 2, "crop_top_left": [0, 0],
                        "resized_size": [scale.resolution] * 2, "caption": f"random latents {index}",
                        "latents": f"{name}.safetensors", "text_embeddings": f"{name}.safetensors",
                        "latent_key": f"bench-zimage-{index}", "scaling_factor": SCALING_FACTOR,
                        "shift_factor": SHIFT_FACTOR, "has_flip": False})
    latent_refs = write_pack(folder, "bench/all.tar", latents)  # one pack, as the latents stage writes them
    text_refs = write_pack(folder, "bench/all.text.tar", texts)
    for record in records:
        record["latents"], record["text_embeddings"] = latent_refs[record["latents"]], text_refs[record["text_embeddings"]]
    write_jsonl(folder / "manifest.jsonl", records)
    return folder


def train_params(scale: Scale, base: Path, level: str) -> Any:
    from tuneline.config import validate_params

    return validate_params({
        "datasets": [{"name": "bench", "path": "data/raw/bench"}],
        "bucket": {"resolution": scale.resolution, "batch_size": 1},
        "model": {"base": str(base), "quantize": level},
        "latents": {"text_embeddings": True},
        "render": {"live_every": 0},
        "train": {"mode": "lora", "lora": {"rank": 16, "alpha": 16.0, "targets": "attention"}, "seed": SEED,
                  "mixed_precision": scale.mixed_precision, "optimizer": {"name": "adamw"}, "max_grad_norm": 1.0,
                  "gradient_checkpointing": True, "num_steps": 100_000, "checkpoint": {"every_steps": 100_000},
                  "log_every": 100_000},
    })


def level_phase(scale: Scale, adapter_class: type, base: Path, root: Path, work: Path, level: str) -> dict[str, Any]:
    """One level: a trainer, its measured peak against the estimate, its loss."""
    import torch

    from tuneline.stages.train.memory import estimate_training_memory
    from tuneline.train import memory

    params = train_params(scale, base, level)
    free(scale.device)
    baseline = torch.cuda.memory_allocated() if scale.device == "cuda" else 0
    started = time.perf_counter()
    trainer = make_trainer(adapter_class, params, root, work / f"run-{level}")
    setup_s = time.perf_counter() - started
    loop = TrainerLoop(trainer)
    loop.step()  # warm-up: the optimizer state exists from here on
    peak, how = measured_peak(trainer, loop, 2, scale.device)
    peak -= baseline
    estimate = estimate_training_memory(params, root, bucket=(scale.resolution,) * 2, batch_size=1)
    frozen, trained, _ = memory.weight_bytes([*trainer.modules.values(), *trainer.adapter.frozen_modules().values()])
    return {"level": level, "trainer": trainer, "loop": loop, "measured": peak, "how": how,
            "estimate": estimate.peak, "estimate_parts": estimate.to_json(),
            "frozen_real": frozen, "frozen_estimate": estimate.weights,
            "frozen_exact": frozen == estimate.weights and trained == estimate.trained,
            "error": (estimate.peak - peak) / peak, "setup_s": round(setup_s, 1)}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny-zimage configs on the CPU (CI)")
    parser.add_argument("--levels", default=",".join(LEVELS), help=f"model.quantize levels (default {','.join(LEVELS)})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per level per round (default 4; small 2)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2; small 1)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/gpu_zimage)")
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown or not levels:
        parser.error(f"--levels: {', '.join(unknown) or 'none given'}; choose from {', '.join(LEVELS)}")

    import torch

    if not args.small and not torch.cuda.is_available():
        message = "no CUDA GPU: python -m bench.gpu_zimage measures Z-Image at its published shape on one; --small runs it on the CPU"
        print(f"bench {NAME}: skipped: {message}", flush=True)
        return {"bench": NAME, "goals": [], "skipped": message}
    scale = (Scale(True, "cpu", 64, "no", 2) if args.small else Scale(False, "cuda", 1024, "bf16", 4))
    steps = args.steps or (2 if scale.small else 4)
    rounds = args.rounds or (1 if scale.small else 2)
    if scale.small:
        torch.set_num_threads(1)
    work = args.work.resolve() / ("small" if scale.small else "zimage")
    work.mkdir(parents=True, exist_ok=True)
    base = write_config_folder(work / "zimage-config", configs(scale.small))
    transformer_config = json.loads((base / "transformer" / "config.json").read_text())
    root = work / "project"
    write_latents(root, scale, transformer_config)
    device_name = torch.cuda.get_device_name() if scale.device == "cuda" else platform.processor() or "cpu"
    print(f"bench {NAME}: {'tiny-zimage configs on the CPU (--small)' if scale.small else 'Z-Image-Turbo configs'}, "
          f"RANDOM weights, {scale.resolution}x{scale.resolution}, batch 1, levels {', '.join(levels)}, {device_name}",
          flush=True)
    state, parameters, build_s = random_transformer_state(base, scale.device)
    adapter_class = make_adapter_class()
    adapter_class.transformer_state = state
    print(f"  transformer: {parameters:,} random parameters, built in {build_s:.1f} s", flush=True)

    # Memory one level at a time (nothing else on the device), then speed: alternating rounds over
    # the trainers kept alive (their sum fits an 80 GB card: 12 + 6 + 6 + 3.5 GiB of weights).
    from tuneline.train import memory

    rows, loops = [], {}
    for level in levels:
        try:
            row = level_phase(scale, adapter_class, base, root, work, level)
        except Exception as error:  # noqa: BLE001 - one failed level must not hide the others: a failed check
            rows.append({"level": level, "failure": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
            print(f"  {level}: {rows[-1]['failure']}", flush=True)
            free(scale.device)
            continue
        loops[level] = row.pop("loop")
        row.pop("trainer")
        rows.append(row)
        print(f"  {level}: peak {memory.format_bytes(row['measured'])} ({row['how']}), estimated "
              f"{memory.format_bytes(row['estimate'])} ({row['error']:+.0%}); set-up {row['setup_s']} s", flush=True)
    rates: dict[str, list[float]] = {level: [] for level in loops}
    for index in range(rounds):
        for level, loop in loops.items():
            rates[level].append(steps / timed(loop.step, steps, scale.device))
        print(f"  round {index + 1}: " + ", ".join(f"{k} {v[-1]:.3f} steps/s" for k, v in rates.items()), flush=True)
    for row in rows:
        if row["level"] in loops:
            row["steps_per_s"] = rates[row["level"]]
            row["median_steps_per_s"] = statistics.median(rates[row["level"]])
            row["loss"] = loops[row["level"]].last_loss()
    reference = next((r["median_steps_per_s"] for r in rows if r["level"] == "none" and "failure" not in r), None)
    for row in rows:
        if reference and "failure" not in row:
            row["vs_bf16"] = row["median_steps_per_s"] / reference
    del loops
    adapter_class.transformer_state = {}
    del state
    free(scale.device)
    output = {"bench": NAME, "small": scale.small,
              "machine": {"device": device_name, "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "cuda": torch.version.cuda},
              "settings": {"resolution": scale.resolution, "batch": 1, "mixed_precision": scale.mixed_precision,
                           "steps": steps, "rounds": rounds, "levels": levels,
                           "model": ("tiny-zimage configs" if scale.small else "Z-Image-Turbo configs") + " with RANDOM "
                           "weights; LoRA rank 16 (attention), AdamW, gradient checkpointing, cached text"},
              "transformer_parameters": parameters, "build_s": round(build_s, 1), "levels": rows}
    output["goals"] = goals_of(scale, rows)
    output["total_s"] = round(time.perf_counter() - wall, 1)
    print_report(output)
    (work / f"{NAME}.json").write_text(json.dumps(output, indent=2, default=str) + "\n")
    for folder in work.glob("run-*"):
        shutil.rmtree(folder, ignore_errors=True)
    return output


def goals_of(scale: Scale, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from tuneline.train import memory

    kind = "info" if scale.small else "goal"
    goals = []
    for row in rows:
        level = row["level"]
        if "failure" in row:
            goals.append(goal(NAME, f"{level}: trains", 0.0, row["failure"][:60], "no error", False, "check"))
            continue
        if level in ("int8", "fp8"):
            goals.append(goal(NAME, f"{level}: peak allocated", row["measured"], memory.format_bytes(row["measured"]),
                              f"<= {GOAL_PEAK_GIB:.0f} GiB", row["measured"] <= GOAL_PEAK_GIB * memory.GIB, kind))
        goals.append(goal(NAME, f"{level}: memory estimate error", row["error"], f"{row['error']:+.0%}",
                          f"within {GOAL_ESTIMATE_ERROR:.0%}", abs(row["error"]) <= GOAL_ESTIMATE_ERROR, kind))
        goals.append(goal(NAME, f"{level}: estimate's frozen + trained bytes = real", float(row["frozen_exact"]),
                          str(row["frozen_exact"]), "exact", row["frozen_exact"], "check"))
        finite = row["loss"] == row["loss"] and abs(row["loss"]) != float("inf")
        goals.append(goal(NAME, f"{level}: loss finite", float(finite), f"{row['loss']:.4f}", "finite", finite, "check"))
        if "vs_bf16" in row:
            goals.append(goal(NAME, f"{level}: steps/s / bf16's", row["vs_bf16"], f"{row['vs_bf16']:.2f}x",
                              "reported", True, "info"))
    return goals


def print_report(result: dict[str, Any]) -> None:
    from rich.table import Table

    from tuneline.train import memory

    console = random_weights_console(result)
    table = Table(title=f"{NAME}: model.quantize levels, batch 1, peak memory and steps/s")
    for column in ("model.quantize", "frozen weights", "measured peak", "estimated", "error", "steps/s (median)",
                   "vs bf16"):
        table.add_column(column, justify="left" if column == "model.quantize" else "right")
    for row in result["levels"]:
        if "failure" in row:
            table.add_row(row["level"], row["failure"][:80], "", "", "", "", "")
            continue
        table.add_row(row["level"], memory.format_bytes(sum(row["frozen_real"].values())),
                      memory.format_bytes(row["measured"]), memory.format_bytes(row["estimate"]), f"{row['error']:+.0%}",
                      f"{row.get('median_steps_per_s', 0):.3f}", f"{row.get('vs_bf16', 0):.2f}x")
    console.print(table)
    print_goals(result["goals"], console, f"{NAME}: goals" + (" (--small: tiny shapes, informative)"
                                                              if result["small"] else ""))
    console.print(f"total {result['total_s']:.0f} s (transformer build {result['build_s']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
