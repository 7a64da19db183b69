"""Bench: the autoencoder stage's Trainer against a bare two-optimizer PyTorch loop, same run.

    python -m bench.autoencoder [--kind kl|vq] [--images 10] [--crop 64] [--batch-size 4] [--steps 2]
                                [--rounds 21] [--channels 16] [--device cpu|cuda] [--threads 1] [--strict]
    python -m bench.autoencoder --small      (tiny shapes, 2 rounds: what the test suite runs)

Builds a small project once under bench/out/autoencoder (photo-like PNGs, two data sets, one
128 px bucket), runs ingest -> bucket (not timed), then in one process, fp32:

  ours   tuneline.train.trainer.Trainer with the AutoencoderAdapter and ImageData, exactly as
         the autoencoder stage builds it: mode decoder (encoder frozen), L1 reconstruction, no
         LPIPS, the discriminator from step 0 (start 0, every 1: both units step every step, so
         every timed step runs the whole two-unit path), hinge loss, disc weight 0.5 times the
         adaptive weight, clipping 1.0 on both units, AdamW on both (the discriminator with
         betas 0.5/0.9, no decay), constant LR, no EMA (the stage's default), checkpoints far
         beyond the run. Timed: `trainer.train_step(trainer.next_batches(), sync=False)` in a
         loop, as fit() calls it (no tqdm, checkpoint or signal bookkeeping; set-up not timed).
  bare   a hand-written loop on the same AutoencoderKL (a copy of the trainer's weights at step
         0) and a PatchGAN with the same weights; two torch.optim.AdamW with the same settings,
         two LambdaLR at a constant factor; the same batches (the same ImageData.batch calls on
         the same sampler order, crops and posterior samples from generators seeded as the
         trainer's); per step: encode (no grad), sample, decode, L1, KL (the adapter computes it
         for its log in decoder mode too), GAN loss, the adaptive weight (two autograd.grad at
         the decoder's conv_out), the discriminator's hinge loss, backward of each loss into its
         own parameters, clip + step + schedule + zero_grad of each optimizer. No accelerate.

Both sides start from the same weights and random streams and do the same arithmetic, so their
losses agree step by step: a correctness check that the two loops do the same work. After W
warm-up steps each, rounds alternate ours / bare (a noisy neighbour slows both alike); the goal
is the median over rounds of (ours steps/s / bare steps/s in that round). On CUDA each round
ends with a synchronize (and our NaN check, one host read), both sides alike.

The model is the pipeline's own tiny RANDOM VAE (tiny-sdxl's vae/: 4 blocks, channels 8-32,
x8) at 64 px crops, batch 4, with a 3-layer PatchGAN of 16 channels: about 0.2 s a step on one
CPU thread, long enough that the bench measures the loop, not Python noise. The stage's default
PatchGAN (64 channels) at its default 256 px crops takes about 7 s a step here.

`--kind vq` benches autoencoder.kind: vq the same way: ours is the Trainer with the VQAdapter (a
RANDOM VQModel with tiny-sdxl's VAE shapes, mode full, a codebook of 256 codes updated by EMA,
dead codes under an EMA cluster size of 0.1 restarted); bare is a hand-written loop on a copy of
the same VQModel: encode, nearest codes (cdist), commitment, straight-through, decode, L1, GAN loss,
the adaptive weight, the discriminator's hinge loss, the two AdamW; then the codebook's EMA update
(one-hot counts and sums, decay, Laplace smoothing), the dead-code restarts from the same generator
and the logged perplexity and usage, all written out in the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench._common import bench_main, ensure_project, goal, note_load, print_goals

NAME = "autoencoder"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "bench" / "out" / NAME
# Bump when the generated project changes: it is then rebuilt.
GENERATOR_VERSION = 1
SEED = 16
GOAL_RATIO = 0.90  # ours steps/s over bare-loop steps/s
LOSS_RTOL = 1e-4  # ours and bare losses agree step by step (same weights, data, streams, arithmetic)

VQ_SETTINGS = {"codebook_size": 256, "dead_code_threshold": 0.1, "usage_window": 100}  # --kind vq
SMALL = {"images": 6, "resolution": 64, "crop": 32, "batch_size": 2, "channels": 8, "layers": 2,
         "warmup": 1, "steps": 2, "rounds": 2, "split_steps": 2}
DEFAULT = {"images": 10, "resolution": 128, "crop": 64, "batch_size": 4, "channels": 16, "layers": 3,
           "warmup": 2, "steps": 2, "rounds": 21, "split_steps": 8}


# --- the project ----------------------------------------------------------------------------


def params_data(resolution: int, crop: int, batch_size: int, channels: int, layers: int,
                kind: str = "kl") -> dict[str, Any]:
    kind_settings = {"kind": "vq", "mode": "full", "vq": VQ_SETTINGS} if kind == "vq" else {}
    return {
        "store_dir": ".tuneline/store",
        "datasets": [{"name": "alpha", "path": "data/raw/alpha"}, {"name": "beta", "path": "data/raw/beta"}],
        "ingest": {"min_size": 32, "workers": 1},
        "bucket": {"resolution": resolution, "divisible_by": 32, "batch_size": batch_size, "workers": 1},
        "model": {"base": "tiny-sdxl"},
        # The stage's defaults otherwise (decoder mode, L1, no LPIPS, AdamW, constant lr, clip 1.0, no EMA);
        # the discriminator from step 0, every step; no checkpoint can fall inside the timed window.
        "autoencoder": {"enabled": True, "crop_size": crop, "batch_size": batch_size, "seed": SEED,
                        "num_steps": 100_000, "checkpoint": {"every_steps": 100_000},
                        "discriminator": {"start": 0, "every": 1, "channels": channels, "layers": layers},
                        **kind_settings},
    }


def make_ae_trainer(params: Any, root: Path, run_dir: Path) -> Any:
    """The Trainer the autoencoder stage builds (adapter, ImageData, the `autoencoder` section), set up."""
    from accelerate.state import AcceleratorState

    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.autoencoder.stage import build_trainer

    AcceleratorState._reset_state(True)
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = build_trainer(params, root, ImageData(params, root / "data/bucketed"), run_dir / "checkpoints")
    trainer.setup()
    return trainer


# --- the bare loop --------------------------------------------------------------------------


class BareLoop:
    """Two AdamW optimizers on the same AutoencoderKL (or VQModel) and PatchGAN, written out by hand."""

    def __init__(self, trainer: Any, params: Any, root: Path, device: str) -> None:
        import torch
        from diffusers import AutoencoderKL, VQModel

        from tuneline.models.autoencoder.adapter import patch_discriminator
        from tuneline.models.loading import vae_source
        from tuneline.stages.autoencoder.data import ImageData

        config = params.autoencoder
        disc = config.discriminator
        self.kind = config.kind
        mode = "full" if self.kind == "vq" else "decoder"
        if config.mode != mode or config.perceptual != "none" or config.reconstruction != "l1" \
                or config.ema.enabled or disc.loss != "hinge" or config.gradient_accumulation != 1:
            raise ValueError(f"the bare loop is written for {mode} mode, L1, no LPIPS, no EMA, hinge, no accumulation")
        for schedule in (config.schedule, disc.schedule):
            if schedule.name != "constant" or schedule.warmup_steps:
                raise ValueError("the bare loop is written for a constant LR schedule without warmup")
        self.device = torch.device(device)
        trained = trainer.accelerator.unwrap_model(trainer.modules["vae"])
        if self.kind == "vq":
            self.vae = VQModel(**{k: v for k, v in trained.config.items() if not k.startswith("_")})
        else:
            source = vae_source(params.model, root)
            self.vae = AutoencoderKL.from_pretrained(source.location, **source.load_kwargs())
        self.discriminator = patch_discriminator(disc.layers, disc.channels)
        # The trainer's weights at step 0 (its seeded initialisation of the discriminator included).
        self.vae.load_state_dict(trained.state_dict())
        self.discriminator.load_state_dict(
            trainer.accelerator.unwrap_model(trainer.modules["discriminator"]).state_dict())
        self.vae.to(self.device).requires_grad_(True)
        if self.kind == "vq":
            self.vae.quantize.requires_grad_(False)  # the codebook follows its EMA below
            self.vq = config.vq
            codebook = self.vae.quantize.embedding.weight
            self.cluster_size = torch.zeros(codebook.shape[0], device=self.device)
            self.embed_avg = codebook.detach().clone()
            self.last_used = torch.zeros(codebook.shape[0], dtype=torch.int64, device=self.device)
            self.steps_done = 0
        else:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.vae.train()
        self.discriminator.to(self.device).train()
        self.ae_params = [p for p in self.vae.parameters() if p.requires_grad]
        self.disc_params = list(self.discriminator.parameters())
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt_ae = torch.optim.AdamW(self.ae_params, lr=config.lr, betas=tuple(config.optimizer.betas),
                                        eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay, **fused)
        self.opt_disc = torch.optim.AdamW(self.disc_params, lr=disc.lr, betas=tuple(disc.optimizer.betas),
                                          eps=disc.optimizer.eps, weight_decay=disc.optimizer.weight_decay, **fused)
        self.sched_ae = torch.optim.lr_scheduler.LambdaLR(self.opt_ae, lambda step: 1.0)
        self.sched_disc = torch.optim.lr_scheduler.LambdaLR(self.opt_disc, lambda step: 1.0)
        self.clip_ae, self.clip_disc = config.max_grad_norm, disc.max_grad_norm
        self.disc_weight = disc.weight
        # The same data: ImageData.batch over the trainer's sampler order, streams seeded as the trainer's.
        self.data = ImageData(params, root / "data/bucketed")
        self.sampler = trainer.sampler
        self.epoch, self.position = 0, 0
        self.generator = torch.Generator(device=self.device).manual_seed(trainer.seed * 1000)
        self.python_rng = random.Random(f"{trainer.seed}:0")
        self.losses: list[tuple[Any, Any]] = []

    def next_indices(self) -> list[int]:
        batches = self.sampler.batches(self.epoch)
        indices = batches[self.position]
        self.position += 1
        if self.position == len(batches):
            self.epoch, self.position = self.epoch + 1, 0
        return indices

    def step(self, lap: Callable[[str], Any] | None = None) -> None:
        import torch
        import torch.nn.functional as F

        lap = lap or (lambda name: None)
        vae, disc = self.vae, self.discriminator
        x = self.data.batch(self.next_indices(), self.generator, self.python_rng, self.device)["pixels"]
        lap("data (ImageData.batch)")
        if self.kind == "vq":
            reconstruction, regularizer = self.vq_forward(x)
            rec = (reconstruction - x).abs().mean()
            rec_loss = rec + regularizer
        else:
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=self.generator)
            reconstruction = vae.decode(z).sample
            rec = (reconstruction - x).abs().mean()
            posterior.kl().mean()  # the adapter computes it (for its log) in decoder mode too
            rec_loss = rec
        gan = -disc(reconstruction).mean()
        last_layer = vae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
        weight = torch.clamp(torch.norm(rec_grad) / (torch.norm(gan_grad) + 1e-4), 0.0, 1e4).detach()
        ae_loss = rec_loss + weight * self.disc_weight * gan
        logits_real = disc(x)
        logits_fake = disc(reconstruction.detach())
        disc_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        lap("forward + losses + adaptive weight")
        ae_loss.backward(inputs=self.ae_params)
        disc_loss.backward(inputs=self.disc_params)
        lap("backward")
        for parameters, clip, optimizer, scheduler in (
                (self.ae_params, self.clip_ae, self.opt_ae, self.sched_ae),
                (self.disc_params, self.clip_disc, self.opt_disc, self.sched_disc)):
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            lap("clip grad norm")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            lap("optimizer step + schedule + zero_grad")
        self.losses.append((ae_loss.detach(), disc_loss.detach()))

    def vq_forward(self, x: Any) -> tuple[Any, Any]:
        """(reconstruction, beta * commitment) of a VQ step, the codebook's EMA update and restarts done."""
        import torch
        import torch.nn.functional as F

        vae, vq = self.vae, self.vq
        z_e = vae.encode(x).latents
        codebook = vae.quantize.embedding.weight
        z = z_e.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, codebook.shape[1])
        indices = torch.argmin(torch.cdist(flat, codebook), dim=1)
        z_q = codebook[indices].view(z.shape).permute(0, 3, 1, 2).contiguous()
        commitment = torch.mean((z_e - z_q.detach()) ** 2)
        self.steps_done += 1
        with torch.no_grad():
            onehot = F.one_hot(indices, codebook.shape[0]).float()
            counts, sums = onehot.sum(0), onehot.t() @ flat.detach()
            self.cluster_size.mul_(vq.decay).add_(counts, alpha=1 - vq.decay)
            self.embed_avg.mul_(vq.decay).add_(sums, alpha=1 - vq.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + vq.epsilon) / (n + codebook.shape[0] * vq.epsilon) * n
            codebook.copy_(self.embed_avg / smoothed.unsqueeze(1))
            self.last_used[counts > 0] = self.steps_done
            dead = self.cluster_size < vq.dead_code_threshold
            picks = flat.detach()[torch.randint(0, flat.shape[0], (codebook.shape[0],), generator=self.generator,
                                                device=self.generator.device)]
            codebook[dead] = picks[dead]
            self.embed_avg[dead] = picks[dead] * vq.dead_code_threshold
            self.cluster_size[dead] = vq.dead_code_threshold
            # What the adapter logs: perplexity, usage in the window, codes restarted.
            p = counts / counts.sum()
            torch.exp(-torch.sum(p * torch.log(p + 1e-10)))
            ((self.last_used > 0) & (self.last_used > self.steps_done - vq.usage_window)).float().mean()
            dead.sum()
        straight_through = z_e + (z_q - z_e).detach()
        return vae.decode(straight_through, force_not_quantize=True).sample, vq.beta * commitment


