"""The library's layout: every stage has one shape, the light packages stay light, no import
circles, and the stage registry, dvc.yaml and stages/ agree."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "tuneline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (at the top or inside functions)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in ("flows", "stages"):
                    found.add(target)  # the project's app folders: never imported by the library
                elif target in modules and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def test_every_stage_has_the_same_shape():
    from tuneline.orchestration.registry import STAGES

    for stage in STAGES:
        folder = PACKAGE / "stages" / stage.name
        assert (folder / "config.py").is_file() and (folder / "stage.py").is_file(), stage.name
        source = ast.parse((folder / "stage.py").read_text("utf-8"))
        run = next(node for node in source.body if isinstance(node, ast.FunctionDef) and node.name == "run")
        assert [a.arg for a in run.args.args[:2]] == ["params", "root"], stage.name
        assert "tracker" in [a.arg for a in run.args.kwonlyargs], stage.name
    assert sorted(p.name for p in (PACKAGE / "stages").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(stage.name for stage in STAGES)


def test_core_and_stage_configs_import_no_heavy_library():
    code = ("import sys, tuneline.core, tuneline.stages, tuneline.config, tuneline.orchestration.registry\n"
            "import tuneline.core.store, tuneline.core.manifest, tuneline.core.report, tuneline.core.tracking.tracker\n"
            "print([m for m in ('torch', 'diffusers', 'transformers', 'mlflow', 'prefect', 'peft', 'accelerate')"
            " if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# What models/ and train/ never import (at the top or inside a function): the stages, the whole
# params root (tuneline.config: a stage's config section is passed instead) and what runs stages.
ABOVE_MODELS_AND_TRAIN = ("tuneline.stages", "tuneline.config", "tuneline.orchestration", "tuneline.cli",
                          "tuneline.preflight", "tuneline.demo")


def _is_above_models_and_train(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in ABOVE_MODELS_AND_TRAIN)


def test_models_and_train_import_nothing_above_them():
    """Checked on the real tree, and the check itself on imports it must catch and must let pass."""
    graph = _imports()
    above = {name: sorted(t for t in targets if _is_above_models_and_train(t)) for name, targets in graph.items()
             if name.startswith(("tuneline.models", "tuneline.train"))}
    assert len(above) > 20 and "tuneline.train.trainer" in above and "tuneline.models.sdxl.adapter" in above
    assert {name: found for name, found in above.items() if found} == {}
    caught = ["tuneline.stages.bucket.aspect", "tuneline.stages", "tuneline.config", "tuneline.config.Params",
              "tuneline.orchestration.registry", "tuneline.cli", "tuneline.preflight"]
    allowed = ["tuneline.core.params", "tuneline.models.config", "tuneline.train.config", "tuneline.configuration",
               "tuneline.stagesx"]
    assert [m for m in caught if not _is_above_models_and_train(m)] == []
    assert [m for m in allowed if _is_above_models_and_train(m)] == []


def test_no_import_circle_and_layers_point_down():
    graph = _imports()
    for name, targets in graph.items():
        assert not any(t.split(".")[0] in ("flows", "stages") for t in targets), f"{name} imports {targets}"
        if name.startswith("tuneline.core"):
            bad = [t for t in targets if not t.startswith("tuneline.core")]
            assert not bad, f"core module {name} imports {bad}"
        if name.startswith("tuneline.stages"):
            bad = [t for t in targets if t.startswith(("tuneline.orchestration", "tuneline.cli"))]
            assert not bad, f"stage module {name} imports {bad}"
        if name.startswith(("tuneline.models", "tuneline.train")):
            bad = [t for t in targets if _is_above_models_and_train(t)]
            assert not bad, f"{name} imports {bad}: models/ and train/ sit below the stages and the params root"
    # Depth-first search for a cycle; report it as a path.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target in graph and target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_registry_dvc_yaml_and_entry_points_agree():
    from tuneline.orchestration.registry import STAGES
    from tuneline.orchestration.spec import load_stage_specs

    specs = {spec.name: spec for spec in load_stage_specs(REPO)}
    assert list(specs) == [stage.name for stage in STAGES]
    document = yaml.safe_load((REPO / "dvc.yaml").read_text("utf-8"))
    for stage in STAGES:
        spec = specs[stage.name]
        assert spec.cmd == f"python -m stages.{stage.name}"
        assert (REPO / "stages" / f"{stage.name}.py").is_file()
        assert stage.writes in spec.outs
        assert set(stage.reads) <= set(spec.data_deps)
        assert f"src/tuneline/stages/{stage.name}" in spec.code_deps
        for dep in spec.code_deps:
            assert (REPO / dep).exists(), f"{stage.name}: code dep {dep} does not exist"
        assert f"metrics/{stage.name}.json" in json.dumps(document["stages"][stage.name].get("metrics"))


# Modules that cannot change what a stage produces: params models (their values, defaults
# included, are in every key), bookkeeping, display, locking, tracking, orchestration. Their
# imports are not followed. Tiny models count through the content of the files they build.
# The ingest stage's run rebuilds its output from the stored probe records every run (probe.py makes them;
# memo.py keeps a copy of them, keyed by content, for reading in one pass).
# The caption stage's edits module picks a hand edit over the stored model caption when the output
# is written; the store holds model captions only. The latents stage's output/report module rebuilds the output folder from the store every run,
# its prompts module only picks which prompt texts its text cache encodes (text.py and keys.py make
# them) and writes their index, and the text-cache rule only decides whether text items are made and
# used: none decides a stored item's bytes or key (the train stage's CODE covers the rule with all of
# train/; the render stage's CODE covers the prompts file and the index reader).
NOT_RESULT_SHAPING = ("tuneline.config", "tuneline.preflight", "tuneline.cli", "tuneline.core.params",
                      "tuneline.core.fsutil", "tuneline.core.store", "tuneline.core.manifest", "tuneline.core.report",
                      "tuneline.core.parallel", "tuneline.core.layout", "tuneline.core.lock", "tuneline.core.logs",
                      "tuneline.core.stops", "tuneline.core.packs",
                      "tuneline.core.codeversion", "tuneline.core.tracking", "tuneline.orchestration", "tuneline.tiny",
                      "tuneline.stages.ingest.stage", "tuneline.stages.ingest.memo", "tuneline.stages.latents.output", "tuneline.stages.latents.prompts",
                      "tuneline.stages.caption.edits", "tuneline.stages.caption.output", "tuneline.stages.bucket.output",
                      "tuneline.train.cached_text")


def _exempt(module: str) -> bool:
    return (module.endswith(".config") or module.count(".") <= 2 and not module.endswith(".stage")
            and (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file()  # a package's __init__
            or any(module == m or module.startswith(m + ".") for m in NOT_RESULT_SHAPING))


def _shaping_closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules that could shape what `start` (a stage module) stores. The start is followed even
    when it is exempt itself (a stage whose run only assembles its output: ingest's), and then left out."""
    seen, stack = set(), [start]
    while stack:
        module = stack.pop()
        if module in seen or module not in graph or (_exempt(module) and module != start):
            continue
        seen.add(module)
        stack.extend(graph[module])
    return seen - {start} if _exempt(start) else seen


