"""Params overrides, the way `dvc exp run -S train.lr=1e-4` sets them, and the typed form
model the Prefect deployment shows.

    params = apply_overrides(load_yaml("params.yaml"), {"train.lr": 1e-4, "train.num_steps": 50})

Overrides are merged into the params.yaml mapping and validated by `validate_params`
before anything runs, so a typo gets the same message as in params.yaml itself.

A null never overrides: the Prefect UI's form sends null for every field left empty, and
an empty field keeps params.yaml's value. To set a field to null for one run, name it in
`set_to_null` (`{"set_to_null": ["model.vae"]}`; on the command line `-S model.vae=null`).
"""

from __future__ import annotations

import copy
import json
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from tuneline.config import Params, validate_params
from tuneline.core.params import ParamsError, read_params_file
from tuneline.core.fsutil import atomic_write_text, digest_json


def expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1, "train": {"seed": 2}} -> {"train": {"lr": 1, "seed": 2}}."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], expand_dotted(value))
        else:
            node[leaf] = expand_dotted(value) if isinstance(value, Mapping) else value
    return nested


def _merge(base: Any, update: Any) -> Any:
    """Mappings merge key by key; anything else (lists included, like DVC) is replaced."""
    if isinstance(base, dict) and isinstance(update, Mapping):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


SET_TO_NULL = "set_to_null"


def _without_nulls(value: Any) -> Any:
    """Drop null values at every depth (in lists' mappings too): an empty form field keeps params.yaml.
    An object whose fields are all null (a section the form expanded and nobody touched) goes too, so
    it does not add an empty section where params.yaml has none; an object posted empty stays."""
    if isinstance(value, Mapping):
        kept = {}
        for key, item in value.items():
            cleaned = _without_nulls(item)
            if item is None or (isinstance(item, Mapping) and item and not cleaned):
                continue
            kept[key] = cleaned
        return kept
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _null_keys(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(k, str) for k in value):
        raise ParamsError(f"overrides.{SET_TO_NULL}: expected a list of dotted keys such as ['model.vae'], "
                          f"got {value!r}")
    return [key.strip() for key in value if key.strip()]


def overrides_dict(overrides: Any) -> dict[str, Any]:
    """The form model, a nested dict or a dict of dotted keys -> a nested dict. Nulls are
    dropped; the keys listed in `set_to_null` are set to None."""
    if overrides is None:
        return {}
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(mode="json", exclude_unset=True)
    if not isinstance(overrides, Mapping):
        raise ParamsError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    overrides = dict(overrides)
    nulls = _null_keys(overrides.pop(SET_TO_NULL, None))
    nested = expand_dotted(_without_nulls(overrides))
    return _merge(nested, expand_dotted({key: None for key in nulls})) if nulls else nested


def apply_overrides(data: Mapping[str, Any], overrides: Any, source: str = "params.yaml") -> tuple[dict[str, Any], Params]:
    """Merge overrides into a params mapping and validate; raise ParamsError naming bad keys."""
    merged = _merge(dict(data or {}), overrides_dict(overrides))
    label = f"{source} with overrides" if overrides else source
    return merged, validate_params(merged, label)


def load_with_overrides(params_path: Path | str, overrides: Any = None) -> tuple[dict[str, Any], Params]:
    return apply_overrides(read_params_file(params_path), overrides, str(params_path))


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """`-S key=value` arguments (as `dvc exp run -S` takes them: the value read as YAML) -> an
    overrides mapping; `key=null` goes to set_to_null. ParamsError for an item without `=`."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"-S {item!r}: expected KEY=VALUE, like -S train.lr=1e-4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ParamsError(f"-S {item!r}: the value is not valid YAML ({error})") from None
        if parsed is None:  # `-S model.vae=null` means null; a null in an override map means "keep"
            overrides.setdefault(SET_TO_NULL, []).append(key.strip())
        else:
            overrides[key.strip()] = parsed
    return overrides


def override_args(overrides: Any) -> list[str]:
    """The overrides as `-S key=value` arguments of `python -m flows.pipeline` (values as JSON,
    which `-S` reads as YAML; a key set to null as `key=null`)."""
    args: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                walk(value, f"{prefix}{key}.")
            else:
                args.extend(["-S", f"{prefix}{key}={json.dumps(value, ensure_ascii=False)}"])

    walk(overrides_dict(overrides), "")
    return args


def write_params_file(data: Mapping[str, Any], folder: Path) -> Path:
    """Write merged params where the stage subprocesses read them; named by content."""
    import yaml

    path = Path(folder) / f"params-{digest_json(dict(data))[:16]}.yaml"
    if not path.is_file():
        atomic_write_text(path, "# params.yaml with the flow's overrides applied (generated)\n"
                          + yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True))
    return path


# --- the form: Params with every field optional ----------------------------------------

def _optional_annotation(annotation: Any) -> Any:
    """Section models become their all-optional twins; everything else keeps its type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        args = tuple(_optional_annotation(a) for a in typing.get_args(annotation))
        return typing.Union[args]  # type: ignore[return-value]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not Params:
        return overrides_model(annotation)
    return annotation


