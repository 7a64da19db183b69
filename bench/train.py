"""Bench: Trainer steps/s against a bare PyTorch training loop on the same model, same run.

    python -m bench.train [--images 8] [--resolution 128] [--batch-size 4] [--steps 8] [--rounds 7] [--threads 1]

Builds a small project once under bench/out/train (photo-like PNGs with sidecar captions,
one bucket), runs ingest -> bucket -> caption (sidecar_only) -> latents on the tiny RANDOM
SDXL model (not timed), then in one process on the CPU, fp32:

  ours        Trainer with the real SDXLAdapter, default train settings (LoRA rank 16 on the
              UNet attention, AdamW, constant lr, clip 1.0, no EMA), checkpoint.every_steps
              far beyond the run. Timed: `trainer.train_step(trainer.next_batches())` in a
              loop (not fit(): no tqdm, checkpoint or signal bookkeeping; set-up not timed).
              This is the default data path: text embeddings cached by the latents stage.
  bare        a second SDXLAdapter.load() + setup_training() (same seed, so the same LoRA
              UNet), the same optimizer from build_optimizer, pre-made tensors of the same
              shapes (noisy latents, prompt embeds, pooled, time ids, noise, timesteps,
              made once); timed: forward + MSE + backward + clip_grad_norm_ + step +
              zero_grad, nothing else.
  ours, text  the same Trainer with the text-embedding cache switched off (as when the
              latents stage did not cache them or caption dropout/shuffle forbids it): the
              frozen text encoders run every step. Informative, not a goal.

Both sides run in one process with the same torch thread count: 1 by default (--threads),
because on a shared machine a descheduled OpenMP sibling thread stalls every one of the tiny
model's thousands of small ops, and 2-thread steps were seen to swing 30-fold (0.07 s to
3 s) with the load. After W warm-up steps each, rounds alternate ours, bare, ours-text so a
noisy neighbour hurts all alike; the goal is the median over rounds of (ours steps/s / bare
steps/s in that round). Validation's cost: one image of the project is held out
(datasets[].validation: 1) and validated every 10 steps, as the demo does; one Trainer.validate()
(the best of 3) against the 10 training steps between two validations is the share it adds to the
train stage (goal: at most 10%). Then one instrumented pass splits our step into data
(LatentData.batch), text conditioning, UNet forward, backward, clip, optimizer step and the
rest (wrappers on those calls and forward hooks on the UNet; removed afterwards).
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
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench._common import bench_main, ensure_project, goal, make_trainer, note_load, print_goals, rounds_table

NAME = "train"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
# Bump when the generated project changes: it is then rebuilt.
GENERATOR_VERSION = 1
SEED = 11
GOAL_RATIO = 0.90  # ours steps/s over bare-loop steps/s
VALIDATION_EVERY = 10  # train.validation.every_steps, as the demo sets it
GOAL_VALIDATION_COST = 0.10  # validation time / training time between two validations


# --- the project ----------------------------------------------------------------------------


def params_data(resolution: int, batch_size: int) -> dict[str, Any]:
    return {
        "store_dir": ".tuneline/store",
        # One image held out, validated every 10 steps: the demo's validation settings (params.yaml).
        "datasets": [{"name": "photos", "path": "data/raw/photos", "trigger_word": "zqx", "validation": 1}],
        "ingest": {"min_size": 64, "workers": 1},
        "bucket": {"resolution": resolution, "divisible_by": 32, "batch_size": batch_size, "workers": 1},
        "caption": {"mode": "sidecar_only"},
        "model": {"base": "tiny-sdxl"},
        "latents": {"batch_size": batch_size, "dtype": "fp32", "device": "cpu", "flip": False,
                    "text_embeddings": True},
        # Defaults otherwise; no checkpoint can fall inside the timed window.
        "train": {"num_steps": 100_000, "checkpoint": {"every_steps": 100_000},
                  "validation": {"every_steps": VALIDATION_EVERY}},
    }


# --- the two loops --------------------------------------------------------------------------


class BareLoop:
    """The same LoRA UNet and optimizer, fed pre-made tensors: the floor of one training step."""

    def __init__(self, root: Path, params: Any, batch: dict[str, Any], seed: int) -> None:
        import torch

        from tuneline.models.sdxl.adapter import SDXLAdapter
        from tuneline.train.optim import build_optimizer

        torch.manual_seed(seed)  # as Trainer.setup: the same LoRA initialisation
        self.adapter = SDXLAdapter(params.model, params.train, root)
        self.adapter.load()
        self.adapter.setup_training()
        modules = self.adapter.trained_modules()
        groups = self.adapter.param_groups(modules)
        self.unet = modules["unet"]
        self.unet.train()
        self.parameters = [p for group in groups for p in group["params"]]
        self.optimizer = build_optimizer(params.train.optimizer, groups)
        self.max_grad_norm = params.train.max_grad_norm
        generator = torch.Generator().manual_seed(seed)
        latents = batch["latents"]
        self.noise = torch.randn(latents.shape, generator=generator)
        self.timesteps = torch.randint(0, self.adapter.noise_scheduler.config.num_train_timesteps,
                                       (latents.shape[0],), generator=generator)
        self.noisy = self.adapter.noise_scheduler.add_noise(latents, self.noise, self.timesteps)
        self.prompt_embeds, self.pooled = batch["prompt_embeds"], batch["pooled"]
        self.time_ids = self.adapter.time_ids(batch, "cpu")
        self.losses: list[Any] = []

    def step(self, timer: Callable[[str], Any] | None = None) -> None:
        import torch
        import torch.nn.functional as F

        lap = timer or (lambda name: None)
        prediction = self.unet(self.noisy, self.timesteps, self.prompt_embeds,
                               added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids}).sample
        loss = F.mse_loss(prediction.float(), self.noise.float())
        lap("unet forward + loss")
        loss.backward()
        lap("backward")
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        lap("clip grad norm")
        self.optimizer.step()
        lap("optimizer step")
        self.optimizer.zero_grad(set_to_none=True)
        lap("zero_grad")
        self.losses.append(loss.detach())


def timed_steps(step: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return time.perf_counter() - started


# --- the split of our step --------------------------------------------------------------------


class Split:
    """Accumulates seconds per part of the trainer's step by wrapping its collaborators."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)
        return timed

    def ms_per_step(self) -> dict[str, float]:
        return {name: 1000 * s / max(1, self.steps) for name, s in self.seconds.items()}


