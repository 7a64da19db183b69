"""The `tuneline` command and the stage runner behind `python -m stages.<name>`.

Every stage reads params.yaml (validated before any work), reads its input folder,
and writes its output folder plus metrics/<stage>.json, relative to the project root.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tuneline.config import load_params
from tuneline.core.params import ParamsError
from tuneline.orchestration import registry


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), with 0 <= I < N."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, like 0/4; got {text!r}")
    return shard


def _run_tracked(stage: str, params, root: Path, options: dict):
    """Run a stage inside its MLflow run (a child of the pipeline's run when one is open). The run
    is created only when the stage records something: a stage with nothing to do imports no mlflow."""
    from tuneline.core.tracking.tracker import Tracker

    entry = registry.stage(stage)
    if not entry.tracked:  # importing mlflow alone would cost it seconds on every `dvc repro`
        return entry.run(params, root, None, **options)
    is_main = os.environ.get("RANK", "0") == "0"
    shard = options.get("shard")
    run_name = f"{stage} shard {shard[0]}/{shard[1]}" if shard else stage
    with Tracker.start(params.tracking, root, run_name=run_name, stage=stage, is_main_process=is_main) as tracker:
        section = getattr(params, stage, None)
        if section is not None and not entry.trains:  # a training stage logs its own, richer set
            tracker.log_params({stage: section, "datasets": [d.model_dump(mode="json") for d in params.datasets]})
        try:
            report = entry.run(params, root, tracker, **options)
        except Exception as error:
            from tuneline.train.trainer import StopRequested

            if isinstance(error, StopRequested):  # stopped on request, resumable: not a failure
                tracker.end("KILLED")
            raise
        if report.computed or tracker.started:  # a stage that found nothing to do leaves no run
            # What this run did (computed, seconds, ...) as tags: one-value metrics would be charted
            # ahead of the curves the stage logged per step (and a train "loss" would repeat the curve's).
            tracker.log_facts(report.numbers())
        return report


def _output_lock(stage: str, root: Path, options: dict):
    """One writer per stage output: a second train refuses (naming the holder's PID), a second data,
    render or export process waits. Shards write only the item store (built for concurrent writers),
    and under `accelerate launch` the main process locks for all."""
    import contextlib

    from tuneline.core import layout
    from tuneline.core.lock import exclusive
    from tuneline.core.report import console

    if options.get("shard") or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return exclusive(Path(root) / layout.LOCKS / f"{stage}.lock", f"stage {stage} of {Path(root).resolve()}",
                     wait=not registry.stage(stage).trains, on_wait=lambda text: console.print(text, markup=False, soft_wrap=True))


def run_stage(stage: str, params_path: Path, root: Path, options: dict | None = None) -> int:
    """Run one stage; return the process exit code (2 for bad configuration, 130 for a second Ctrl-C)."""
    from tuneline.core.lock import LockHeld
    from tuneline.core.report import print_error, print_warning
    from tuneline.preflight import preflight

    from tuneline.core import logs

    options = options or {}
    logs.configure(root, stage)
    try:
        params = load_params(params_path)
        for note in preflight(params, root, stages=(stage,)):
            print_warning(note)
        with _output_lock(stage, root, options):
            report = _run_tracked(stage, params, root, options)
    except ParamsError as error:
        print_error("configuration error", str(error))
        return 2
    except (FileNotFoundError, LockHeld) as error:
        print_error("error", str(error))
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was being written
        print_error("interrupted", f"stage {stage} interrupted; the last complete checkpoint (if any) is kept")
        return 130
    except Exception as error:  # the trainer's stop, divergence and resume refusals: no traceback
        from tuneline.train.checkpoint import ResumeRefused
        from tuneline.train.trainer import StopRequested, TrainingDiverged

        if isinstance(error, StopRequested):
            print_error("stopped", str(error))
            from tuneline.core.stops import write_stop_record

            write_stop_record(stage, str(error), error.checkpoint)
            return 143
        if isinstance(error, (TrainingDiverged, ResumeRefused)):
            print_error("training stopped", str(error))
            return 1 if isinstance(error, TrainingDiverged) else 2
        from tuneline.train.fsdp import FsdpRefused

        if isinstance(error, FsdpRefused):
            print_error("configuration error", str(error))
            return 2
        raise
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, one summary, from the main process
        if (options or {}).get("shard"):  # a shard fills the store only: no output folder, no metrics file
            report.stage = f"{stage} shard {options['shard'][0]}/{options['shard'][1]}"
            report.print_summary()
        else:
            report.print_summary(root / registry.stage(stage).writes / "rejected.jsonl")
    return 0


# Common card sizes the memory estimate is compared with.
CARD_SIZES_GIB = (8, 12, 16, 24)


def _print_memory_estimate(params, root: Path):
    """The training's GPU memory, estimated from the model's configs (see tuneline.train.memory);
    returns the estimate, or None when there is none."""
    from tuneline.core.report import console, print_warning
    from tuneline.models.ref import resolve_model
    from tuneline.stages.train.fit import fits_card
    from tuneline.stages.train.memory import estimate_training_memory
    from tuneline.train import memory

    base = resolve_model(params.model.base, root)
    if isinstance(base, Path) and base.is_file():
        from tuneline.models.single_file import converted_dir, is_converted

        if not is_converted(converted_dir(base, params.model, root)):  # converting would load the whole file
            console.print("  no GPU memory estimate yet: model.base is a single file, whose configs come from its "
                          "conversion; the first stage that loads it (tuneline latents) converts it", markup=False)
            return None
    try:
        estimate = estimate_training_memory(params, root)
    except Exception as error:  # noqa: BLE001 - the estimate is advice: never fail the check on it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print_warning(f"no GPU memory estimate: {type(error).__name__}: {first[:200]}")
        return None
    from rich.table import Table

    train = params.train
    what = (f"LoRA rank {train.lora.rank} ({train.lora.targets})" if train.mode == "lora" else "full fine-tune")
    table = Table(title=f"training GPU memory, estimated: {what}, mixed_precision {train.mixed_precision}, "
                        f"gradient checkpointing {'on' if train.gradient_checkpointing else 'off'}",
                  title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    for name, size in estimate.rows():
        table.add_row(name, memory.format_bytes(size))
    console.print(table)
    fits = ", ".join(f"{gib} GiB {'yes' if fits_card(estimate.peak, gib) else 'no'}" for gib in CARD_SIZES_GIB)
    console.print(f"  fits a card of (leaving 10% for CUDA's context and fragmentation): {fits}", markup=False)
    for note in estimate.notes:
        console.print(f"  note: {note}", markup=False, soft_wrap=True)
    return estimate


def _print_fit(params, root: Path, card_gib: float, start) -> int:
    """`check --fit`: the cheapest setting changes that fit the card (tuneline.stages.train.fit);
    0 when the plan fits, 1 when nothing tried does."""
    from tuneline.core.report import console
    from tuneline.stages.train.fit import USABLE_FRACTION, plan_fit
    from tuneline.train.memory import GIB, format_bytes

    def say(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    card = f"{card_gib:g} GiB"
    if start is None:
        say(f"--fit {card}: no plan without a memory estimate")
        return 1
    plan = plan_fit(params, root, card_gib, start)
    say(f"--fit {card}: the estimated peak must stay under {format_bytes(int(plan.budget))} ({USABLE_FRACTION:.0%} of "
        f"the card, the rest for CUDA's context and fragmentation); now {format_bytes(plan.start)}")
    if not plan.changes and plan.fits:
        say("  it fits as configured: nothing to change")
        return 0
    width = max(len(" ".join(change.set_args())) for change in plan.changes) if plan.changes else 0
    for change in plan.changes:
        say(f"  {' '.join(change.set_args()):<{width}}  {format_bytes(change.peak):>10}  {change.why}")
    for note in plan.notes:
        say(f"  note: {note}")
    timing = f"({plan.estimates} estimates, {plan.seconds:.1f} s)"
    if plan.fits:
        count = len(plan.changes)
        say(f"fits a {card} card at {format_bytes(plan.peak)} after {count} change{'s' * (count != 1)} {timing}; "
            "run with them (dvc exp run, python -m flows.pipeline and tuneline check take the same -S):")
        say(f"  dvc exp run {' '.join(plan.set_args())}")
        return 0
    after = "with every change above" if plan.changes else "as configured; no change tried lowers it"
    say(f"does not fit a {card} card: the smallest estimate reached is {format_bytes(plan.peak)} {after} "
        f"(a card of {plan.peak / GIB / USABLE_FRACTION:.1f} GiB would take it) {timing}")
    return 1


def _check(params_path: Path, root: Path, estimate_memory: bool = True, fit_gib: float | None = None,
           sets: list[str] | None = None) -> int:
    from tuneline.core.params import format_resolution
    from tuneline.core.report import console, print_error, print_warning
    from tuneline.preflight import preflight

    try:
        if sets:
            from tuneline.orchestration.overrides import load_with_overrides, parse_set_args

            _, params = load_with_overrides(params_path, parse_set_args(sets))
        else:
            params = load_params(params_path)
        warnings = preflight(params, root, stages=("check",))
    except ParamsError as error:
        print_error("configuration error", str(error))
        return 2
    console.print(f"{params_path}{' with ' + ' '.join(f'-S {s}' for s in sets) if sets else ''}: valid",
                  markup=False, soft_wrap=True)
    for warning in warnings:
        print_warning(warning)
    for dataset in params.datasets:
        buckets = params.buckets_for(dataset)
        listed = ", ".join(format_resolution(b) for b in buckets)
        console.print(f"  data set {dataset.name!r} ({dataset.path}): {len(buckets)} buckets: {listed}",
                      markup=False, soft_wrap=True)
    for line in _split_lines(params, root) + _structure_lines(params):
        console.print(line, markup=False, soft_wrap=True)
    if estimate_memory:
        estimate = _print_memory_estimate(params, root)
        if fit_gib is not None:
            return _print_fit(params, root, fit_gib, estimate)
    return 0


def _structure_lines(params) -> list[str]:
    """The style/structure loss weights each data set's samples get (train.loss.structure with its overrides)."""
    from tuneline.train.config import STRUCTURE_TERMS

    weights = {dataset.name: params.structure_for(dataset).weights for dataset in params.datasets}
    if not any(any(values) for values in weights.values()):
        return ["  style/structure loss: off (train.loss.structure and datasets[].loss.structure all 0)"]
    lines = ["  style/structure loss weights (datasets[].loss.structure, the unset terms train.loss.structure's):"]
    for name, values in weights.items():
        lines.append(f"    data set {name!r}: " + ", ".join(f"{term} {value:g}" for term, value in zip(STRUCTURE_TERMS,
                                                                                                       values)))
    return lines


def _split_lines(params, root: Path) -> list[str]:
    """The held-out split of each data set: its rule, and its train / validation counts over the
    items of the latest stage output there is (the latents stage records the same split)."""
    from tuneline.core import layout
    from tuneline.core.manifest import MANIFEST, read_jsonl
    from tuneline.core.split import ALL, VALIDATION, describe, split_of

    if all(dataset.validation is None for dataset in params.datasets):
        return ["  validation split: none (datasets[].validation unset: every image trains)"]
    source = next((folder for folder in (layout.LATENTS, layout.CAPTIONED, layout.BUCKETED, layout.INGESTED)
                   if (Path(root) / folder / MANIFEST).is_file()), None)
    ids: dict[str, list[str]] = {}
    if source is not None:
        for record in read_jsonl(Path(root) / source / MANIFEST):
            ids.setdefault(record["dataset"], []).append(record["id"])
    settings = {dataset.folder: dataset.validation for dataset in params.datasets}
    sides = split_of({dataset.folder: ids.get(dataset.folder, []) for dataset in params.datasets}, settings)
    lines = [f"  validation split (by content id; a fraction is the strictly stable form), counted over {source}:"
             if source else "  validation split (by content id; a fraction is the strictly stable form), "
                            "counts known after ingest:"]
    for dataset in params.datasets:
        side = sides[dataset.folder]
        held = sum(1 for value in side.values() if value == VALIDATION)
        counts = f"train {len(side) - held}, validation {held}" if source else "counts after ingest"
        lines.append(f"    {dataset.name!r}: {counts}; {describe(dataset.validation)}")
        if source and side and held == len(side) and dataset.validation != ALL:
            lines.append(f"      note: the count holds out every image of {dataset.name!r}; write 'all' if you mean it")
    return lines


def parse_fit(text: str) -> float:
    """`--fit`'s value: a card size in GiB above 0."""
    from tuneline.stages.train.fit import parse_card_size

    try:
        return parse_card_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _item(root: Path, name: str, extract_to: Path | None, edit: bool) -> int:
    from tuneline import items
    from tuneline.core.report import console, print_error

    try:
        record = items.find_item(root, name)
        for line in items.describe(record):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if extract_to is not None:
            console.print(f"  crop written to {items.extract(root, record, extract_to)}", markup=False, highlight=False,
                          soft_wrap=True)
        if edit:
            path, created = items.start_edit(root, record)
            console.print(f"  edit {path}" + (" (the current caption copied there)" if created else " (already there)")
                          + "; the next caption run uses it verbatim", markup=False, highlight=False, soft_wrap=True)
    except items.ItemNotFound as error:
        print_error("no such item", str(error))
        return 1
    return 0


def _add_orchestration_commands(commands) -> None:
    ui = commands.add_parser("ui", help="start the MLflow UI and a Prefect server on 127.0.0.1; Ctrl-C stops both")
    ui.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default: 5000)")
    ui.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default: 4200)")
    ui.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for both to answer")
    serve = commands.add_parser("serve", help="serve the Prefect deployment of the pipeline (= python -m flows.serve)")
    serve.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for flows.serve (see --help)")
    exp = commands.add_parser("exp", help="DVC experiments in one readable table (dvc exp show --json): name, lr, "
                                          "steps, loss, validation loss and the params that differ from their commit")
    exp.add_argument("-A", "--all-commits", action="store_true", help="the experiments of every commit, not only HEAD's")
    exp.add_argument("-n", "--num", type=int, default=None, metavar="N", help="the last N commits (dvc exp show -n)")
    exp.add_argument("--sort", choices=("time", "loss", "val_loss"), default="time",
                     help="row order: as DVC lists them (default), or lowest loss / validation loss first")
    repro = commands.add_parser("repro", help="dvc repro under one MLflow parent run (stages become its children)")
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments passed on to `dvc repro`")


