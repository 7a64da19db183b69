"""The families' renderers and exporters are loaded by name (Family.renderer, Family.exporter), so a stage's
imports do not show them: each family lists its modules per stage (Family.code), and the CODE of every stage
that loads them must cover all that shapes results from there (dvc.yaml deps cover CODE: test_layout.py)."""

from __future__ import annotations

import importlib

import pytest
from test_layout import _imports, _module_name, _shaping_closure


@pytest.mark.parametrize("stage, part", [("render", "renderer"), ("export", "exporter"),
                                         ("train", "renderer")])  # train: live samples
def test_what_a_family_loads_by_name_is_in_the_stage_code(stage, part):
    from tuneline.core.codeversion import code_files
    from tuneline.models.family import FAMILIES

    graph = _imports()
    covered = {_module_name(path) for path in code_files(importlib.import_module(f"tuneline.stages.{stage}").CODE)}
    for family in FAMILIES.values():
        module = getattr(family, part).split(":")[0]
        closure = _shaping_closure(graph, module)
        assert module in closure, f"{family.name}: {module} is not a module of the package"
        missing = sorted(closure - covered)
        assert not missing, f"stage {stage}: CODE misses {missing}, which {family.name}'s {part} uses (Family.code)"


def test_render_and_export_ask_the_family_and_never_name_one():
    """No family name, no branch on one, no import of a family package under the render and export stages."""
    import re
    from pathlib import Path

    from tuneline.models.family import FAMILIES

    package = Path(__file__).resolve().parents[1] / "src" / "tuneline" / "stages"
    names = [re.escape(n) for f in FAMILIES.values() for n in (f.name, f.title)]
    pattern = re.compile("|".join([*names, r"family ==", r"family !=", r"\.name =="]), re.IGNORECASE)
    for stage in ("render", "export"):
        for path in sorted((package / stage).glob("*.py")):
            hits = [line for line in path.read_text("utf-8").splitlines() if pattern.search(line)]
            assert not hits, f"{path.name}: {hits}"
