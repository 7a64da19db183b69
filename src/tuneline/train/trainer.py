"""The trainer core: family-agnostic, explicit, resumable, under HF accelerate.

    trainer = Trainer(config, adapter, data, ModelSource.of(model, root), checkpoint_root)
    trainer.setup()          # load, prepare, resume from this run's latest checkpoint if any
    result = trainer.fit()   # train_step until num_steps / num_epochs or a stop signal

The stage builds the pieces: the config section (`train`, `autoencoder`), the adapter of the
model (tuneline.models.registry), the data source (the latents, the autoencoder's crops). What the
trainer calls on each is typed in tuneline.train.adapter. Optimization is a list of units
(optimizer + LR schedule over some parameter groups, stepped every N steps after step S, with its
own loss, clipping and grad norm) that the adapter declares: a diffusion family one ("model"),
the autoencoder two (the VAE and its discriminator).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tuneline.core.stops import resume_command
from tuneline.models.config import run_key_settings
from tuneline.train import checkpoint, fsdp
from tuneline.train.adapter import ModelSource, TrainerAdapter, TrainerConfig, TrainingData
from tuneline.train.units import UnitSpec
from tuneline.train.fsdp import SHARDED_LAYOUT
from tuneline.train.output import BEST_DIR, EMA_DIR
from tuneline.train.sampler import BucketBatchSampler
from tuneline.train.state import TrainRandom, TrainState
from tuneline.train.validation import LOSS, Validation

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class StopRequested(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved (`checkpoint`)."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class OptimizationUnit:
    """One optimizer with its LR schedule and the parameter groups it steps.

    It steps at optimizer step s (1-based) when s > start_step and s % every == 0; its gradients
    come from its own loss only (backward with `inputs=` its parameters), clipped to its own norm.
    """

    name: str
    optimizer: Any
    scheduler: Any
    parameters: list[Any]
    every: int = 1
    start_step: int = 0
    max_grad_norm: float | None = None

    def due(self, step: int) -> bool:
        return step > self.start_step and step % self.every == 0


def steps_due(total_steps: int, every: int, start_step: int) -> int:
    """How many of steps 1..total_steps a unit with `every` / `start_step` steps at: its schedule's length."""
    return max(0, total_steps // every - min(start_step, total_steps) // every)


@dataclass
class UnitResult:
    """One unit's part of a step: loss and grad norm as device tensors (None: not due this step)."""

    loss_value: Any
    grad_norm_value: Any
    stepped: bool


@dataclass
class StepResult:
    """One optimizer step. Loss, grad norm and `extra` stay device tensors until read: reading one
    waits for the GPU to finish the step, so the loop reads them on logging steps only."""

    loss_value: Any  # 0-dim tensor: mean loss of the step over all processes
    grad_norm_value: Any  # 0-dim tensor, or None without clipping
    lrs: dict[str, float]
    samples: int = 0  # samples in this step, all processes
    skipped: bool = False  # fp16: the scaler found inf gradients and skipped the update
    extra_values: dict[str, Any] = field(default_factory=dict)
    units: dict[str, UnitResult] = field(default_factory=dict)

    def unit_numbers(self) -> dict[str, float]:
        """`<unit>/loss`, `<unit>/grad_norm` and `<unit>/stepped` of every unit (host syncs)."""
        numbers: dict[str, float] = {}
        for name, unit in self.units.items():
            numbers[f"{name}/stepped"] = float(unit.stepped)
            if unit.loss_value is not None:
                numbers[f"{name}/loss"] = float(unit.loss_value)
            if unit.grad_norm_value is not None:
                numbers[f"{name}/grad_norm"] = float(unit.grad_norm_value)
        return numbers

    @property
    def loss(self) -> float:
        return float(self.loss_value)

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)

    @property
    def extra(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.extra_values.items()}


class NonFiniteGuard:
    """Finds the first step whose loss was NaN/Inf without a host sync per step.

    Each step records, on the device, whether its loss was finite (on every process alike);
    `check()` reads the record (one sync) and raises TrainingDiverged naming the first bad step
    and its items. The trainer checks before anything is logged, saved or rendered, so a
    poisoned update is never written: the last good checkpoint stays the last one.
    """

    def __init__(self) -> None:
        self.first_bad: Any = None  # 0-dim int64 tensor: step number of the first bad loss, 0: none
        self.bad_loss: Any = None  # that step's loss
        self.pending: dict[int, list[str]] = {}  # step -> item ids, for the steps not checked yet

    def record(self, step: int, loss: Any, finite: Any, ids: list[str]) -> None:
        import torch

        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=loss.device)
            self.bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        newly_bad = (self.first_bad == 0) & ~finite
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)
        self.pending.setdefault(step, []).extend(ids)

    def check(self, last_good: Callable[[], Any]) -> None:
        """Raise TrainingDiverged if a recorded loss was not finite; `last_good()` names the checkpoint kept."""
        if self.first_bad is None:
            return
        step = int(self.first_bad)  # the host sync
        if step == 0:
            self.pending.clear()
            return
        good = last_good()
        kept = f"The last good checkpoint is {good}." if good is not None else "No checkpoint was written before it."
        raise TrainingDiverged(
            f"loss is {float(self.bad_loss)} at step {step} (items {self.pending.get(step, [])}); stopped "
            f"without saving. {kept} Lower train.lr, use bf16 instead of fp16, or check the data.")


