"""SDXL's exporter: what the export stage writes for an SDXL run, and its headers.

- LoRA (UNet and/or text encoders): a kohya LoRA (kohya_lora: ComfyUI, A1111, diffusers'
  load_lora_weights; a DoRA carries LyCORIS' `dora_scale`), kohya's `ss_*` header. A LoHa / LoKr
  (train.lora.type): LyCORIS' tensors under the same kohya names, `ss_network_module: lycoris.kohya`
  with its `algo` (ComfyUI and LyCORIS load it; diffusers' load_lora_weights refuses it).
- full fine-tune: one single-file SDXL checkpoint in the original layout (checkpoint_file), the
  parts not trained fully as in the base model.
- the VAE alone in the ldm layout of standalone VAE files (ComfyUI's Load VAE, A1111's models/VAE).

Headers: SAI `modelspec.*` with the architecture names kohya sd-scripts writes for SDXL
(`stable-diffusion-xl-v1-base`, `/lora`, `/vae`) and tuneline's provenance (tuneline.models.export).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.models.contracts import ExportedFile, HeaderFacts
from tuneline.models.export import header_metadata
from tuneline.models.lycoris import title as lycoris_title

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import LoraConfig, TrainConfig

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
VAE_ARCHITECTURE = f"{SDXL_ARCHITECTURE}/vae"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
COMPONENTS = {"unet": "UNet", "text_encoder_1": "text encoder 1 (CLIP ViT-L)",
              "text_encoder_2": "text encoder 2 (OpenCLIP bigG)"}


def lora_network(lora: Any) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args) of a LoRA: the kohya network that loads it and its arguments,
    strings as kohya's `--network_args key=value` give them.

    Conv layers (targets "all") train with the same rank and alpha as the linear ones: conv_dim and
    conv_alpha. A DoRA has no place in kohya's networks.lora (it would drop dora_scale): LyCORIS
    loads it, with the weight decomposition on the output axis. A LoHa / LoKr is LyCORIS' `algo`
    loha / lokr (a LoKr with its `factor` and `decompose_both`, LyCORIS' names for PEFT's).
    """
    args: dict[str, str] = {}
    if lora.targets == "all":
        args |= {"conv_dim": str(lora.rank), "conv_alpha": str(float(lora.alpha))}
    if lora.type != "lora":
        lokr = {"factor": str(lora.factor), "decompose_both": str(lora.decompose_both)} if lora.type == "lokr" else {}
        return "lycoris.kohya", {"algo": lora.type, **args, **lokr}
    if lora.dropout:
        args["dropout"] = str(lora.dropout)
    if lora.use_dora:
        return "lycoris.kohya", {"algo": "lora", **args, "dora_wd": "True", "wd_on_output": "True"}
    return "networks.lora", args