class _Form(BaseModel):
    # Unknown keys pass through to validate_params, which names them with a suggestion.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _dotted(cls, data: Any) -> Any:
        return expand_dotted(data) if isinstance(data, Mapping) else data


def _constraints(info: FieldInfo) -> list[Any]:
    """A field's constraints (bounds, multiple_of, lengths, pattern: annotated_types metadata, which
    pydantic writes into the JSON schema as minimum, exclusiveMinimum, multipleOf, ...), without its
    validators: those may not take the form's null (empty = keep params.yaml), and the flow validates
    the merged params with all of them anyway. Enums are Literal types: the annotation keeps them."""
    from annotated_types import BaseMetadata

    return [item for item in info.metadata if isinstance(item, BaseMetadata)]


def _in_form_order(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The fields of `model`; for Params, the stages' sections in pipeline order (model first, as the
    models stage), after the plain settings (store_dir, datasets, ...) and before the other sections."""
    items = list(model.model_fields.items())
    if model is not Params:
        return items
    from tuneline.orchestration.registry import STAGE_NAMES

    order = {"model" if name == "models" else name: index for index, name in enumerate(STAGE_NAMES)}

    def rank(item: tuple[str, FieldInfo]) -> tuple[int, int]:
        name, info = item
        if name in order:
            return 1, order[name]
        section = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        return (2 if section else 0), 0

    return sorted(items, key=rank)


@lru_cache(maxsize=None)
def overrides_model(model: type[BaseModel] = Params) -> type[BaseModel]:
    """`model` with every field optional (default None = keep params.yaml's value), same
    descriptions, types and constraints: the parameter form of the Prefect deployment, whose
    JSON schema lets the UI and the server reject an out-of-range value before a run starts."""
    fields: dict[str, Any] = {}
    for name, info in _in_form_order(model):
        annotation = info.annotation
        if name == "datasets":  # a list replaces the list: its elements keep their required keys
            new = annotation
        else:
            new = _optional_annotation(annotation)
        # Constraints on an Optional apply to its non-null branch (null stays allowed), as in Params.
        constraints = _constraints(info)
        form_type = Annotated[(Optional[new], *constraints)] if constraints else Optional[new]
        fields[name] = (form_type, Field(None, description=info.description, title=info.title,
                                         examples=info.examples, json_schema_extra=info.json_schema_extra))
    if model is Params:
        fields[SET_TO_NULL] = (Optional[list[str]], Field(
            None, title="Set to null",
            description="Dotted keys to set to null for this run (e.g. model.vae). Empty fields never "
                        "override: they keep params.yaml's value."))
    title = "ParamsOverrides" if model is Params else f"{model.__name__}Overrides"
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    return create_model(title, __base__=_Form, __doc__=f"{doc} Empty fields keep params.yaml's value.".strip(),
                        **fields)


def with_current_values(schema: dict[str, Any], values: Mapping[str, Any], root: str = "ParamsOverrides") -> None:
    """Add params.yaml's current value to each field's description in a form schema (JSON schema with
    `definitions`), in place: the form cannot prefill them (a prefilled field would override params.yaml
    from then on), so an empty field says what it keeps. A section definition used in two places (the two
    text encoders') is copied, so that each place shows its own values."""
    definitions = schema["definitions"]
    used: set[str] = set()

    def walk(name: str, current: Mapping[str, Any]) -> None:
        used.add(name)
        for key, prop in definitions[name]["properties"].items():
            if key not in current:
                continue
            value = current[key]
            refs = [option for option in prop.get("anyOf", [prop]) if "$ref" in option]
            if refs and isinstance(value, Mapping):
                target = refs[0]["$ref"].rsplit("/", 1)[-1]
                if target in used:  # a second use: a copy of its own
                    copy_name = f"{target}_{name}_{key}"
                    definitions[copy_name] = copy.deepcopy(definitions[target])
                    refs[0]["$ref"] = f"#/definitions/{copy_name}"
                    target = copy_name
                walk(target, value)
                continue
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 120 else shown[:119] + "…"
            prop["description"] = f"{prop.get('description') or ''} (params.yaml: {shown})".strip()

    walk(root, values)
