"""The params root's building blocks: the `Section` base every params section derives from,
`ParamsError`, shared value types, and validation that names every bad key.

Stage sections live beside their stages (`tuneline.stages.<name>.config`); `tuneline.config`
composes them into `Params`. Nothing here imports a stage.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
)


class ParamsError(ValueError):
    """Bad configuration, found before any compute. The message names the key."""


def _field_kind(annotation: Any) -> type | None:
    """int, float or bool when a field holds exactly that (or Optional of it), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation if annotation in (int, float, bool) else None


class Section(BaseModel):
    """Unknown keys are errors, models are immutable, defaults are validated too.

    Numbers and switches are strict where lax coercion hides a mistake: `true` is not 1
    (`num_steps: true`), and `1` or "yes" is not a switch. Strings of numbers stay accepted
    for numbers: YAML reads `1e-4` as a string.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers_and_switches(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _field_kind(cls.model_fields[info.field_name].annotation) if info.field_name else None
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if kind is bool and not isinstance(value, bool) and value is not None:
            raise ValueError(f"expected true or false, got {value!r}")
        return value


# --- shared value types ------------------------------------------------------------------

_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_resolution(value: Any) -> tuple[int, int]:
    """'1024x768', [1024, 768] or 1024 (square) -> (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        match = _RESOLUTION.match(value)
        if not match:
            raise ValueError(f"expected 'WIDTHxHEIGHT' such as '1024x768', got {value!r}")
        return (int(match.group(1)), int(match.group(2)))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected 'WIDTHxHEIGHT' such as '1024x768', got {value!r}")


def format_resolution(value: tuple[int, int]) -> str:
    return f"{value[0]}x{value[1]}"


Resolution = Annotated[
    tuple[int, int], BeforeValidator(parse_resolution), PlainSerializer(format_resolution, return_type=str)
]


def _check_color(value: str) -> str:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError as error:
        raise ValueError(f"not a colour: {value!r} (use a name like 'white' or '#rrggbb')") from error
    return value


Color = Annotated[str, BeforeValidator(_check_color)]


# --- validation with messages that name the key ------------------------------------------


def _nested_models(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """Models inside an annotation: (model, is_list) for Model, Optional[Model], list[Model]."""
    found: list[tuple[type[BaseModel], bool]] = []
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_nested_models(arg))
    elif origin is list:
        found.extend((model, True) for model, _ in _nested_models(typing.get_args(annotation)[0]))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append((annotation, False))
    return found


def unknown_key_problems(data: Any, model: type[BaseModel], where: str = "") -> list[str]:
    """One message per unknown key, with the closest valid key and the allowed ones."""
    if not isinstance(data, dict):
        return []
    problems = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(
                f"{where}{key}: unknown key.{hint} Allowed here: {', '.join(fields)}."
            )
            continue
        for sub_model, is_list in _nested_models(fields[key].annotation):
            if is_list and isinstance(value, list):
                for index, element in enumerate(value):
                    label = element.get("name", index) if isinstance(element, dict) else index
                    problems.extend(unknown_key_problems(element, sub_model, f"{where}{key}[{label}]."))
            elif not is_list:
                problems.extend(unknown_key_problems(value, sub_model, f"{where}{key}."))
    return problems


def _location(loc: tuple[Any, ...], data: Any) -> str:
    """'datasets[faces].repeats' from pydantic's ('datasets', 0, 'repeats')."""
    text, node = "", data
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and isinstance(node[part], dict) else None
            text += f"[{name if name is not None else part}]"
        else:
            text += f".{part}" if text else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return text


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one silently (`lr` twice, and the first is ignored)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def read_params_file(path: Path | str) -> dict[str, Any]:
    """A params file's mapping; ParamsError when it is missing, not YAML, or not a mapping."""
    import yaml

    path = Path(path)
    try:
        data = load_yaml(path.read_text("utf-8"))
    except FileNotFoundError as error:
        raise ParamsError(f"{path}: file not found") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


Model = TypeVar("Model", bound=BaseModel)


def validate_model(model: type[Model], data: Any, source: str) -> Model:
    """Validate a mapping against `model`; raise ParamsError naming every bad key at once."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    problems = unknown_key_problems(data, model)
    try:
        validated = model.model_validate(data)
    except ValidationError as error:
        for item in error.errors():
            if item["type"] == "extra_forbidden":  # already named above, with a suggestion
                continue
            loc = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
            # A model-level check's input is a whole section (or the whole file): its message names
            # the keys; repeating the input would print kilobytes.
            shown = item["type"] != "missing" and not isinstance(item["input"], (dict, list))
            got = f" (got {item['input']!r})" if shown else ""
            message = item["msg"].removeprefix("Value error, ")
            # A check of the whole file names its keys in its message.
            problems.append(f"{_location(loc, data)}: {message}{got}" if loc else message)
    if not problems:
        return validated
    raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
