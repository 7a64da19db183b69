"""Stage `models`: the identity of every model the pipeline uses, as a file later stages depend on.

DVC sees a stage as changed only through its deps; a model replaced in place at the same path
would go unseen. This stage runs on every `dvc repro` (always_changed) and writes the content
identity of each referenced model; its output changes only when a model does, and then DVC (and
the flow's cache keys) rerun what depends on it.
"""

# The modules that decide the identities (tuneline.core.codeversion): tiny models are built by code.
CODE = ("stages/models/stage.py", "models/ref.py", "models/training_adapter.py", "models/base.py", "models/contracts.py",
        "tiny")