def split_ours(trainer: Any, steps: int) -> dict[str, float]:
    """ms per step of each part of train_step, measured by instance-level wrappers (removed after)."""
    unet = trainer.modules["unet"]
    accelerator = trainer.accelerator
    optimizer = trainer.units[0].optimizer
    split = Split()
    marks: list[float] = []
    hooks = [unet.register_forward_pre_hook(lambda *a: marks.append(time.perf_counter())),
             unet.register_forward_hook(lambda *a: split.add("unet forward", time.perf_counter() - marks.pop()))]
    patched = [(trainer.data, "batch", "data (LatentData.batch)"),
               (trainer.adapter, "conditioning", "text encoders (frozen)"),
               (accelerator, "backward", "backward"),
               (accelerator, "clip_grad_norm_", "clip grad norm"),
               (optimizer, "step", "optimizer step"),
               (optimizer, "zero_grad", "zero_grad")]
    for owner, attribute, label in patched:
        setattr(owner, attribute, split.wrap(label, getattr(owner, attribute)))
    try:
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(trainer.next_batches())
        total = time.perf_counter() - started
    finally:
        for owner, attribute, _ in patched:
            delattr(owner, attribute)  # the class's method shows through again
        for hook in hooks:
            hook.remove()
    split.steps = steps
    parts = split.ms_per_step()
    parts["rest (noise, loss, finite check, syncs, schedule)"] = 1000 * total / steps - sum(parts.values())
    parts["total"] = 1000 * total / steps
    return parts


def split_bare(bare: BareLoop, steps: int) -> dict[str, float]:
    split = Split()
    started = time.perf_counter()
    for _ in range(steps):
        last = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            split.add(name, now - last[0])
            last[0] = now
        bare.step(lap)
    total = time.perf_counter() - started
    split.steps = steps
    parts = split.ms_per_step()
    parts["total"] = 1000 * total / steps
    return parts