def test_every_module_that_shapes_a_stages_results_is_in_its_code_version_and_dvc_deps():
    import importlib

    from tuneline.core.codeversion import code_files
    from tuneline.orchestration.registry import STAGES

    graph = _imports()
    document = yaml.safe_load((REPO / "dvc.yaml").read_text("utf-8"))
    for stage in STAGES:
        code = importlib.import_module(f"tuneline.stages.{stage.name}").CODE
        covered = {_module_name(path) for path in code_files(code)}
        missing = sorted(_shaping_closure(graph, stage.module) - covered)
        assert not missing, f"stage {stage.name}: CODE misses {missing} (or list them as not result-shaping)"
        deps = [d for d in document["stages"][stage.name]["deps"] if isinstance(d, str)]
        for path in code:
            full = f"src/tuneline/{path}"
            assert any(full == d or full.startswith(d.rstrip("/") + "/") for d in deps), \
                f"dvc.yaml stage {stage.name}: {full} is in its CODE but not in its deps"


def test_a_code_change_changes_the_item_keys(tmp_path, monkeypatch):
    from tuneline.core import codeversion

    folder = tmp_path / "tuneline"
    (folder / "stages").mkdir(parents=True)
    (folder / "stages" / "a.py").write_text("X = 1\n")
    (folder / "helper.py").write_text("Y = 1\n")
    monkeypatch.setattr(codeversion, "PACKAGE", folder)
    codeversion.code_version.cache_clear()
    before = codeversion.code_version(("stages", "helper.py"))
    (folder / "helper.py").write_text("Y = 2\n")
    codeversion.code_version.cache_clear()
    assert codeversion.code_version(("stages", "helper.py")) != before
    codeversion.code_version.cache_clear()
