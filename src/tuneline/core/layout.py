"""Where a project keeps each stage's folders, relative to the project root: one place, one
name. dvc.yaml declares the same paths (a test checks them against the stage registry)."""

from __future__ import annotations

RAW = "data/raw"
MODEL_IDENTITY = "models/identity"
# Every data set file's path and digest (the scan stage): ingest's input, so DVC hashes one file, not the raw folders.
SCANNED = "data/scanned"
INGESTED = "data/ingested"
BUCKETED = "data/bucketed"
# The autoencoder stage's fine-tuned VAE (a diffusers AutoencoderKL folder), or its disabled record.
AUTOENCODER = "models/autoencoder"
CAPTIONED = "data/captioned"
# Captions a person edited, by data set and item id: an input of the caption stage (git tracks it).
CAPTION_EDITS = "data/caption_edits"
LATENTS = "data/latents"
# The latents stage's second output: the render prompts' text embeddings (live samples and render read them).
PROMPT_EMBEDS = "data/prompt_embeds"
TRAINED = "models/train"
RENDERS = "renders"
EXPORT = "export"
METRICS = "metrics"
# Persistent, outside DVC's cache: a rerun after an interruption resumes from here.
CHECKPOINTS = "checkpoints/train"
AUTOENCODER_CHECKPOINTS = "checkpoints/autoencoder"
# In each run's checkpoint folder <CHECKPOINTS>/<run key>/: the sessions that trained it (wall-clock
# times, MLflow run ids), which must not go into DVC's outputs (the same weights, other bytes).
TRAIN_RUN_RECORD = "run.json"
# Each stage's last run report (computed, reused, seconds, ...): not a DVC output (core.report).
REPORTS = "reports"
# One lock file per stage output: at most one process writes a stage's folders at a time.
LOCKS = ".tuneline/locks"