# --- the run and its report ---------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images, all in one bucket (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="bucket side (default 128; tiny model, CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size of both loops (default 4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop per round (default 8)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median counts (default 7)")
    parser.add_argument("--split-steps", type=int, default=10, help="steps of the instrumented pass (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loops (default 1; 0 keeps torch's default). The tiny model's "
                        "ops are too small to split, and on a shared machine OpenMP barriers make multi-thread "
                        "timings swing many-fold whenever a sibling thread is descheduled")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/train)")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size (one full batch)")
    wall = time.perf_counter()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    root, params, build_s = ensure_project(work, params_data(args.resolution, args.batch_size), args.images, SEED,
                                           GENERATOR_VERSION, "latents")
    from tuneline.models.sdxl.adapter import SDXLAdapter

    trainer = make_trainer(SDXLAdapter, params, root, work / "run")
    if not trainer.data.text_cache:
        raise RuntimeError("the latents stage did not cache text embeddings; the bench needs them")
    # With cached embeddings the trainer loads no text encoder; the 'ours, text' variant runs them.
    trainer.adapter.ensure_text_encoders(str(trainer.accelerator.device))
    probe = trainer.data.batch(trainer.sampler.batches(0)[0], torch.Generator().manual_seed(0),
                               __import__("random").Random(0), "cpu")
    bare = BareLoop(root, params, probe, trainer.seed)
    shape = tuple(probe["latents"].shape)
    threads = torch.get_num_threads()
    print(f"bench {NAME}: {len(trainer.data.items)} items, bucket {trainer.data.items[0].bucket}, batch latents "
          f"{shape}, prompt embeds {tuple(probe['prompt_embeds'].shape)}, torch threads {threads}", flush=True)

    ours_losses: list[float] = []

    def ours_step() -> None:
        ours_losses.append(trainer.train_step(trainer.next_batches()).loss)

    def with_text_cache(enabled: bool) -> None:
        # Bench-only switch: a manifest without text embeddings takes exactly this path.
        trainer.data.text_cache = enabled

    for _ in range(args.warmup):  # oneDNN builds its kernels per shape: before any timing
        with_text_cache(False)
        ours_step()
        with_text_cache(True)
        ours_step()
        bare.step()

    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"ours": [], "bare": [], "ours_text": []}
    for index in range(args.rounds):
        with_text_cache(True)
        seconds["ours"].append(timed_steps(ours_step, args.steps))
        seconds["bare"].append(timed_steps(bare.step, args.steps))
        with_text_cache(False)
        seconds["ours_text"].append(timed_steps(ours_step, args.steps))
        print(f"  round {index + 1}: " + ", ".join(f"{k} {args.steps / v[-1]:.2f} steps/s" for k, v in seconds.items()),
              flush=True)
    load_after = os.getloadavg()[0]

    # Validation's share of the train stage's time: one validate() (every held-out item at every level,
    # the best of 3) against the VALIDATION_EVERY training steps between two validations.
    validate_s = min(timed_steps(trainer.validate, 1) for _ in range(3))
    with_text_cache(True)
    split_cached = split_ours(trainer, args.split_steps)
    with_text_cache(False)
    split_text = split_ours(trainer, args.split_steps)
    with_text_cache(True)
    split_plain = split_bare(bare, args.split_steps)

    rates = {k: [args.steps / s for s in v] for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    # Paired per round: a busy neighbour slows the loops of one round alike, so the ratio is steadier
    # than the ratio of the medians.
    paired = {k: [o / b for o, b in zip(rates[k], rates["bare"])] for k in ("ours", "ours_text")}
    ratio = statistics.median(paired["ours"])
    ratio_text = statistics.median(paired["ours_text"])
    validation_cost = validate_s * median["ours"] / VALIDATION_EVERY
    bare_losses = [float(x) for x in bare.losses]
    finite = all(np.isfinite(ours_losses)) and all(np.isfinite(bare_losses))
    goals = [
        goal(NAME, "trainer steps/s / bare loop", ratio, f"{ratio:.2f}x", f">= {GOAL_RATIO:.2f}x", ratio >= GOAL_RATIO),
        goal(NAME, f"validation time / training time (every {VALIDATION_EVERY} steps)", validation_cost,
             f"{validation_cost:.1%}", f"<= {GOAL_VALIDATION_COST:.0%}", validation_cost <= GOAL_VALIDATION_COST),
        goal(NAME, "losses finite (ours, bare)", float(finite), f"{len(ours_losses)} + {len(bare_losses)} steps",
             "all finite", finite and ours_losses and bare_losses, kind="check"),
    ]
    rows = [
        {"variant": "ours: Trainer.train_step, cached text embeddings", "steps_per_s": rates["ours"],
         "median": median["ours"], "vs_bare": ratio, "ratios": paired["ours"]},
        {"variant": "bare: forward + MSE + backward + clip + step", "steps_per_s": rates["bare"],
         "median": median["bare"], "vs_bare": 1.0, "ratios": [1.0] * len(rates["bare"])},
        {"variant": "ours, text encoders every step (no cache)", "steps_per_s": rates["ours_text"],
         "median": median["ours_text"], "vs_bare": ratio_text, "ratios": paired["ours_text"]},
    ]
    result = {
        "bench": NAME,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": threads,
                    "load_average": [round(load_before, 2), round(load_after, 2)]},
        "settings": {"images": len(trainer.data.items), "resolution": args.resolution, "batch_size": args.batch_size,
                     "latents_shape": list(shape), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                     "model": "tiny-sdxl (RANDOM weights), LoRA rank "
                              f"{params.train.lora.rank} ({params.train.lora.targets}), "
                              f"{params.train.optimizer.name}, fp32, CPU",
                     "timed": "trainer.train_step(trainer.next_batches()) in a loop, not fit(); set-up excluded"},
        "rows": rows,
        "validation": {"every_steps": VALIDATION_EVERY, "items": len(trainer.data.validation),
                       "levels": len(params.train.validation.levels()), "validate_s": validate_s,
                       "cost": validation_cost},
        "split_ms_per_step": {"ours (cached text)": split_cached, "ours (text encoders)": split_text,
                              "bare": split_plain},
        "losses": {"ours_last": ours_losses[-1], "bare_last": bare_losses[-1]},
        "goals": goals,
        "build_s": round(build_s, 1), "total_s": round(time.perf_counter() - wall, 1),
    }
    print_report(result)
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work / "run", ignore_errors=True)
    return result


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(120, Console().width))
    s, m = result["settings"], result["machine"]
    console.print(f"{s['images']} images, bucket {s['resolution']}, batch {s['batch_size']} (latents "
                  f"{tuple(s['latents_shape'])}), {s['model']}, torch {m['torch']} threads {m['torch_threads']}")
    console.print(f"timed: {s['timed']}; {s['warmup']} warm-up steps each, then {s['rounds']} rounds of "
                  f"{s['steps']} steps alternating ours / bare / ours-text; goal: median of the per-round ratios")
    console.print(rounds_table(result["rows"], f"{NAME}: trainer vs bare loop (steps/s per round; vs bare: median of "
                               "the per-round ratios)", 1))
    splits = result["split_ms_per_step"]
    parts = list(dict.fromkeys(p for split in splits.values() for p in split if p != "total")) + ["total"]
    table = Table(title="where a step goes: ms per step, one instrumented pass (informative)")
    table.add_column("part", justify="left")
    for name in splits:
        table.add_column(name, justify="right")
    for part in parts:
        table.add_row(part, *(f"{split[part]:.1f}" if part in split else "-" for split in splits.values()))
    console.print(table)
    console.print("bare: 'unet forward + loss' includes the MSE; ours: 'rest' is train_step minus the timed parts")
    note_load(console, m)
    print_goals(result["goals"], console, f"{NAME}: goals")
    console.print(f"total {result['total_s']:.0f} s (project build {result['build_s']:.0f} s, not measured)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
