"""The stages as dvc.yaml declares them: one source of truth for the order, the params
subset each stage reads, its code and data deps, and its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.orchestration.registry import STAGE_NAMES

# Deps under these folders are the stage's code; everything else is data.
CODE_PREFIXES = ("src/", "stages/", "flows/")


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str
    params: tuple[str, ...]           # dotted keys of params.yaml the stage reads
    code_deps: tuple[str, ...]        # files or folders, relative to the root
    data_deps: tuple[str, ...]
    outs: tuple[str, ...]             # cached outputs (what a cache hit must find in place)
    persistent_outs: tuple[str, ...] = field(default=())  # persist/cache: false (checkpoints): never part of a key
    always_changed: bool = False  # dvc.yaml `always_changed`: runs every time, never a cache hit


def _path_and_options(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, dict):
        (path, options), = entry.items()
        return str(path), dict(options or {})
    return str(entry), {}


def _param_keys(entries: list[Any]) -> tuple[str, ...]:
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, dict):  # {params_file: [keys]}: only params.yaml is ours
            for _, listed in entry.items():
                keys.extend(str(k) for k in listed or [])
        else:
            keys.append(str(entry))
    return tuple(keys)


def _is_code(path: str) -> bool:
    return path.startswith(CODE_PREFIXES) or path.endswith(".py")


def _topological(specs: list[StageSpec]) -> list[StageSpec]:
    """Order by data flow (a stage after the producers of its deps). Ties follow the CLI's
    stage registry's order (export reads the renders), then dvc.yaml order."""
    preferred = {name: index for index, name in enumerate(STAGE_NAMES)}
    specs = sorted(specs, key=lambda s: preferred.get(s.name, len(preferred)))  # stable: dvc.yaml order otherwise
    producer = {out: spec.name for spec in specs for out in spec.outs + spec.persistent_outs}
    needs = {spec.name: {producer[d] for d in spec.data_deps if d in producer and producer[d] != spec.name}
             for spec in specs}
    ordered: list[StageSpec] = []
    done: set[str] = set()
    while len(ordered) < len(specs):
        ready = [s for s in specs if s.name not in done and needs[s.name] <= done]
        if not ready:
            cycle = sorted(set(needs) - done)
            raise ValueError(f"dvc.yaml: stages {cycle} depend on each other in a cycle")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def load_stage_specs(root: Path | str = ".") -> list[StageSpec]:
    """The stages of root/dvc.yaml in execution order."""
    import yaml

    path = Path(root) / "dvc.yaml"
    document = yaml.safe_load(path.read_text("utf-8")) or {}
    specs = []
    for name, stage in (document.get("stages") or {}).items():
        if "foreach" in stage or "matrix" in stage:
            raise ValueError(f"{path}: stage {name!r}: foreach/matrix stages are not supported by the flow")
        deps = [_path_and_options(d)[0] for d in stage.get("deps") or []]
        outs, persistent = [], []
        for entry in stage.get("outs") or []:
            out, options = _path_and_options(entry)
            (persistent if options.get("cache") is False else outs).append(out)
        specs.append(StageSpec(
            name=name,
            cmd=str(stage.get("cmd", "")),
            params=_param_keys(stage.get("params") or []),
            code_deps=tuple(d for d in deps if _is_code(d)),
            data_deps=tuple(d for d in deps if not _is_code(d)),
            outs=tuple(outs),
            persistent_outs=tuple(persistent),
            always_changed=bool(stage.get("always_changed", False)),
        ))
    return _topological(specs)