class Trainer:
    """One training run: `setup()` loads, prepares and resumes; `fit()` trains to the end.

    config: the params section it runs on (`train`, `autoencoder`); adapter: the model; data: the
    batches, built by the stage; model: the base model's settings and identity (run key);
    checkpoint_root: where runs keep their checkpoint folders (`<root>/<run key>/step_*`);
    resume_from: a checkpoint to resume instead of this run's latest; live_eval(trainer): called
    on the main process every live_every steps (samples, evaluations); it must leave the training
    state untouched, RNG included, so exact resume still holds. validation: the held-out loss (None: off),
    computed every validation.config.every_steps steps and on the last; its best step is checkpointed and kept.
    """

    def __init__(self, config: TrainerConfig, adapter: TrainerAdapter, data: TrainingData, model: ModelSource,
                 checkpoint_root: Path, *, resume_from: Path | None = None,
                 live_eval: Callable[[Trainer], Any] | None = None, live_every: int = 0,
                 validation: Validation | None = None) -> None:
        self.config = config
        self.adapter = adapter
        self.data = data
        self.model = model
        self.checkpoint_root = Path(checkpoint_root)
        self.resume_from = Path(resume_from) if resume_from else None
        self.data_digest = self.data.digest()
        self.stop_signal: int | None = None
        self.live_eval, self.live_every = live_eval, live_every
        self.validation = validation
        self.messages: list[str] = []  # resume notes, safe config changes: shown and logged
        self.sharded = False  # FSDP (set when accelerate prepares the modules)

    # --- set-up -------------------------------------------------------------------------

    def setup(self) -> None:
        """Start accelerate, name the run, seed, load the model, build the units and the EMA, resume."""
        self._start()
        modules = self._load_model()
        self.sampler = BucketBatchSampler(self.data.sample_refs(), self.data.batch_size_for, self.seed,
                                          self.accelerator.num_processes, self.accelerator.process_index)
        self.batches_per_epoch = len(self.sampler)
        self.total_steps = self._total_steps()
        self._prepare(modules, self.adapter.optimization_units(modules))
        self._start_ema()
        self.random = TrainRandom(self.seed, self.accelerator.process_index, self.accelerator.device)
        self.state = TrainState(seed=self.seed)
        self._resume_or_start()
        self.state.history.append({"started_at_step": self.state.step, "time": time.time(),
                                   "processes": self.accelerator.num_processes})

    def _start(self) -> None:
        """The accelerator, the run's key and checkpoint folder, the seed (every global RNG seeded)."""
        import torch
        from accelerate import Accelerator

        from tuneline.train.optim import check_optimizer_available

        self.accelerator = Accelerator(mixed_precision=self.config.mixed_precision,
                                       cpu=not torch.cuda.is_available())
        self.guard = NonFiniteGuard()
        self.batching = self.data.batching()
        self.run_key = checkpoint.run_key(self.config.model_dump(mode="json"), self._model_key(), self.data_digest,
                                          self.accelerator.num_processes, self.batching)
        self.checkpoint_dir = self.checkpoint_root / self.run_key
        # Before anything loads: a missing package or a CPU-only optimizer fails in seconds.
        check_optimizer_available(self.config.optimizer, self.accelerator.device.type)
        torch.backends.cuda.matmul.allow_tf32 = True
        self.seed = self._resolve_seed()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def _model_key(self) -> dict[str, Any]:
        # The weights' content, not only their names: a model replaced in place is a different run.
        return {**run_key_settings(self.model.settings), "identity": self.model.identity}

    def _load_model(self) -> dict[str, Any]:
        """The adapter's trained modules, loaded and set up (LoRA initialisation draws from the seeded RNG)."""
        import torch

        # Nothing the step does not use is loaded: with cached text embeddings, no text encoder.
        self.adapter.load(conditioning_cached=self.data.text_cache)
        self.adapter.setup_training(self.accelerator.device)
        modules = self.adapter.trained_modules()
        if self.config.channels_last:
            for module in modules.values():
                module.to(memory_format=torch.channels_last)
        return modules

    def _prepare(self, modules: dict[str, Any], specs: list[UnitSpec]) -> None:
        """One optimizer and LR schedule per unit; modules and optimizers through accelerate.prepare
        (device placement, DDP); frozen modules to the device; the denoiser compiled when asked."""
        from tuneline.train.optim import build_optimizer, check_optimizer_available
        from tuneline.train.schedule import build_scheduler

        device_type = self.accelerator.device.type
        optimizers, schedulers = [], []
        for spec in specs:
            check_optimizer_available(spec.optimizer, device_type)
            optimizer = build_optimizer(spec.optimizer, list(spec.groups), device_type)
            optimizers.append(optimizer)
            # A unit's schedule runs over the steps it steps at.
            schedulers.append(build_scheduler(optimizer, spec.schedule,
                                              max(1, steps_due(self.total_steps, spec.every, spec.start_step))))
        names = list(modules)
        # Several units (a GAN) under several processes: DDP's reducer expects one forward through its
        # wrapper per backward, but a unit calls its modules' own methods (a VAE's encode/decode), calls
        # the discriminator three times and backpropagates each loss into its own parameters (`inputs=`).
        # So the modules are placed without DDP and each unit's gradients are averaged by hand.
        self.average_gradients = len(specs) > 1 and self.accelerator.num_processes > 1
        self.sharded = fsdp.sharded(self.accelerator)
        if self.sharded:
            blocks = fsdp.set_wrap_blocks(self.accelerator, self.adapter.family, modules, len(specs))
            fsdp.refuse_unrebuildable(modules)
            self.messages.append(f"FSDP2 over {self.accelerator.num_processes} processes, one unit per "
                                 f"{', '.join(blocks)}")
        if self.average_gradients:
            placed = [self.accelerator.prepare_model(module, evaluation_mode=True) for module in modules.values()]
            prepared = [*placed, *self.accelerator.prepare(*optimizers)]
        else:
            prepared = self.accelerator.prepare(*modules.values(), *optimizers)
        self.modules = dict(zip(names, prepared[:len(names)]))
        for module in self.adapter.frozen_modules().values():
            module.to(self.accelerator.device)
        if self.config.compile:
            name = self.adapter.compiled_module
            self.modules[name] = compile_module(self.modules[name], self.config.compile_scope, self.accelerator)
        # FSDP2 replaced the parameters by sharded DTensors (the prepared optimizer holds those): the unit's too.
        self.units = [OptimizationUnit(spec.name, optimizer, scheduler,
                                       [p for group in optimizer.param_groups for p in group["params"]]
                                       if self.sharded else spec.parameters, spec.every,
                                       spec.start_step, spec.max_grad_norm)
                      for spec, optimizer, scheduler in zip(specs, prepared[len(names):], schedulers)]
        self.parameters = self.units[0].parameters  # the main unit's: the model's trained parameters

    def _start_ema(self) -> None:
        from tuneline.train.ema import EMA

        self.ema = (EMA(self._named_trained_parameters(self.adapter.ema_modules()), self.config.ema)
                    if self.config.ema.enabled else None)

    def _resume_or_start(self) -> None:
        """Resume from `resume_from` or this run's latest checkpoint; else say why a new run starts."""
        found, note = (self.resume_from, None) if self.resume_from else checkpoint.find_latest(self.checkpoint_dir)
        if note:
            self.messages.append(note)
        if found is not None:
            self.resume(found)
            return
        others = sorted(p.name for p in self.checkpoint_root.glob("*") if checkpoint.latest(p) is not None)
        if others:
            self.messages.append(
                f"new run {self.run_key}: the checkpoints in {self.checkpoint_root} ({', '.join(others)}) are of "
                "other settings or data, so this run starts from the base model")

    def _resolve_seed(self) -> int:
        """The configured seed, or (null/0) a random one, read from the checkpoint when resuming."""
        if self.config.seed:
            return self.config.seed
        found = checkpoint.latest(self.checkpoint_dir)
        if found is not None:
            return checkpoint.read_state(found)["train_state"]["seed"]
        import torch

        seed = random.SystemRandom().randrange(1, 2**31)
        # Every process must use the main process's pick.
        seed = int(self.accelerator.reduce(torch.tensor(seed if self.accelerator.is_main_process else 0,
                                                        device=self.accelerator.device), "sum"))
        self.messages.append(f"{self.config.SECTION}.seed is {self.config.seed!r}: picked seed {seed} "
                             "(recorded; set it to repeat)")
        return seed

    def _total_steps(self) -> int:
        if self.config.num_steps is not None:
            return self.config.num_steps
        steps_per_epoch = max(1, self.batches_per_epoch // self.config.gradient_accumulation)
        return self.config.num_epochs * steps_per_epoch

    def trained_weights(self) -> dict[str, Any]:
        """A CPU copy of every trained parameter by `<module>.<parameter>` name: a checkpoint's trained.safetensors.
        Under FSDP the shards are gathered: every process must call it."""
        named = self._named_trained_parameters()
        return host_copies(fsdp.full_tensors(named) if self.sharded else named)

    def state_tensors(self) -> dict[str, Any]:
        """The adapter's tensors that steps change outside the optimizer (a VQ codebook), by name; most have none."""
        return self.adapter.state_tensors(self.modules)

    def _named_trained_parameters(self, names: list[str] | None = None) -> list[tuple[str, Any]]:
        """(module.parameter name, parameter) of the trained parameters of `names` (default: every trained module)."""
        return [(f"{name}.{pname}", p) for name, module in self.modules.items() if names is None or name in names
                for pname, p in self.accelerator.unwrap_model(module).named_parameters() if p.requires_grad]

    # --- one optimizer step ---------------------------------------------------------------

    def next_batches(self) -> list[list[int]]:
        """The micro-batches of the next optimizer step; advances epoch and position."""
        chosen = []
        while len(chosen) < self.config.gradient_accumulation:
            epoch_batches = self.sampler.batches(self.state.epoch)
            chosen.append(epoch_batches[self.state.position])
            self.state.position += 1
            if self.state.position == len(epoch_batches):  # the epoch is over as soon as its last batch is taken
                self.state.epoch += 1
                self.state.position = 0
        return chosen

    def train_step(self, micro_batches: list[list[int]], sync: bool = True) -> StepResult:
        """Forward + backward over the micro-batches, then one clipped optimizer step per due unit.

        Nothing here waits for the GPU: the loss, grad norm and finiteness stay on the device.
        With `sync` (the default) the step ends by checking the loss and raises TrainingDiverged
        before the optimizer steps on a NaN/Inf; fit() passes sync=False and checks on the steps
        that log, save or render (see NonFiniteGuard).

        `adapter.unit_losses` returns a loss per due unit. One unit: a plain backward (a diffusion
        family). Several: each due unit's loss is backpropagated into its own parameters only
        (`inputs=`), so one unit's loss never leaks gradients into another's (the GAN loss of the
        autoencoder into the discriminator). The first unit's loss is the step's loss.
        """
        import torch

        accelerator = self.accelerator
        for module in self.modules.values():
            if not _in_train_mode(module):
                module.train()
        step = self.state.step + 1
        single = len(self.units) == 1
        due = [unit for unit in self.units if unit.due(step)]
        due_names = {unit.name for unit in due}
        main = self.units[0].name
        unit_losses: dict[str, Any] = {}
        finite: Any = None
        samples = 0
        extra: dict[str, Any] = {}
        ids: list[str] = []
        for i, indices in enumerate(micro_batches):
            batch = self.data.batch(indices, self.random.torch, self.random.python, accelerator.device)
            ids.extend(batch["ids"])
            last = i == len(micro_batches) - 1
            with _no_sync(accelerator, self.modules.values(), enabled=not last), accelerator.autocast():
                losses, extra = self.adapter.unit_losses(self.modules, batch, self.random.torch, self.state.step,
                                                         [unit.name for unit in due])
            for name, loss in losses.items():
                detached = loss.detach().float()
                ok = torch.isfinite(detached)
                finite = ok if finite is None else finite & ok
                part = detached / len(micro_batches)
                unit_losses[name] = part if name not in unit_losses else unit_losses[name] + part
            if single:
                accelerator.backward(losses[main] / len(micro_batches))
            else:
                for k, unit in enumerate(due):
                    accelerator.backward(losses[unit.name] / len(micro_batches), inputs=unit.parameters,
                                         retain_graph=k < len(due) - 1)
            self.state.micro_step += 1
            samples += len(indices) * accelerator.num_processes
        if self.average_gradients:
            for unit in due:
                average_gradients(unit.parameters, accelerator.num_processes)
        total_loss = unit_losses[main]
        if accelerator.num_processes > 1:
            # Every process must agree before anyone steps on a poisoned gradient (a collective, no host sync).
            finite = accelerator.reduce(finite.float(), "min") > 0
            unit_losses = {name: accelerator.reduce(value, "mean") for name, value in unit_losses.items()}
            total_loss = unit_losses[main]
        self.guard.record(step, total_loss, finite, ids)
        if sync:
            self.check_finite()
        self.state.samples_seen += samples
        results: dict[str, UnitResult] = {}
        skipped = False
        for unit in self.units:
            if unit.name not in due_names:
                results[unit.name] = UnitResult(unit_losses.get(unit.name), None, False)
                continue
            grad_norm = None
            if unit.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(unit.parameters, unit.max_grad_norm)
            unit.optimizer.step()
            unit_skipped = bool(getattr(unit.optimizer, "step_was_skipped", False))
            if not unit_skipped:
                unit.scheduler.step()
            unit.optimizer.zero_grad(set_to_none=True)
            skipped = skipped or (unit.name == main and unit_skipped)
            results[unit.name] = UnitResult(unit_losses.get(unit.name), grad_norm, not unit_skipped)
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.state.step)
        lrs = {}
        for unit in self.units:
            for k, group in enumerate(unit.optimizer.param_groups):
                name = group.get("name", str(k))
                lrs[name if single else f"{unit.name}.{name}"] = group["lr"]
        return StepResult(total_loss, results[main].grad_norm_value, lrs, samples, skipped, extra, results)

    def check_finite(self) -> None:
        """Raise TrainingDiverged if a loss since the last check was NaN/Inf (one host sync)."""
        self.guard.check(lambda: checkpoint.latest(self.checkpoint_dir))

    def evaluate(self, seed: int = 0) -> float:
        """Mean loss over every item with noise, timesteps and latent samples fixed by `seed`.

        Uses its own generators and eval mode, so the training streams (and exact resume)
        are untouched. Comparable across steps of one run: the learning signal.
        """
        import torch

        generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        python_rng = random.Random(seed)
        for module in self.modules.values():
            module.eval()
        total, count = 0.0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for indices in self.sampler.all_batches(epoch=0):
                batch = self.data.batch(indices, generator, python_rng, self.accelerator.device)
                main = self.units[0].name
                losses, _ = self.adapter.unit_losses(self.modules, batch, generator, self.state.step, [main])
                loss = losses[main]
                total += float(loss) * len(indices)
                count += len(indices)
        return total / count

    def validate(self) -> dict[str, float] | None:
        """The validation loss of the current weights (see tuneline.train.validation); None when off.

        Without gradients, in eval mode, every draw from per-item CPU generators, the global RNG
        streams forked: training continues exactly as without it. Every process takes part (each a
        share of the batches, the sums added up); every process gets the same numbers.
        """
        import torch

        from tuneline.train.validation import repeat_batch

        validation = self.validation
        if validation is None:
            return None
        accelerator = self.accelerator
        device = accelerator.device
        datasets = validation.data.validation_datasets()
        levels = validation.config.levels()
        position = {name: d for d, name in enumerate(datasets)}
        # float64 sums on the host: the order of additions is fixed by the batches, not the device.
        sums = torch.zeros(len(datasets), len(levels), 3, dtype=torch.float64)
        batches = validation.batches()[accelerator.process_index::accelerator.num_processes]
        for module in self.modules.values():
            module.eval()
        forked = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.no_grad(), accelerator.autocast():
            for indices in batches:
                # Every item at every level in one forward (validation.batches sizes it to the bucket's batch).
                batch = repeat_batch(validation.data.validation_batch(indices, validation.config.seed, device),
                                     len(levels))
                timesteps = torch.tensor(levels * len(indices), dtype=torch.long, device=device)
                weighted, plain = validation.adapter.per_sample_losses(self.modules, batch, batch["noise"],
                                                                       timesteps, self.state.step)
                parts = torch.stack([weighted.double().cpu(), plain.double().cpu(),
                                     torch.ones(len(timesteps), dtype=torch.float64)], dim=1)
                rows = torch.tensor([position[name] for name in batch["datasets"]])
                for k in range(len(levels)):  # sample j is item j // len(levels) at level j % len(levels)
                    sums[:, k].index_add_(0, rows[k::len(levels)], parts[k::len(levels)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(device), "sum").cpu()
        return validation.metrics(sums)

    def _record_best(self, loss: float) -> bool:
        """Record `loss` as the best validation loss when it is lower than any before; True when it is."""
        best = self.state.best_validation_loss
        if best is not None and not loss < best:
            return False
        self.state.best_validation_step, self.state.best_validation_loss = self.state.step, loss
        return True

    # --- checkpoints ----------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write a resumable checkpoint of the current step (every process takes part)."""
        import torch
        from safetensors.torch import save_file

        accelerator = self.accelerator
        self.check_finite()  # a poisoned update is never written
        accelerator.wait_for_everyone()
        staging = checkpoint.staging_dir(self.checkpoint_dir, self.state.step)
        if accelerator.is_main_process:
            checkpoint.begin(self.checkpoint_dir, self.state.step)
        accelerator.wait_for_everyone()
        torch.save(self.random.state_dict(), staging / f"rng_rank{accelerator.process_index}.pt")
        final = None
        if self.sharded:  # every process writes its shards and takes part in gathering the full weights
            fsdp.save(accelerator, staging, self.ema.state_dict() if self.ema is not None else None)
            weights = self.trained_weights()
        if accelerator.is_main_process:
            save_file(weights if self.sharded else self.trained_weights(), staging / "trained.safetensors")
            state = self.state_tensors()
            if state:
                save_file(host_copies(state.items()), staging / checkpoint.ADAPTER_STATE_FILE)
            # Sharded: the optimizer and EMA state are in fsdp/ and ema/ (fsdp.save); the schedules stay here.
            training = {"units": {u.name: {"optimizer": None if self.sharded else u.optimizer.state_dict(),
                                           "scheduler": u.scheduler.state_dict()} for u in self.units},
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        "ema": None if self.ema is None else
                        {"num_updates": self.ema.num_updates} if self.sharded else self.ema.state_dict()}
            torch.save(training, staging / "training.pt")
            checkpoint.write_state(staging, {
                "train_state": self.state.to_json(),
                "train_config": self.config.model_dump(mode="json"),
                "model": self.model.settings,
                "data_digest": self.data_digest,
                "processes": accelerator.num_processes,
                "batching": self.batching,
                "model_identity": self.model.identity,
                **({"sharded": SHARDED_LAYOUT} if self.sharded else {}),  # absent: the single-process layout
            })
            best = [self.state.best_validation_step] if self.state.best_validation_step else []
            final = checkpoint.finish(self.checkpoint_dir, self.state.step, self.config.checkpoint.keep_last, keep=best)
        accelerator.wait_for_everyone()
        return final

    def resume(self, folder: Path) -> None:
        """Continue exactly where `folder` stopped; refuse changes that would make it a different run."""
        from safetensors.torch import load_file

        saved = checkpoint.read_state(folder)
        safe, unsafe = checkpoint.compare_configs(saved["train_config"], self.config.model_dump(mode="json"),
                                                  self.config.SECTION)
        saved_model, model = run_key_settings(saved["model"]), run_key_settings(self.model.settings)
        if saved_model != model:
            unsafe.append(f"model: {saved_model} -> {model}")
        if saved.get("model_identity", self.model.identity) != self.model.identity:
            unsafe.append("the model's weights changed (the files at model.base / model.vae / "
                          "model.training_adapter differ)")
        if saved["data_digest"] != self.data_digest:
            unsafe.append("the training data changed (images, captions, repeats or loss weights)")
        if saved["processes"] != self.accelerator.num_processes:
            # Sharded or not: each process's RNG streams and share of every batch are its own, so another
            # count is another run (torch.distributed.checkpoint could reshard the weights, not those).
            unsafe.append(f"number of processes: {saved['processes']} -> {self.accelerator.num_processes}")
        if saved.get("sharded") != (SHARDED_LAYOUT if self.sharded else None):
            unsafe.append(f"the checkpoint was written {'with' if saved.get('sharded') else 'without'} FSDP and this "
                          f"run is {'' if self.sharded else 'not '}sharded: launch it with the same accelerate config")
        if saved.get("batching", self.batching) != self.batching:
            unsafe.append(f"batch size per bucket (bucket.batch_size / batch_sizes): {saved['batching']} -> "
                          f"{self.batching}")
        if unsafe:
            raise checkpoint.ResumeRefused(
                f"cannot resume from {folder}: " + "; ".join(unsafe) + f". Restore those settings, or delete "
                f"{self.checkpoint_dir} to start a new run.")
        for line in safe:
            self.messages.append(f"resuming with a changed setting: {line}")
        if self.sharded:  # model, optimizer and EMA shards in place; the full trained.safetensors is not read
            fsdp.load(self.accelerator, folder, self.ema.state_dict() if self.ema is not None else None)
        else:
            copy_into(self._named_trained_parameters(), load_file(folder / "trained.safetensors"))
        state = self.state_tensors()
        if state:
            copy_into(state.items(), load_file(folder / checkpoint.ADAPTER_STATE_FILE))
        training = checkpoint.load_torch(folder / "training.pt")
        for unit in self.units:
            if not self.sharded:
                unit.optimizer.load_state_dict(training["units"][unit.name]["optimizer"])
            unit.scheduler.load_state_dict(training["units"][unit.name]["scheduler"])
            # The optimizer state carries the lr of the old schedule; num_steps may have changed it.
            for group, lr in zip(unit.optimizer.param_groups, unit.scheduler.get_lr()):
                group["lr"] = lr
        if training["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(training["scaler"])
        if self.ema is not None and training["ema"] is not None:
            if self.sharded:  # the shadow's shards were loaded by fsdp.load
                self.ema.num_updates = training["ema"]["num_updates"]
            else:
                self.ema.load_state_dict(training["ema"])
        rng = checkpoint.load_torch(folder / f"rng_rank{self.accelerator.process_index}.pt")
        self.state = TrainState.from_json(saved["train_state"])
        self._forget_best_if_incomparable(saved["train_config"])
        self.messages.extend(self.random.load_state_dict(rng, self.state.step))
        self.messages.append(f"resumed from {folder} at step {self.state.step} (epoch {self.state.epoch})")

    def _forget_best_if_incomparable(self, saved_config: dict[str, Any]) -> None:
        """A best validation loss measured at other levels or noise is not comparable: start the record again."""
        current = self.config.model_dump(mode="json").get("validation")
        if self.state.best_validation_step and saved_config.get("validation") != current:
            fields = ("timesteps", "points", "seed")
            before = {key: saved_config.get("validation", {}).get(key) for key in fields}
            after = {key: (current or {}).get(key) for key in fields}
            if before != after:
                self.messages.append(
                    f"train.validation levels or seed changed ({before} -> {after}): the best validation loss so far "
                    f"({self.state.best_validation_loss} at step {self.state.best_validation_step}) is not comparable, "
                    "so the record starts again")
                self.state.best_validation_step, self.state.best_validation_loss = 0, None

    # --- the loop -------------------------------------------------------------------------

    def _done(self) -> bool:
        if self.config.num_steps is not None:
            return self.state.step >= self.config.num_steps
        return self.state.epoch >= self.config.num_epochs

    def _checkpoint_due(self, epoch_before: int) -> bool:
        every = self.config.checkpoint
        by_steps = every.every_steps is not None and self.state.step % every.every_steps == 0
        by_epochs = (every.every_epochs is not None and self.state.epoch != epoch_before
                     and self.state.epoch % every.every_epochs == 0)
        return by_steps or by_epochs

    def _stop_agreed(self) -> bool:
        import torch

        if self.accelerator.num_processes == 1:  # no collective, no host sync
            return self.stop_signal is not None
        flag = torch.tensor(1.0 if self.stop_signal is not None else 0.0, device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, "max")) > 0

    def fit(self, on_log: Any = None, on_validate: Any = None) -> dict[str, Any]:
        """Train until done; save on schedule, at the end, and on SIGTERM/SIGINT (then raise StopRequested).

        With validation on, after each due step: the validation loss, `on_validate(state, metrics)`,
        and a checkpoint at a step whose loss is the lowest so far (kept by keep_last pruning)."""
        from tuneline.core.parallel import StepBar

        accelerator = self.accelerator
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        for message in self.messages:
            accelerator.print(message)
        bar = StepBar(self.config.SECTION, self.total_steps if self.config.num_steps else None, self.state.step,
                      enabled=accelerator.is_local_main_process)
        session_start, session_steps, last = time.perf_counter(), 0, None
        try:
            while not self._done():
                epoch_before = self.state.epoch
                # Host syncs only where a number is read: logging, saving, rendering, the end.
                result = self.train_step(self.next_batches(), sync=False)
                session_steps += 1
                seconds_per_step = (time.perf_counter() - session_start) / session_steps
                last = result
                bar.advance()
                logging = self.state.step % self.config.log_every == 0
                live = self.live_eval is not None and self.live_every and self.state.step % self.live_every == 0
                validating = self.validation is not None and self.validation.due(self.state.step, self._done())
                if logging or live or validating or self._done():
                    self.check_finite()
                if logging:
                    bar.note(loss=f"{result.loss:.4f}", lr=f"{next(iter(result.lrs.values())):.2e}",
                             s_step=f"{seconds_per_step:.2f}")
                    if on_log is not None:
                        on_log(self.state, result, seconds_per_step)
                improved = False
                if validating:
                    metrics = self.validate()
                    improved = self._record_best(metrics[LOSS])
                    if on_validate is not None:
                        on_validate(self.state, metrics)
                if live:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        self.live_eval(self)
                    accelerator.wait_for_everyone()
                if self._stop_agreed():
                    saved = self.save()
                    raise StopRequested(
                        f"stopped by signal {self.stop_signal} at step {self.state.step}; checkpoint "
                        f"{saved or self.checkpoint_dir}. To resume, run {resume_command()}",
                        saved or self.checkpoint_dir)
                # A new best validation loss gets a checkpoint of its step (its weights are the best ones).
                if (self._checkpoint_due(epoch_before) or improved) and not self._done():
                    self.save()
            if session_steps or not self.saved_at_current_step():
                self.save()  # a session that trained nothing leaves its checkpoint (and DVC's hash of it) as it was
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {"steps": self.state.step, "epochs": self.state.epoch, "final_loss": last.loss if last else None,
                "seconds_per_step": (time.perf_counter() - session_start) / max(1, session_steps),
                "session_steps": session_steps, "seed": self.seed}

    def saved_at_current_step(self) -> bool:
        """True when this run's latest checkpoint is of the current step."""
        found = checkpoint.latest(self.checkpoint_dir)
        return found is not None and found.name == checkpoint.checkpoint_name(self.state.step)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second signal: the user insists
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.accelerator.is_local_main_process:
            print(f"\nsignal {signum}: finishing this step, then saving a checkpoint", flush=True)

    def save_outputs(self, out_dir: Path, only_ema: bool = False) -> Path | None:
        """The trained result in diffusers format, main process only; with EMA on, the EMA
        weights also go to `out_dir/ema` in the same layout (render and export choose), or,
        with `only_ema`, are the only weights written (a stage whose output is the weights to use). With a
        best validation step, its weights go to `out_dir/best` in the same layout."""
        self.accelerator.wait_for_everyone()
        if self.sharded:
            return self._save_sharded_outputs(Path(out_dir), only_ema)
        if not self.accelerator.is_main_process:
            return None
        unwrapped = {name: self.accelerator.unwrap_model(m) for name, m in self.modules.items()}
        self._save_best(unwrapped, Path(out_dir) / BEST_DIR)
        if self.ema is not None:
            with self.ema.swap():
                saved = self.adapter.save(unwrapped, Path(out_dir) if only_ema else Path(out_dir) / EMA_DIR)
            if only_ema:
                return saved
        return self.adapter.save(unwrapped, out_dir)

    def _save_sharded_outputs(self, out_dir: Path, only_ema: bool) -> Path | None:
        """save_outputs under FSDP: every process takes part in gathering the full weights and the EMA shadow;
        the main process writes best, EMA and live weights, as the unsharded path, through plain copies of the
        modules (fsdp.plain_copy) holding those full tensors."""
        main = self.accelerator.is_main_process
        states = {name: fsdp.full_state(module, main) for name, module in self.modules.items()}
        shadow = fsdp.gathered(self.ema.shadow.items(), main) if self.ema is not None else {}
        trained = [name for name, _ in self._named_trained_parameters()]
        saved = None
        if main:
            plain = {name: fsdp.plain_copy(self.accelerator.unwrap_model(module), states.pop(name))
                     for name, module in self.modules.items()}
            named = dict((f"{name}.{pname}", p) for name, module in plain.items()
                         for pname, p in module.named_parameters())
            self._save_best(plain, out_dir / BEST_DIR, [(name, named[name]) for name in trained])
            if not only_ema or self.ema is None:
                saved = self.adapter.save(plain, out_dir)
            if self.ema is not None:  # as EMA.swap: the shadow cast to each parameter's dtype
                copy_into([(name, named[name]) for name in shadow], shadow)
                ema_dir = self.adapter.save(plain, out_dir if only_ema else out_dir / EMA_DIR)
                saved = ema_dir if only_ema else saved
        self.accelerator.wait_for_everyone()
        return saved

    def _save_best(self, unwrapped: dict[str, Any], out_dir: Path,
                   parameters: list[tuple[str, Any]] | None = None) -> None:
        """The weights of the best validation step (its kept checkpoint) to `out_dir`, in the adapter's
        layout; the live weights are put back after. Nothing without a best step. `parameters`: the trained
        parameters of `unwrapped` by checkpoint name (default: this trainer's own)."""
        from safetensors.torch import load_file

        step = self.state.best_validation_step
        if not step:
            return
        folder = self.checkpoint_dir / checkpoint.checkpoint_name(step)
        if not (folder / "trained.safetensors").is_file():
            self.messages.append(f"the best validation step {step} has no checkpoint in {self.checkpoint_dir}: "
                                 "no best weights written")
            return
        parameters = self._named_trained_parameters() if parameters is None else parameters
        current = host_copies(parameters)
        try:
            copy_into(parameters, load_file(folder / "trained.safetensors"))
            self.adapter.save(unwrapped, out_dir)
        finally:
            copy_into(parameters, current)


def compile_module(module: Any, scope: str, accelerator: Any, backend: str | None = None) -> Any:
    """torch.compile `module`: its repeated blocks ("blocks": diffusers' compile_repeated_blocks, in
    place: each distinct block is traced once and reused, so the first step comes in seconds, not
    minutes) or the whole module ("model"). Returns the module to call."""
    import torch

    backend = backend or COMPILE_BACKEND
    inner = accelerator.unwrap_model(module)
    if scope == "blocks" and getattr(inner, "_repeated_blocks", None):
        inner.compile_repeated_blocks(backend=backend)
        return module
    if scope == "blocks":
        log.warning("%s defines no repeated blocks: compiling the whole model", type(inner).__name__)
    return torch.compile(module, backend=backend)


# torch.compile backend of train.compile; the CPU bench (`bench.gpu --small`) sets "eager" to trace
# without code generation.
COMPILE_BACKEND = "inductor"


def _in_train_mode(module: Any) -> bool:
    """True when `module` and every wrapper level under it (DDP keeps its own flag) is in train mode.

    module.train() walks every submodule (1322 in the tiny LoRA UNet: 4-6 ms a step on a CPU), so the
    trainer calls it only when this is False. eval() and loading set the top-level flag to False, so
    the check sees them; only a direct mode change of a submodule would be missed, and nothing does that.
    """
    import torch

    while True:
        if not module.training:
            return False
        inner = getattr(module, "module", None)  # DDP / DeepSpeed / FSDP; a compiled module forwards it
        if not isinstance(inner, torch.nn.Module):
            return True
        module = inner


def host_copies(named: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """name -> a contiguous CPU copy of each (name, tensor): what a checkpoint file holds."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named}


def copy_into(live: Iterable[tuple[str, Any]], saved: dict[str, Any]) -> None:
    """Each live tensor of (name, tensor) set in place to `saved[name]`, on its device and in its dtype."""
    import torch

    with torch.no_grad():
        for name, tensor in live:
            tensor.copy_(saved[name].to(tensor.device, tensor.dtype))


def average_gradients(parameters: list[Any], processes: int) -> None:
    """Every process's gradients of `parameters` replaced by their mean over the processes, as DDP's
    all-reduce would leave them (one flat all-reduce; a parameter without a gradient counts as zeros)."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= processes
    for parameter, grad in zip(parameters, _unflatten_dense_tensors(flat, grads)):
        parameter.grad = grad


class _no_sync:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""

    def __init__(self, accelerator: Any, modules: Any, enabled: bool) -> None:
        import contextlib

        self.stack = contextlib.ExitStack()
        self.contexts = [accelerator.no_sync(m) for m in modules] if enabled else []

    def __enter__(self) -> None:
        for context in self.contexts:
            self.stack.enter_context(context)

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()