# Commands whose arguments all go to another program (dvc repro, flows.serve), options included.
PASSTHROUGH = {"repro": "dvc_args", "serve": "serve_args"}
_GLOBAL_OPTIONS_WITH_VALUE = ("--params", "--root")


def _passthrough_split(argv: list[str]) -> int:
    """Index after a pass-through command word (`tuneline --root x repro --dry` -> 3), else len(argv).
    argparse's REMAINDER would refuse a leading option (`repro --dry`), so the rest is cut off first."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
            continue
        if token.startswith("-"):
            index += 1
            continue
        return index + 1 if token in PASSTHROUGH else len(argv)
    return len(argv)


def _run_orchestration_command(args) -> int:
    from tuneline.core.report import print_error

    if args.command == "serve":
        from tuneline.orchestration.serve import main as serve_main

        return serve_main(["--root", str(args.root.resolve()), "--params", str(args.params.resolve()), *args.serve_args])
    try:
        params = load_params(args.params)
        if args.command == "repro":  # each stage checks too; this names them before dvc starts any
            from tuneline.preflight import check_settings

            check_settings(params, args.root)
    except ParamsError as error:
        print_error("configuration error", str(error))
        return 2
    from tuneline.orchestration import services

    if args.command == "ui":
        return services.run_ui(params, args.root, args.mlflow_port, args.prefect_port, args.start_timeout)
    return services.run_repro(params, args.root, args.dvc_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate params.yaml, show each data set's buckets and estimate "
                                              "the training's GPU memory")
    check.add_argument("--no-memory", action="store_true",
                       help="skip the GPU memory estimate (it builds the model from its configs: a few seconds)")
    check.add_argument("--fit", type=parse_fit, default=None, metavar="GIB",
                       help="print the cheapest setting changes (as -S key=value) that bring the estimate under a "
                            "card of GIB GiB, with the estimate after each; exit 1 when none does")
    check.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="check with this setting changed, as `dvc exp run -S` sets it (value read as YAML; "
                            "params.yaml is not changed); repeatable")
    for entry in registry.STAGES:
        command = commands.add_parser(entry.name, help=f"run stage {entry.name}")
        if entry.name == "train":
            command.add_argument("--resume-from", type=Path, default=None,
                                 help="resume from this checkpoint folder (refused if its settings are not compatible)")
        if entry.shardable:
            command.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                                 help="compute only shard I of N of the missing items into the shared store "
                                      "(no output folder, no metrics); then run without --shard to assemble")
    item = commands.add_parser("item", help="show one image as the stages see it (bucket, caption); extract its crop; "
                                            "start a hand edit of its caption")
    item.add_argument("name", help="its raw file (data/raw/<data set>/photo.jpg) or <data set>/<id>")
    item.add_argument("--extract", type=Path, default=None, metavar="DIR", help="write its bucketed crop to DIR/<id>.png")
    item.add_argument("--edit", action="store_true",
                      help="copy its caption to data/caption_edits/<data set>/<id>.txt (if not there) to edit it")
    _add_orchestration_commands(commands)
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = _passthrough_split(argv)
    args = parser.parse_args(argv[:passed_on])
    if args.command in PASSTHROUGH:
        setattr(args, PASSTHROUGH[args.command], argv[passed_on:])
    if args.command in ("ui", "serve", "repro"):
        return _run_orchestration_command(args)
    if args.command == "exp":
        from tuneline.orchestration.experiments import show

        dvc_args = (["--all-commits"] if args.all_commits else []) + (["-n", str(args.num)] if args.num else [])
        return show(args.root, dvc_args, args.sort)
    if args.command == "item":
        return _item(args.root, args.name, args.extract, args.edit)
    if args.command == "check":
        if args.fit is not None and args.no_memory:
            parser.error("--fit needs the memory estimate: drop --no-memory")
        return _check(args.params, args.root, estimate_memory=not args.no_memory, fit_gib=args.fit, sets=args.sets)
    options = {"resume_from": args.resume_from} if args.command == "train" else {}
    if getattr(args, "shard", None) is not None:
        options["shard"] = args.shard
    return run_stage(args.command, args.params, args.root, options)


def stage_main(stage: str) -> None:
    """`python -m stages.<stage>`: same as `tuneline <stage>`."""
    sys.exit(main([*sys.argv[1:], stage]))


if __name__ == "__main__":
    sys.exit(main())
