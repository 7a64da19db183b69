"""Checks of params.yaml against this machine and the project's files, before any compute.

`load_params` checks the file itself; `preflight` checks what it points at: data set folders,
model references (local paths that must exist; hub ids that must be cached or reachable),
the prompts file live samples need, optimizers that need hardware this machine lacks, and the
model family's rules (settings the train, render or export stage would refuse for this family,
`tuneline.models.<family>.rules`). Every stage runs it before any compute, so a run with a
setting its train stage will refuse stops at its first stage, not after ingest..latents.
Errors are raised together as one ParamsError naming each key; warnings are returned.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from tuneline.config import Params
from tuneline.core.params import ParamsError
from tuneline.models.base import Family
from tuneline.models.config import ModelConfig
from tuneline.models.lycoris import problems as lycoris_problems
from tuneline.models.quantize import full_training_problems

# Stages that read each kind of reference; `tuneline check` runs every check.
_DATASET_STAGES = {"scan", "ingest", "check"}
_MODEL_STAGES = {"autoencoder", "latents", "train", "render", "export", "check"}
_CAPTION_STAGES = {"caption", "check"}
# Stages that encode or decode with model.vae: the autoencoder stage's output when it is on (registry uses_vae).
_VAE_STAGES = {"latents", "train", "render", "export", "check"}
_HUB_TIMEOUT_S = 5.0
# A mask whose mean at latent resolution is at least this trains every position with full weight (fp16 storage).
FULL_COVERAGE = 0.999


def _looks_local(ref: str) -> bool:
    """A path, not a hub id: hub ids are `name` or `org/name`, with no file suffix."""
    return (ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref
            or ref.endswith((".safetensors", ".ckpt", ".pt", ".bin")))


def _hub_cached(ref: str) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    return (Path(HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}").is_dir()


def _hub_problem(ref: str, revision: str | None) -> str | None:
    """None when the hub answers for `ref`, else why not (offline mode, no such id, no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and the id is not in the local cache"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(ref, revision=revision, timeout=_HUB_TIMEOUT_S)
    except Exception as error:  # any failure means the loaders would fail too, after long retries
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the hub did not answer for it ({type(error).__name__}: {first[:160]})"
    return None


def check_model_ref(key: str, ref: str, revision: str | None, root: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) for one model reference: a tiny id, a local path, or a hub id."""
    from tuneline.models.ref import is_tiny

    if is_tiny(ref):
        return [], []
    path = Path(ref).expanduser()
    local = path if path.is_absolute() else Path(root) / path
    if local.exists():
        return [], []
    if _looks_local(ref):
        return [f"{key}: {ref!r} is neither a folder nor a file (looked for {local})"], []
    if _hub_cached(ref):
        problem = None
    else:
        problem = _hub_problem(ref, revision)
    if problem:
        return [f"{key}: {ref!r} is neither a local folder or file (looked for {local}) nor a hub id that can "
                f"be reached: {problem}"], []
    if not revision:
        return [], [f"{key}: hub id {ref!r} without a pinned revision: a change upstream is not seen by the "
                    "caches; set the revision to a commit hash"]
    return [], []


def _rules_family(model: ModelConfig, root: Path) -> Family:
    from tuneline.models.family import detect_family, get_family
    from tuneline.tiny import TINY_MODEL_IDS

    if model.family is None and model.base in TINY_MODEL_IDS:
        # A tiny id names its family: no need to build the model to read its model_index.json.
        return get_family(TINY_MODEL_IDS[model.base])
    return get_family(detect_family(model, root))


def family_problems(params: Params, root: Path | str, required: bool = True) -> list[str]:
    """The settings the model family refuses (its rules, on the train and render sections), one
    line each. Finding the family reads model_index.json only. When it cannot be found (no such
    base, offline): one line saying so if `required`, else none (the stages that load the model
    say it)."""
    from tuneline.models.training_adapter import problems as training_adapter_problems
    from tuneline.models.variant import variant_problems

    adapter = training_adapter_problems(params.model, params.train.mode, Path(root))
    try:
        family = _rules_family(params.model, Path(root))
    except (ParamsError, OSError, ValueError) as error:  # hub id checks raise ValueErrors too
        return ([str(error) if isinstance(error, ParamsError) else f"model.base {params.model.base!r}: cannot tell "
                 f"its model family ({type(error).__name__}: {error}); set model.family"] if required else []) + adapter
    return family.unsupported_settings(params.train, params.render) + variant_problems(params.model, family) + adapter


def _variant_warnings(params: Params, root: Path) -> list[str]:
    """`tuneline check`: the variant nothing names, and a step-distilled one trained without a training adapter."""
    from tuneline.models.variant import resolve_variant, training_warning, undetected_warning

    try:
        family = _rules_family(params.model, root)
        choice = resolve_variant(params.model, family, root)
    except (ParamsError, OSError, ValueError):  # said as an error already
        return []
    found = (undetected_warning(choice, params.model, family),
             training_warning(choice, params.model, params.train, family))
    return [warning for warning in found if warning]


def check_settings(params: Params, root: Path | str) -> None:
    """ParamsError naming every setting a stage of the run would refuse for the model family:
    what a driver (the Prefect flow, `tuneline repro`) runs before its first stage."""
    problems = (family_problems(params, root) + full_training_problems(params.model.quantize, params.train)
                + lycoris_problems(params.model.quantize, params.train) + autoencoder_problems(params))
    if problems:
        raise ParamsError("params.yaml has settings that a stage of the run would refuse:\n"
                          + "\n".join(f"  - {problem}" for problem in problems))


def _crop_warnings(params: Params) -> list[str]:
    """The autoencoder cuts every crop to the smallest bucket side among the images (config.py
    refuses a crop no bucket can hold): say which buckets would cut it."""
    from tuneline.core.params import format_resolution

    crop = params.autoencoder.crop_size
    short = sorted({(dataset.name, bucket) for dataset in params.datasets
                    for bucket in params.buckets_for(dataset) if min(bucket) < crop})
    if not short:
        return []
    listed = ", ".join(f"{format_resolution(bucket)} ({name})" for name, bucket in short[:6])
    return [f"autoencoder.crop_size: {crop} is longer than the shorter side of some buckets: {listed}"
            f"{' ...' if len(short) > 6 else ''}; when one of them holds an image, every crop is cut to its "
            "shorter side (the crop used is in models/autoencoder/autoencoder_state.json)"]


def preflight(params: Params, root: Path | str, stages: Iterable[str] = ("check",)) -> list[str]:
    """Raise ParamsError listing every problem `stages` would hit; return warnings to show."""
    root = Path(root)
    stages = set(stages)
    errors: list[str] = []
    warnings: list[str] = []
    if stages & _DATASET_STAGES:
        for dataset in params.datasets:
            folder = root / dataset.path
            if folder.is_file():
                errors.append(f"datasets[{dataset.name}].path: {dataset.path} is a file; give the folder that holds "
                              "the data set's images")
            elif not folder.is_dir():
                errors.append(f"datasets[{dataset.name}].path: folder {folder} does not exist")
            if dataset.folder != dataset.name:
                warnings.append(f"datasets[{dataset.name}].name: used as the folder name {dataset.folder!r} in every "
                                "stage output (separators and leading dots are not allowed there)")
    if stages & _MODEL_STAGES:
        model = params.model
        for key, ref, revision in (("model.base", model.base, model.revision), ("model.vae", model.vae, None),
                                   ("model.config", model.config, None)):
            if ref:
                found_errors, found_warnings = check_model_ref(key, ref, revision, root)
                errors += found_errors
                warnings += found_warnings
    if stages & _CAPTION_STAGES and params.caption.mode != "sidecar_only":
        found_errors, found_warnings = check_model_ref("caption.model", params.caption.model,
                                                       params.caption.revision, root)
        errors += found_errors
        warnings += found_warnings
    if stages & {"train", "check"}:
        if params.render.live_every > 0 and not (root / params.render.prompts_file).is_file():
            errors.append(f"render.prompts_file: {params.render.prompts_file} does not exist, and render.live_every="
                          f"{params.render.live_every} renders its prompts during training (set live_every: 0 "
                          "to train without live samples)")
        errors += _optimizer_problems(params)
        found_errors, found_warnings = masked_loss_problems(params, root)
        errors += found_errors
        warnings += found_warnings
    if stages & {"train", "render", "export", "check"}:
        errors += best_weights_problems(params)
    if stages & {"render"} and not (root / params.render.prompts_file).is_file():
        errors.append(f"render.prompts_file: {params.render.prompts_file} does not exist")
    if stages & {"autoencoder", "check"} and params.autoencoder.enabled:
        warnings += _crop_warnings(params)
    if stages & _VAE_STAGES:
        errors += autoencoder_problems(params)
    # Every stage: a setting the train, render or export stage will refuse stops the run before its
    # first stage computes anything. Stages that load no model skip the rules when the family cannot
    # be told; the model stages name the reference (once: not when model.base is already named).
    model_stage = bool(stages & _MODEL_STAGES)
    if not (model_stage and any(error.startswith("model.base:") for error in errors)):
        errors += family_problems(params, root, required=model_stage)
    errors += full_training_problems(params.model.quantize, params.train)  # the train stage's refusal
    errors += lycoris_problems(params.model.quantize, params.train)  # the train stage's refusal
    if "check" in stages and not errors:  # the train stage's report says it again when it trains
        warnings += _variant_warnings(params, root)
    if errors:
        raise ParamsError("params.yaml does not fit this machine or project:\n"
                          + "\n".join(f"  - {error}" for error in errors))
    return warnings


def masked_loss_problems(params: Params, root: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of train.masked_loss against the data: on, but no item of a data set has a mask
    (data/ingested says, once ingest ran; before it, a warning), or every mask covers the whole image
    (data/latents says, once latents ran: the loss is the unmasked one)."""
    from tuneline.core import layout
    from tuneline.core.manifest import MANIFEST, read_manifest

    if not params.train.masked_loss.enabled:
        return [], []
    datasets = {dataset.folder for dataset in params.datasets}
    if not (root / layout.INGESTED / MANIFEST).is_file():
        return [], [f"train.masked_loss.enabled: true, and {layout.INGESTED} does not exist yet: whether any image "
                    "has a mask (an alpha channel or <stem>_mask.png beside it) is checked once the ingest stage "
                    "ran; items without one train everywhere"]
    masked = sum(1 for record in read_manifest(root / layout.INGESTED)
                 if record["dataset"] in datasets and "mask" in record)
    if not masked:
        return [f"train.masked_loss.enabled: true, but no image of the data sets ({', '.join(sorted(datasets))}) "
                f"has a mask in {layout.INGESTED}: give an image an alpha channel or a <stem>_mask.png beside it "
                "(white = train, black = ignore), run ingest again, or set train.masked_loss.enabled: false"], []
    latents = root / layout.LATENTS
    if not (latents / MANIFEST).is_file():
        return [], []
    coverage = [record["mask_coverage"] for record in read_manifest(latents)
                if record["dataset"] in datasets and "mask_coverage" in record]
    if coverage and min(coverage) >= FULL_COVERAGE:
        return [], [f"train.masked_loss.enabled: true, but each of the {len(coverage)} masks in {layout.LATENTS} "
                    "covers the whole image (an opaque alpha channel or a white mask file): the loss is the "
                    "unmasked one; paint the areas to ignore black, or turn masked loss off"]
    return [], []


def autoencoder_problems(params: Params) -> list[str]:
    """The autoencoder stage's output when the stages that encode or decode cannot use it as model.vae
    (autoencoder.kind: vq): one line, else none."""
    from tuneline.models.autoencoder import latent_vae_problem

    problem = latent_vae_problem(params.autoencoder.enabled, params.autoencoder.kind)
    return [problem] if problem else []


def best_weights_problems(params: Params) -> list[str]:
    """render.weights / export.weights: best needs a run that computes a validation loss: validation on
    (train.validation.every_steps) and some data set holding images out (datasets[].validation)."""
    missing = []
    if params.train.validation.every_steps <= 0:
        missing.append("train.validation.every_steps is 0 (off)")
    if not any(dataset.validation for dataset in params.datasets):
        missing.append("no data set holds images out (every datasets[].validation is null)")
    if not missing:
        return []
    return [f"{key}: best needs the weights of the lowest validation loss, and {' and '.join(missing)}: set "
            f"train.validation.every_steps > 0 with held-out items (datasets[].validation), or set "
            f"{key}: final (allowed: final, best)"
            for key, value in (("render.weights", params.render.weights), ("export.weights", params.export.weights))
            if value == "best"]


def _optimizer_problems(params: Params) -> list[str]:
    if params.train.optimizer.name != "adamw8bit":
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["train.optimizer.name: adamw8bit needs bitsandbytes and a CUDA GPU: pip install bitsandbytes==0.50.2 "
                "(a tuneline dependency) on the GPU machine, or choose one of adamw, lion, adafactor, prodigy"]
    import torch

    if not torch.cuda.is_available():
        return ["train.optimizer.name: adamw8bit needs a CUDA GPU and torch sees none here; choose one of adamw, "
                "lion, adafactor, prodigy"]
    return []
