"""Typed YAML configs: every file under ``configs/`` is validated by a pydantic model.

Errors name the file, the key (dotted path) and, where the key takes a fixed set of values,
the allowed values. YAML is parsed by a ``yaml.SafeLoader`` (a config never executes anything) that also refuses
files over :data:`MAX_YAML_BYTES`, documents whose aliases expand to more than :data:`MAX_YAML_NODES` nodes (the
"billion laughs" bomb) and duplicate keys (YAML would keep the last one silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conceptsmith.validate import InputError, input_file

M = TypeVar("M", bound=BaseModel)

#: Device names a config or ``--device`` may give (``auto``: cuda when available, else mps, else cpu).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DtypeName = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and how to fix it."""


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(StrictModel):
    """``configs/models/*.yaml``: which pipeline to load and how (``load_pipeline`` takes the file or its name;
    an explicit ``dtype`` / ``device`` argument or CLI option overrides the file's)."""

    spec: str = Field(min_length=1, description="hub id, local directory, .safetensors file or builtin:<name>")
    dtype: DtypeName = "float32"
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")
    single_file_config: str | None = Field(None, description="local diffusers directory with the architecture of a single file")


class EditConfig(StrictModel):
    """``configs/erase/*.yaml`` and ``configs/customize/*.yaml``: a method and its hyper-parameters."""

    method: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


#: Largest config file read, and most nodes its document may expand to through aliases.
MAX_YAML_BYTES = 2**20
MAX_YAML_NODES = 100_000


class _Refused(Exception):
    """A YAML document :class:`_BoundedLoader` will not build: ``(message, mark)``."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with bounded alias expansion and no duplicate keys."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise _Refused(f"duplicate key {key!r} (first at line {first.start_mark.line + 1}); keep one of them",
                               key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes of the document under ``node`` with every alias expanded; refuses more than MAX_YAML_NODES."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _Refused("an alias refers to a node that contains it (a recursive document)", node.start_mark)
    open_nodes.add(key)
    children = [] if isinstance(node, yaml.ScalarNode) else node.value
    total = 1
    for child in children:
        for item in child if isinstance(child, tuple) else (child,):
            total += _expanded_size(item, sizes, open_nodes)
            if total > MAX_YAML_NODES:
                raise _Refused(f"its aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb); write the "
                               "values out or use fewer aliases", node.start_mark)
    open_nodes.discard(key)
    sizes[key] = total
    return total


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (:class:`_BoundedLoader`), with errors that name the file and the line."""
    path = Path(path)
    try:
        input_file(path, "Config file", max_bytes=MAX_YAML_BYTES)
        text = path.read_text(encoding="utf-8")
    except InputError as err:
        raise ConfigError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  (a SafeLoader)
    except _Refused as err:
        message, mark = err.args
        raise ConfigError(f"{path}: refused YAML at line {mark.line + 1}, column {mark.column + 1}: {message}.") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read; flatten it.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}. Fix the syntax (indentation, quotes, colons).") from err


def load_config(path: str | Path, model: type[M]) -> M:
    """Read ``path`` and validate it as ``model``."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}.")
    return validate(data, model, source=str(path))


def validate(data: dict[str, Any], model: type[M], source: str) -> M:
    """Validate ``data`` as ``model``; ``source`` names where it came from in error messages."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from err


def check_plugin_params(kind: str, name: str, lookup: Any, params: dict[str, Any]) -> None:
    """A registered plugin ``name`` (``lookup(name)`` raises a ``KeyError`` naming the known ones) whose ``Config``
    accepts ``params``; a ``ValueError`` in one line otherwise (``attack 'p4d' params: key 'stesp': unknown key``)."""
    try:
        config = lookup(name).Config
    except KeyError as err:
        raise ValueError(str(err)) from None
    try:
        config.model_validate(params)
    except ValidationError as err:
        problems = format_validation_error(err, name, config).splitlines()[1:]
        raise ValueError(f"{kind} '{name}' params: " + "; ".join(p.strip() for p in problems)) from None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    """One line per problem: ``file: key 'a.b': message (allowed: ...)``."""
    lines = [f"{source}: invalid {model.__name__}:"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_field_names(model, problem["loc"][:-1])))
            message = f"unknown key (allowed keys: {allowed})"
        elif problem["type"] == "literal_error":
            expected = problem.get("ctx", {}).get("expected", "")
            message = f"got {problem.get('input')!r}; allowed values: {expected}"
        lines.append(f"  key '{key}': {message}")
    return "\n".join(lines)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at ``loc``; best effort for the error message."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
    return list(getattr(current, "model_fields", {}))