# --- timing -----------------------------------------------------------------------------------


def timed_steps(step: Callable[[], Any], count: int, finish: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of `count` steps (CPU time does not count the time the
    process waited for a core, so it shows the work done whatever the neighbours did)."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    finish()
    return time.perf_counter() - started, time.process_time() - cpu


class Split:
    """Seconds per part of a step, from wrappers on the trainer's collaborators."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

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


def split_ours(trainer: Any, steps: int, finish: Callable[[], Any]) -> dict[str, float]:
    """ms per step of each part of train_step (instance-level wrappers, removed afterwards). On CUDA the
    parts are launch times, not GPU times: only the total is synchronized."""
    split = Split()
    patched = [(trainer.data, "batch", "data (ImageData.batch)"),
               (trainer.adapter, "unit_losses", "forward + losses + adaptive weight"),
               (trainer.accelerator, "backward", "backward"),
               (trainer.accelerator, "clip_grad_norm_", "clip grad norm")]
    patched += [(unit.optimizer, "step", "optimizer step + schedule + zero_grad") for unit in trainer.units]
    patched += [(unit.scheduler, "step", "optimizer step + schedule + zero_grad") for unit in trainer.units]
    patched += [(unit.optimizer, "zero_grad", "optimizer step + schedule + zero_grad") for unit in trainer.units]
    for owner, attribute, label in patched:
        setattr(owner, attribute, split.wrap(label, getattr(owner, attribute)))
    try:
        total, _ = timed_steps(lambda: trainer.train_step(trainer.next_batches(), sync=False), steps, finish)
    finally:
        for owner, attribute, _ in patched:
            delattr(owner, attribute)  # the class's method shows through again
    parts = {name: 1000 * s / steps for name, s in split.seconds.items()}
    parts["rest (NaN guard, unit bookkeeping, lrs)"] = 1000 * total / steps - sum(parts.values())
    parts["total"] = 1000 * total / steps
    return parts


def split_bare(bare: BareLoop, steps: int, finish: Callable[[], Any]) -> dict[str, float]:
    split = Split()
    started = time.perf_counter()
    for _ in range(steps):
        last = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            split.add(name, now - last[0])
            last[0] = now
        bare.step(lap)
    finish()
    total = time.perf_counter() - started
    parts = {name: 1000 * s / steps for name, s in split.seconds.items()}
    parts["total"] = 1000 * total / steps
    return parts


# --- the run ----------------------------------------------------------------------------------


def run(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.autoencoder", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("kl", "vq"), default="kl",
                        help="autoencoder.kind benched (default kl: the KL VAE in decoder mode; vq: a VQModel, full)")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes and 2 rounds (what the test suite runs; says nothing about the goal)")
    for key, text in (("images", "generated images (half per data set; one per data set is held out)"),
                      ("resolution", "bucket resolution"), ("crop", "crop side (autoencoder.crop_size)"),
                      ("batch_size", "crops per batch"), ("channels", "PatchGAN channels"),
                      ("layers", "PatchGAN layers"), ("warmup", "untimed steps per loop first"),
                      ("steps", "timed steps per loop per round"), ("rounds", "alternating rounds; the median counts"),
                      ("split_steps", "steps of the instrumented pass")):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"{text} (default {DEFAULT[key]}; --small {SMALL[key]})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both loops run (default cpu; cuda: the first GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loops (default 1; 0 keeps torch's default): on a shared "
                        "machine a descheduled OpenMP sibling thread stalls every small op")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the ratio misses the goal")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default bench/out/autoencoder)")
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key) if getattr(args, key) is not None else (SMALL if args.small else DEFAULT)[key]
                for key in DEFAULT}
    if settings["images"] - 2 < settings["batch_size"]:  # one image of each data set is held out
        parser.error("--images must leave a full batch after the two held-out images")
    wall = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer runs on CUDA whenever it sees one
    if args.threads:
        torch.set_num_threads(args.threads)
    # One project per kind (the params differ, so a shared one would be rebuilt at every switch).
    work = args.work.resolve() / (("small" if args.small else "default") + ("" if args.kind == "kl" else f"-{args.kind}"))
    data = params_data(settings["resolution"], settings["crop"], settings["batch_size"], settings["channels"],
                       settings["layers"], args.kind)
    root, params, build_s = ensure_project(work, data, settings["images"], SEED, GENERATOR_VERSION, "bucket")

    trainer = make_ae_trainer(params, root, work / "run")
    device = str(trainer.accelerator.device)
    if torch.device(device).type != args.device:
        raise RuntimeError(f"the trainer runs on {device}, not {args.device}")
    bare = BareLoop(trainer, params, root, device)
    cuda = args.device == "cuda"

    def finish() -> None:
        if cuda:
            torch.cuda.synchronize()

    ours_results: list[Any] = []

    def ours_step() -> None:
        ours_results.append(trainer.train_step(trainer.next_batches(), sync=False))

    def ours_finish() -> None:
        finish()
        trainer.check_finite()  # fit() reads it on logging steps; here once a round

    vae = bare.vae
    shape = (settings["batch_size"], 3, trainer.data.crop, trainer.data.crop)
    threads = torch.get_num_threads()
    print(f"bench {NAME}: {len(trainer.data.items)} training items ({len(trainer.data.holdout)} held out), bucket "
          f"{trainer.data.items[0].bucket}, batch {shape}, device {device}, torch threads {threads}; "
          + ("the tiny RANDOM VAE of tiny-sdxl" if args.kind == "kl" else
             "a RANDOM VQModel with the shapes of tiny-sdxl's VAE (autoencoder.kind: vq)"), flush=True)

    for _ in range(settings["warmup"]):  # oneDNN builds its kernels per shape: before any timing
        ours_step()
        bare.step()
    ours_finish()
    finish()

    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu_seconds: dict[str, list[float]] = {"ours": [], "bare": []}
    for index in range(settings["rounds"]):
        first, second = ("ours", "bare") if index % 2 == 0 else ("bare", "ours")  # neither always goes first
        for side in (first, second):
            if side == "ours":
                wall_s, cpu_s = timed_steps(ours_step, settings["steps"], ours_finish)
            else:
                wall_s, cpu_s = timed_steps(bare.step, settings["steps"], finish)
            seconds[side].append(wall_s)
            cpu_seconds[side].append(cpu_s)
        print(f"  round {index + 1}: " + ", ".join(f"{k} {settings['steps'] / v[-1]:.2f} steps/s"
                                                   for k, v in seconds.items()), flush=True)
    load_after = os.getloadavg()[0]

    # The split alternates too, one step of each at a time: mean ms per part over the steps.
    passes: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
    for _ in range(settings["split_steps"]):
        passes["ours"].append(split_ours(trainer, 1, ours_finish))
        passes["bare"].append(split_bare(bare, 1, finish))
    split_trainer, split_plain = ({part: statistics.fmean(p[part] for p in passes[side]) for part in passes[side][0]}
                                  for side in ("ours", "bare"))

    rates = {k: [settings["steps"] / s for s in v] for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    # Paired per round: a busy neighbour slows the loops of one round alike.
    paired = [o / b for o, b in zip(rates["ours"], rates["bare"])]
    ratio = statistics.median(paired)
    # Informative: the same ratio in process CPU time (the work each loop did, waiting for a core excluded).
    cpu_paired = [b / o for o, b in zip(cpu_seconds["ours"], cpu_seconds["bare"])]
    cpu_ratio = statistics.median(cpu_paired)

    # The same work: step k of ours and step k of bare (same weights, data, streams) give the same losses.
    ours_losses = [(float(r.units["autoencoder"].loss_value), float(r.units["discriminator"].loss_value))
                   for r in ours_results]
    bare_losses = [(float(a), float(d)) for a, d in bare.losses]
    compared = min(len(ours_losses), len(bare_losses))
    differences = [abs(o - b) / max(abs(b), 1e-12) for step in range(compared)
                   for o, b in zip(ours_losses[step], bare_losses[step])]
    first_difference = max(differences[:2])
    max_difference = max(differences)
    finite = all(np.isfinite(ours_losses).ravel()) and all(np.isfinite(bare_losses).ravel())
    small = args.small
    goals = [
        goal(NAME, "trainer steps/s / bare 2-optimizer loop", ratio, f"{ratio:.2f}x", f">= {GOAL_RATIO:.2f}x",
             ratio >= GOAL_RATIO, kind="info" if small else "goal"),
        goal(NAME, "CPU time per step: bare / trainer (informative)", cpu_ratio, f"{cpu_ratio:.2f}x", "-",
             True, kind="info"),
        goal(NAME, "same losses at step 1 (autoencoder, discriminator)", first_difference,
             f"rel. diff {first_difference:.1e}", f"<= {LOSS_RTOL:.0e}", first_difference <= LOSS_RTOL, kind="check"),
        goal(NAME, "losses finite (ours, bare)", float(finite), f"{len(ours_losses)} + {len(bare_losses)} steps",
             "all finite", finite, kind="check"),
    ]
    if args.strict and not small:
        goals.append(goal(NAME, "--strict: the ratio meets the goal", ratio, f"{ratio:.2f}x", f">= {GOAL_RATIO:.2f}x",
                          ratio >= GOAL_RATIO, kind="check"))
    trained = sum(p.numel() for p in bare.ae_params)
    cpu_ms = {k: [1000 * s / settings["steps"] for s in v] for k, v in cpu_seconds.items()}
    rows = [
        {"variant": f"ours: Trainer, {type(trainer.adapter).__name__}", "steps_per_s": rates["ours"],
         "median": median["ours"], "vs_bare": ratio, "ratios": paired,
         "cpu_ms_per_step": cpu_ms["ours"], "cpu_vs_bare": cpu_ratio},
        {"variant": "bare: 2 x AdamW, by hand", "steps_per_s": rates["bare"],
         "median": median["bare"], "vs_bare": 1.0, "ratios": [1.0] * len(rates["bare"]),
         "cpu_ms_per_step": cpu_ms["bare"], "cpu_vs_bare": 1.0},
    ]
    result = {
        "bench": NAME,
        "small": small,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": threads,
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "load_average": [round(load_before, 2), round(load_after, 2)]},
        "settings": {**settings, "batch_shape": list(shape), "device": device,
                     "kind": args.kind,
                     "model": (f"tiny-sdxl vae (RANDOM weights; {sum(p.numel() for p in vae.parameters()):,} "
                               f"parameters, {trained:,} trained: decoder mode)" if args.kind == "kl" else
                               f"VQModel with tiny-sdxl's VAE shapes (RANDOM weights; "
                               f"{sum(p.numel() for p in vae.parameters()):,} parameters, {trained:,} trained: full "
                               f"mode; a codebook of {VQ_SETTINGS['codebook_size']} codes by EMA, dead codes "
                               f"under {VQ_SETTINGS['dead_code_threshold']} restarted)")
                              + " + PatchGAN "
                              f"({sum(p.numel() for p in bare.disc_params):,} parameters, {settings['layers']} "
                              f"layers, {settings['channels']} channels), AdamW x2, fp32",
                     "schedule": "discriminator start 0, every 1; clip 1.0 both; constant lr; no EMA",
                     "timed": "trainer.train_step(trainer.next_batches(), sync=False) in a loop, not fit(); "
                              "set-up excluded"},
        "rows": rows,
        "split_ms_per_step": {"ours": split_trainer, "bare": split_plain},
        "losses": {"compared_steps": compared, "max_relative_difference": max_difference,
                   "ours_last": ours_losses[compared - 1], "bare_last": bare_losses[compared - 1]},
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
    console.print(f"batch {tuple(s['batch_shape'])} crops of a {s['resolution']} px bucket on {s['device']}, "
                  f"{s['model']}; {s['schedule']}; torch {m['torch']} threads {m['torch_threads']}")
    console.print(f"timed: {s['timed']}; {s['warmup']} warm-up steps each, then {s['rounds']} rounds of "
                  f"{s['steps']} steps alternating ours / bare; goal: median of the per-round ratios")
    table = Table(title=f"{NAME}: trainer vs bare loop (vs bare: median of the per-round ratios; CPU: process CPU "
                        "time per step, median; every round in the JSON)")
    for column in ("variant", "steps/s per round (min-max)", "median steps/s", "per-round vs bare (min-max)",
                   "vs bare", "CPU ms/step", "CPU vs bare"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in result["rows"]:
        table.add_row(r["variant"], f"{min(r['steps_per_s']):.2f}-{max(r['steps_per_s']):.2f}", f"{r['median']:.2f}",
                      f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}", f"{r['vs_bare']:.2f}x",
                      f"{statistics.median(r['cpu_ms_per_step']):.0f}", f"{r['cpu_vs_bare']:.2f}x")
    console.print(table)
    splits = result["split_ms_per_step"]
    parts = list(dict.fromkeys(p for split in splits.values() for p in split if p != "total")) + ["total"]
    table = Table(title="where a step goes: ms per step, mean of an instrumented pass alternating single steps "
                        "(informative)")
    table.add_column("part", justify="left")
    for name in splits:
        table.add_column(name, justify="right")
    for part in parts:
        table.add_row(part, *(f"{split[part]:.1f}" if part in split else "-" for split in splits.values()))
    console.print(table)
    losses = result["losses"]
    console.print(f"losses: {losses['compared_steps']} steps compared, largest relative difference ours/bare "
                  f"{losses['max_relative_difference']:.1e}")
    note_load(console, m)
    print_goals(result["goals"], console, f"{NAME}: goals")
    console.print(f"total {result['total_s']:.0f} s (project build {result['build_s']:.0f} s, not measured)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
