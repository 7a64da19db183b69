"""What a stage shows, and where the rest goes.

The terminal gets what a person needs: one progress bar per long loop, the stage table and
warnings that matter (tuneline's own, at WARNING and above). Everything else, including
the libraries' chatter (MLflow's database and system-metrics INFO lines, transformers' and
diffusers' notices, Python warnings, what torchao and bitsandbytes say when PEFT imports them),
goes to `.tuneline/logs/<stage>.log`, one file per stage, appended to on every run.

    configure(root, "latents")   # first thing in a stage process
    ...
    quiet_libraries()            # right after importing transformers / diffusers to load a model
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LOG_DIR = Path(".tuneline") / "logs"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries that talk at import or first use, whatever tuneline does with them (PEFT imports torchao
# and bitsandbytes whenever it adds a LoRA): torchao's missing CUDA extensions and Triton, torch's
# pytree deprecation of torchao's enums (printed by torch's own stderr handler), bitsandbytes'
# optional CPU kernels, diffusers' torchao quantizer. Their records go to the stage's log file only.
STAGE_LOG_ONLY = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers")
# PEFT's note on every LoRA layer over a torchao weight: tuneline never merges into a quantized base.
_PEFT_TORCHAO_NOTE = "TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`"

# Read once at import by the libraries, so set before they are imported. (MLflow's own switch,
# MLFLOW_CONFIGURE_LOGGING, is set by the tracker, the one place tuneline imports mlflow.)
_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars (its tqdm follows this)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def configure(root: Path, stage: str) -> Path:
    """Send every record to the stage's log file; show tuneline's warnings on stderr. Returns the file."""
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    path = Path(root) / LOG_DIR / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    top = logging.getLogger()
    for handler in [h for h in top.handlers if getattr(h, "_tuneline", False)]:
        top.removeHandler(handler)  # configured twice in one process (tests): one set of handlers
        handler.close()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(_FORMAT))
    to_file._tuneline = True  # type: ignore[attr-defined]
    top.addHandler(to_file)
    top.setLevel(logging.INFO)  # DEBUG from PIL, urllib3, sqlalchemy would bury the rest
    logging.getLogger("tuneline").setLevel(logging.DEBUG)
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.addFilter(lambda record: record.name == "tuneline" or record.name.startswith("tuneline."))
    to_terminal.setFormatter(_LevelPrefix("%(message)s"))
    to_terminal._tuneline = True  # type: ignore[attr-defined]
    top.addHandler(to_terminal)
    logging.captureWarnings(True)  # Python warnings (FutureWarning, UserWarning) -> the file
    _route_to_stage_log()
    return path


# A stage's terminal line for one of tuneline's records starts with its level: "warning: " (also what
# report.print_warning prints), "error: " for ERROR and above. An orchestrator that reads a stage's
# output (the Prefect flow) maps the prefix back to the level with `level_of`, so its log shows a
# warning at WARNING (a "Level: warning" filter keeps it), not at INFO.
LEVEL_PREFIXES = ((logging.ERROR, "error: "), (logging.WARNING, "warning: "))


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = next((text for level, text in LEVEL_PREFIXES if record.levelno >= level), "")
        return prefix + super().format(record)


def level_of(line: str) -> tuple[int, str]:
    """A stage's output line -> (logging level, the line without its level prefix); INFO for any other line."""
    for level, prefix in LEVEL_PREFIXES:
        if line.startswith(prefix):
            return level, line[len(prefix):]
    return logging.INFO, line


class _StageLogOnly(logging.Handler):
    """Hands a record to the stage's log file (configure's file handler) and to nothing else: no
    terminal, and no last-resort stderr print in a process that has no stage log (`tuneline check`)."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_tuneline", False) and isinstance(handler, logging.FileHandler):
                if record.levelno >= handler.level:
                    handler.handle(record)


def _route_to_stage_log() -> None:
    """The STAGE_LOG_ONLY loggers write to the stage log only (idempotent; imports nothing)."""
    for name in STAGE_LOG_ONLY:
        logger = logging.getLogger(name)
        logger.propagate = False  # torch's stderr handler sits on "torch"; the root's would print the rest
        if not any(isinstance(handler, _StageLogOnly) for handler in logger.handlers):
            logger.addHandler(_StageLogOnly())
    warnings.filterwarnings("ignore", message=_PEFT_TORCHAO_NOTE, category=UserWarning)


def quiet_libraries() -> None:
    """transformers and diffusers install their own stderr handlers when first used: remove them
    so their records reach the log file instead, and turn off diffusers' loading bars. Call where
    a model is about to be loaded (idempotent). Both, always: a diffusers pipeline imports
    transformers later, in from_pretrained, and it warns then ("requires torchvision"). Also sends
    the quantization libraries' chatter to the stage log only (STAGE_LOG_ONLY)."""
    _route_to_stage_log()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.disable_default_handler()
        library.enable_propagation()
    diffusers_logging.disable_progress_bar()