def kohya_metadata(
    *,
    title: str,
    rank: int | str,
    alpha: float | str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    network_module: str = "networks.lora",
    network_args: Mapping[str, str] | None = None,
    network_dropout: float | None = None,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    output_name: str | None = None,
    training_started_at: _dt.datetime | str | None = None,
    date: _dt.datetime | str | None = None,
    base_model_version: str = "sdxl_base_v1-0",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a kohya-format SDXL LoRA: kohya's minimum `ss_*` set (network args included),
    `modelspec.*` 1.0.1 and provenance.

    `rank`/`alpha` are the network dim and alpha (pass "Dynamic" when they vary per module,
    as kohya does). `alpha` is the REAL alpha the LoRA was trained with, never the rank.
    """
    from tuneline.models.export import PREDICTION_TYPES

    meta = {
        "ss_base_model_version": base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(dict(network_args or {})),
        "ss_output_name": output_name or title,
        "ss_v2": "False",
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_prediction_type": PREDICTION_TYPES.get(prediction_type, prediction_type),
        "ss_zero_terminal_snr": str(bool(zero_terminal_snr)),
    }
    if network_dropout is not None:
        meta["ss_network_dropout"] = str(network_dropout)
    if training_started_at is not None:
        started = training_started_at
        if isinstance(started, _dt.datetime):  # kohya stores a unix timestamp
            started = str(started.timestamp())
        meta["ss_training_started_at"] = str(started)
    meta.update(header_metadata(
        architecture=f"{SDXL_ARCHITECTURE}/lora", implementation=SGM_IMPLEMENTATION, title=title,
        data_digest=data_digest, params_digest=params_digest, code_version=code_version, mlflow_run_id=mlflow_run_id,
        git_commit=git_commit, git_dirty=git_dirty, prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr, resolution=resolution, trigger_phrase=trigger_phrase, date=date,
        extra=extra))
    return meta


def checkpoint_metadata(
    *,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a full SDXL single-file checkpoint: `modelspec.*` 1.0.1 and provenance."""
    return header_metadata(
        architecture=SDXL_ARCHITECTURE, implementation=SGM_IMPLEMENTATION, title=title, data_digest=data_digest,
        params_digest=params_digest, code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit,
        git_dirty=git_dirty, prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr,
        resolution=resolution, trigger_phrase=trigger_phrase, date=date, extra=extra)


def vae_metadata(
    *,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    description: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a standalone SDXL VAE file: `modelspec.*` 1.0.1 with the architecture
    `stable-diffusion-xl-v1-base/vae` (the `<base>/<component>` form sd-scripts uses for its LoRA and
    ControlNet files), no prediction type, trigger phrase or date (the UNet's training says nothing
    of the VAE's), and the same provenance as the export's other files."""
    return header_metadata(
        architecture=VAE_ARCHITECTURE, implementation=SGM_IMPLEMENTATION, title=title, data_digest=data_digest,
        params_digest=params_digest, code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit,
        git_dirty=git_dirty, prediction_type=None, zero_terminal_snr=None, resolution=resolution,
        trigger_phrase=None, date=None, extra=extra, description=description)


def base_unet_config(model: ModelConfig, root: Path) -> Path:
    """config.json of the base's UNet: it decides the kohya (SGM) block names."""
    from tuneline.models.loading import _base_location

    base = _base_location(model, root)  # a single-file base: its converted folder
    if isinstance(base, str):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base, "unet/config.json", revision=model.revision))
    return base / "unet" / "config.json"


class SDXLExporter:
    """The export stage's questions, answered for SDXL (the `Exporter` Protocol of tuneline.models.contracts)."""

    components = COMPONENTS
    vae_layout = "original layout: ComfyUI `models/vae`, A1111 `models/VAE`"

    def trained_modes(self, trained: TrainConfig) -> dict[str, str]:
        return {"unet": trained.mode, "text_encoder_1": trained.text_encoder_1.mode,
                "text_encoder_2": trained.text_encoder_2.mode}

    def names(self, parts: Sequence[str]) -> str:
        return " and ".join(COMPONENTS[p] for p in parts)

    def checkpoint_description(self, full: Sequence[str], untouched: Sequence[str], dtype: str) -> str:
        return (f"single-file SDXL checkpoint ({dtype}) with the fully trained {self.names(full)}"
                + (f"; {self.names(untouched)} as in the base model" if untouched else ""))

    def lora_kind(self, lora: LoraConfig) -> str:
        return f"kohya {lycoris_title(lora)}" + (" (LyCORIS keys)" if lora.type != "lora" else "")

    def component_line(self, name: str, mode: str, lora: LoraConfig) -> str:
        if mode != "lora":
            return f"- {COMPONENTS[name]}: {mode}"
        return (f"- {COMPONENTS[name]}: {lycoris_title(lora)} rank {lora.rank}, alpha {lora.alpha}"
                + (f", targets {lora.targets}" if name == "unet" else ""))

    def header(self, kind: str, facts: HeaderFacts, extra: Mapping[str, str], *, file_name: str, lora: LoraConfig,
               description: str | None = None) -> dict[str, str]:
        if kind == "vae":
            return vae_metadata(title=facts.title, resolution=facts.resolution, extra=extra, description=description,
                                **facts.provenance_args())
        common = {**facts.provenance_args(), "title": facts.title, "date": facts.date,
                  "prediction_type": facts.prediction_type, "zero_terminal_snr": facts.zero_terminal_snr,
                  "resolution": facts.resolution, "trigger_phrase": facts.trigger_phrase}
        if kind == "checkpoint":
            return checkpoint_metadata(**common, extra=extra)
        module, network_args = lora_network(lora)
        return kohya_metadata(rank=lora.rank, alpha=lora.alpha, network_module=module, network_args=network_args,
                              network_dropout=lora.dropout, output_name=Path(file_name).stem,
                              training_started_at=facts.training_started_at, **common, extra=extra)

    def write_checkpoint(self, pipeline_dir: Path, out: Path, dtype: str, metadata: Mapping[str, str]) -> Path:
        from tuneline.models.sdxl.checkpoint_file import pipeline_to_single_file

        return pipeline_to_single_file(pipeline_dir, out, dtype, metadata)  # type: ignore[arg-type]

    def write_lora(self, lora_file: Path, out: Path, metadata: Mapping[str, str], model: ModelConfig,
                   root: Path) -> Path:
        from tuneline.models.sdxl.kohya_lora import export_kohya_lora

        return export_kohya_lora(lora_file, out, base_unet_config(model, root), metadata)

    def write_vae(self, state_dict: Mapping[str, Any], config: Mapping[str, Any], out: Path, dtype: str,
                  metadata: Mapping[str, str]) -> Path:
        from tuneline.models.export import vae_to_single_file

        return vae_to_single_file(state_dict, config, out, dtype, metadata)

    def card_training(self, prediction_type: str, trained: TrainConfig, resolution: int) -> str:
        return (f"- prediction type: {prediction_type}, zero terminal SNR: "
                f"{'yes' if trained.zero_terminal_snr else 'no'}, resolution {resolution}")

    def card_use(self, files: Sequence[ExportedFile], prediction_type: str, trained: TrainConfig) -> list[str]:
        lines = ["## Use", "", "ComfyUI / A1111: checkpoints go into `models/checkpoints`, LoRAs into `models/loras`"
                 + (", the VAE into `models/vae` (ComfyUI's Load VAE node; A1111: `models/VAE`)."
                    if any(f.kind == "vae" for f in files) else "."),
                 "diffusers: `StableDiffusionXLPipeline.from_single_file(path, config=...)`, "
                 "`pipe.load_lora_weights(path)`."]
        if trained.lora.type != "lora":
            lines += [f"The {lycoris_title(trained.lora)} file has LyCORIS' keys: ComfyUI's Load LoRA, A1111/Forge and "
                      "LyCORIS (`lycoris.kohya`) load it; diffusers' load_lora_weights does not (it reads LoRA keys "
                      "only): use the trained `pytorch_lora_weights.safetensors` with PEFT there."]
        if prediction_type == "v_prediction" or trained.zero_terminal_snr:
            lines += ["The checkpoint carries the `v_pred` / `ztsnr` keys ComfyUI reads. diffusers' single-file "
                      "loader ignores them: pass `config=` the exported `diffusers/pipeline` folder, whose scheduler "
                      "has the trained prediction type and zero-terminal-SNR setting."]
        return lines
