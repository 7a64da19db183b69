"""Stage `autoencoder`: fine-tune the VAE (decoder or full; kind kl) or train a VQ autoencoder with an
EMA codebook (kind vq), with a PatchGAN discriminator.

`with_trained_vae` is how the rest of the pipeline uses its result: the stage runner hands the
stages that encode or decode (latents, train, render, export) params whose `model.vae` is the
trained VAE when the stage is enabled. A VAE's identity is part of every latent key, so
enabling the stage (or retraining it) recomputes every latent and nothing upstream. A VQ model
(kind vq) is never handed on: those stages refuse it (preflight says so before they compute).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.core import layout
from tuneline.core.params import ParamsError

# The modules that decide what the stage's result is (tuneline.core.codeversion).
CODE = ("stages/autoencoder/stage.py", "stages/autoencoder/data.py", "stages/autoencoder/evaluate.py",
        "models/autoencoder/__init__.py", "models/autoencoder/adapter.py", "models/autoencoder/vq.py",
        "models/registry.py", "models/loading.py", "models/quantize.py", "models/ref.py", "models/single_file.py", "train", "models/base.py", "models/contracts.py", "models/family.py", "core/device.py",
        "models/training_adapter.py")


def with_trained_vae(params: Any, root: Path) -> Any:
    """`params`, with model.vae set to the autoencoder stage's output when autoencoder.enabled is true.
    ParamsError when that output is no KL VAE (autoencoder.kind: vq)."""
    from tuneline.models.autoencoder import latent_vae_problem

    if not params.autoencoder.enabled:
        return params
    problem = latent_vae_problem(params.autoencoder.enabled, params.autoencoder.kind)
    if problem:
        raise ParamsError(problem)
    if not (Path(root) / layout.AUTOENCODER / "config.json").is_file():
        raise ParamsError(f"autoencoder.enabled is true but {layout.AUTOENCODER} holds no trained VAE: "
                          "run the autoencoder stage first (`dvc repro` or `tuneline autoencoder`)")
    model = params.model.model_copy(update={"vae": layout.AUTOENCODER})
    return params.model_copy(update={"model": model})
