"""Stage `export`: files other tools load.

- stage: the stage function (files, model card, copies); the trained family's exporter (Family.exporter)
  says which files there are and writes them
- metadata: the code provenance every file's header carries

Importing this package is instant: torch and diffusers load inside the functions that need them.
"""

from tuneline.models.family import FAMILIES

# The modules that decide the exported files (tuneline.core.codeversion); dvc.yaml declares them. The
# families' exporters are loaded by name: each family lists its modules (Family.code["export"]).
CODE = ("stages/export/stage.py", "stages/export/metadata.py", "models/export.py", "models/base.py", "models/contracts.py", "core/device.py",
        "models/family.py", "models/loading.py", "models/quantize.py", "models/ref.py", "models/single_file.py", "train/output.py",
        "stages/render/embeds.py",
        "stages/render/generate.py", "stages/render/prompts.py", "stages/render/samplers.py", "core/tensorfile.py",
        "models/variant.py", "models/lycoris.py",
        *(path for family in FAMILIES.values() for path in family.code.get("export", ())))
