"""Bench: Trainer steps/s on Z-Image (flow matching) against a bare flow-matching loop on the same tiny DiT.

    python -m bench.zimage [--small] [--images 8] [--resolution 128] [--batch-size 4] [--steps 8] [--rounds 7]

Builds a small project once under bench/out/zimage (photo-like PNGs with sidecar captions, one
bucket), runs ingest -> bucket -> caption (sidecar_only) -> latents on the tiny RANDOM Z-Image
(not timed) and gives every caption its cached Z-Image text embedding ([tokens, hidden], no
pooled; written here with models.zimage_text when the latents stage did not cache them), then in
one process on the CPU, fp32:

  ours   Trainer with the real ZImageAdapter, default train settings (LoRA rank 16 on the
         transformer's attention projections, AdamW, constant lr, clip 1.0, no EMA, flow matching
         with logit-normal sigmas and the scheduler's shift). Timed: train_step(next_batches()) in
         a loop (not fit(); set-up not timed).
  bare   plain diffusers + PEFT + torch: ZImageTransformer2DModel.from_pretrained, the same seed and
         LoraConfig (so the same LoRA weights), torch.optim.AdamW with the same settings, one
         pre-made batch (latents, noise, sigmas, x_t, target, caption features; made once). Timed:
         forward (list of [C, 1, H, W] latents, time 1 - sigma) + negated output + MSE + backward +
         clip_grad_norm_ + step + zero_grad, nothing else.

Before any step, the adapter's loss and the bare loop's on that batch with the same noise and
sigmas are compared: the bare loop trains the same objective (a correctness check). Rounds
alternate ours and bare after warm-up steps; the goal is the median of the per-round ratios
(ours steps/s / bare steps/s) >= 0.90. --small (tiny shapes, 2 rounds) is the smoke test's
run and judges no goal.
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
from typing import Any, Sequence

import numpy as np

from bench._common import bench_main, ensure_project, goal, note_load, print_goals, rounds_table

NAME = "zimage"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
GENERATOR_VERSION = 1
SEED = 13
GOAL_RATIO = 0.90
LOSS_RTOL = 1e-5
DEFAULT = {"images": 8, "resolution": 128, "batch_size": 4, "warmup": 3, "steps": 8, "rounds": 7}
SMALL = {"images": 4, "resolution": 64, "batch_size": 2, "warmup": 1, "steps": 2, "rounds": 2}


def params_data(resolution: int, batch_size: int) -> dict[str, Any]:
    return {
        "store_dir": ".tuneline/store",
        "datasets": [{"name": "photos", "path": "data/raw/photos", "trigger_word": "zqx"}],
        "ingest": {"min_size": 64, "workers": 1},
        "bucket": {"resolution": resolution, "divisible_by": 32, "batch_size": batch_size, "workers": 1},
        "caption": {"mode": "sidecar_only"},
        "model": {"base": "tiny-zimage"},
        "latents": {"batch_size": batch_size, "dtype": "fp32", "device": "cpu", "flip": False,
                    "text_embeddings": True},
        "render": {"live_every": 0},
        "train": {"num_steps": 100_000, "checkpoint": {"every_steps": 100_000}},
    }


class BareLoop:
    """Plain diffusers + PEFT + torch on the same tiny DiT and one pre-made batch."""

    def __init__(self, root: Path, params: Any, batch: dict[str, Any], seed: int) -> None:
        import torch
        from diffusers import ZImageTransformer2DModel
        from peft import LoraConfig

        from tuneline.models.ref import resolve_model
        from tuneline.train.flow_matching import sample_sigmas

        train = params.train
        base = resolve_model(params.model.base, root)
        torch.manual_seed(seed)  # as Trainer.setup: the same LoRA initialisation
        self.transformer = ZImageTransformer2DModel.from_pretrained(base, subfolder="transformer")
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=train.lora.rank, lora_alpha=train.lora.alpha,
                                                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                                init_lora_weights="gaussian"))
        self.transformer.train()
        self.parameters = [p for p in self.transformer.parameters() if p.requires_grad]
        opt = train.optimizer
        self.optimizer = torch.optim.AdamW(self.parameters, lr=train.lr, betas=opt.betas, eps=opt.eps,
                                           weight_decay=opt.weight_decay)
        self.max_grad_norm = train.max_grad_norm
        scheduler_config = json.loads((Path(base) / "scheduler/scheduler_config.json").read_text())
        latents = batch["latents"]
        generator = torch.Generator().manual_seed(seed)  # the adapter's draws: noise, then sigmas
        noise = torch.randn(latents.shape, generator=generator)
        fm = train.flow_matching
        self.sigmas = sample_sigmas(len(latents), fm.timestep_sampling, generator, fm.logit_mean, fm.logit_std,
                                    fm.mode_scale, fm.shift, scheduler_config, tuple(latents.shape[-2:]))
        sigma = self.sigmas[:, None, None, None]
        self.inputs = list(((1 - sigma) * latents + sigma * noise).unsqueeze(2).unbind(0))
        self.time = 1 - self.sigmas
        self.target = noise - latents
        self.features = list(batch["prompt_embeds"])
        self.losses: list[Any] = []

    def loss(self) -> Any:
        import torch

        output = self.transformer(self.inputs, self.time, self.features, return_dict=False)[0]
        velocity = -torch.stack(output).squeeze(2)
        return ((velocity.float() - self.target) ** 2).mean()

    def step(self) -> None:
        import torch

        loss = self.loss()
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())


def timed_steps(step: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return time.perf_counter() - started


def run(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes and 2 rounds (what the test suite runs; says nothing about the goal)")
    for key in DEFAULT:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"(default {DEFAULT[key]}; --small {SMALL[key]})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loops (default 1; 0 keeps torch's default)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/zimage)")
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key) if getattr(args, key) is not None else (SMALL if args.small else DEFAULT)[key]
                for key in DEFAULT}
    if settings["images"] < settings["batch_size"]:
        parser.error("--images must be at least --batch-size (one full batch)")
    wall = time.perf_counter()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU bench: the trainer runs on CUDA whenever it sees one

    import random

    import torch

    from bench._common import make_trainer
    from tuneline.models.zimage.adapter import ZImageAdapter

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work.resolve() / ("small" if args.small else "default")
    root, params, build_s = ensure_project(work, params_data(settings["resolution"], settings["batch_size"]),
                                           settings["images"], SEED, GENERATOR_VERSION, "latents")
    trainer = make_trainer(ZImageAdapter, params, root, work / "run")
    if not trainer.data.text_cache or trainer.adapter.text_encoders:
        raise RuntimeError("the bench needs cached Z-Image text embeddings (no text encoder in the step)")
    probe = trainer.data.batch(trainer.sampler.batches(0)[0], torch.Generator().manual_seed(0), random.Random(0), "cpu")
    bare = BareLoop(root, params, probe, trainer.seed)
    with torch.no_grad():  # same weights, batch, noise and sigmas: the same loss
        ours_first = float(trainer.adapter.loss(trainer.modules, probe, torch.Generator().manual_seed(trainer.seed),
                                                0)[0])
        bare_first = float(bare.loss())
    loss_difference = abs(ours_first - bare_first) / max(abs(bare_first), 1e-12)
    shape = tuple(probe["latents"].shape)
    threads = torch.get_num_threads()
    print(f"bench {NAME}: tiny-zimage (RANDOM weights), {len(trainer.data.items)} items, latents {shape}, "
          f"caption tokens {[len(f) for f in probe['prompt_embeds']]}, torch threads {threads}", flush=True)

    ours_losses: list[float] = []

    def ours_step() -> None:
        ours_losses.append(trainer.train_step(trainer.next_batches(), sync=False).loss_value)

    for _ in range(settings["warmup"]):
        ours_step()
        bare.step()
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"ours": [], "bare": []}
    for index in range(settings["rounds"]):
        seconds["ours"].append(timed_steps(ours_step, settings["steps"]))
        seconds["bare"].append(timed_steps(bare.step, settings["steps"]))
        print(f"  round {index + 1}: " + ", ".join(f"{k} {settings['steps'] / v[-1]:.2f} steps/s"
                                                  for k, v in seconds.items()), flush=True)
    load_after = os.getloadavg()[0]
    rates = {k: [settings["steps"] / s for s in v] for k, v in seconds.items()}
    paired = [o / b for o, b in zip(rates["ours"], rates["bare"])]
    ratio = statistics.median(paired)
    ours_values = [float(x) for x in ours_losses]
    bare_values = [float(x) for x in bare.losses]
    finite = bool(np.isfinite(ours_values).all() and np.isfinite(bare_values).all())
    small = args.small
    goals = [
        goal(NAME, "trainer steps/s / bare flow-matching loop", ratio, f"{ratio:.2f}x", f">= {GOAL_RATIO:.2f}x",
             ratio >= GOAL_RATIO, kind="info" if small else "goal"),
        goal(NAME, "same loss before training (adapter, bare)", loss_difference, f"rel. diff {loss_difference:.1e}",
             f"<= {LOSS_RTOL:.0e}", loss_difference <= LOSS_RTOL, kind="check"),
        goal(NAME, "losses finite (ours, bare)", float(finite), f"{len(ours_values)} + {len(bare_values)} steps",
             "all finite", finite, kind="check"),
    ]
    result = {
        "bench": NAME,
        "small": small,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": threads,
                    "load_average": [round(load_before, 2), round(load_after, 2)]},
        "settings": {**settings, "latents_shape": list(shape),
                     "model": f"tiny-zimage (RANDOM weights), LoRA rank {params.train.lora.rank} "
                              f"({params.train.lora.targets}), AdamW, fp32, CPU, cached text embeddings",
                     "timed": "trainer.train_step(trainer.next_batches(), sync=False) in a loop, not fit(); "
                              "set-up excluded"},
        "rows": [
            {"variant": "ours: Trainer.train_step, ZImageAdapter", "steps_per_s": rates["ours"],
             "median": statistics.median(rates["ours"]), "vs_bare": ratio, "ratios": paired},
            {"variant": "bare: diffusers + PEFT + AdamW by hand", "steps_per_s": rates["bare"],
             "median": statistics.median(rates["bare"]), "vs_bare": 1.0, "ratios": [1.0] * len(paired)},
        ],
        "losses": {"ours_first": ours_first, "bare_first": bare_first, "ours_last": ours_values[-1],
                   "bare_last": bare_values[-1]},
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

    console = Console(highlight=False, width=max(120, Console().width))
    s, m = result["settings"], result["machine"]
    console.print(f"{s['images']} images, bucket {s['resolution']}, batch {s['batch_size']} (latents "
                  f"{tuple(s['latents_shape'])}), {s['model']}, torch {m['torch']} threads {m['torch_threads']}")
    console.print(f"timed: {s['timed']}; {s['warmup']} warm-up steps each, then {s['rounds']} rounds of "
                  f"{s['steps']} steps alternating ours / bare; goal: median of the per-round ratios")
    console.print(rounds_table(result["rows"], f"{NAME}: trainer vs bare flow-matching loop (steps/s per round)"))
    note_load(console, m)
    print_goals(result["goals"], console, f"{NAME}: goals")
    console.print(f"total {result['total_s']:.0f} s (project build {result['build_s']:.0f} s, not measured)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
