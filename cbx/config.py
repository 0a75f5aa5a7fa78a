"""Typed configuration files shared by every layer: YAML parsing and the dataclass checker.

Experiment files (``cbx.lab.schema``) and training configs (``cbx.distill.config``) are both
YAML mapped onto frozen dataclasses; this module is the part they share, kept below both so
that ``cbx.distill`` does not reach up into ``cbx.lab`` for it.

* :func:`read_yaml_file` / :func:`load_yaml`: PyYAML's safe loader with YAML 1.2 floats
  (``1e-3`` is a number); a syntax error becomes a :class:`CbxError` naming the file, the line
  and the column.
* :func:`from_mapping`: build a dataclass from a mapping, rejecting unknown keys and wrong
  types with the key's path (``steps[1].params.group_size``) and the valid choices.

The checker is a small hand-written walk over dataclass type hints rather than pydantic:
the same function must also check the dataclasses that other layers own (the engine's
``SynthSettings``, each transform's config), whose tuple fields YAML gives as lists, and
pydantic's strict mode rejects those while its lax mode turns ``"4"`` into ``4``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cbx.errors import CbxError


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are mirrored. ``project=None``: one W&B project per results folder, named
    by :meth:`project_for` (so two studies never mix in one parallel-coordinates panel)."""

    backend: Literal["none", "wandb"] = "none"
    project: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline"] | None = None  # None: wandb's own setting (WANDB_MODE)

    def project_for(self, folder: str | Path) -> str:
        """The configured project, else ``cbx-<parent>-<folder>`` of the results folder
        (``~/work/study/runs`` -> ``cbx-study-runs``), reduced to characters W&B accepts."""
        if self.project:
            return self.project
        p = Path(folder).resolve()
        parts = [x for x in (p.parent.name, p.name) if x]
        name = "-".join(["cbx", *parts])
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        return name[:128]


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is float:
        return "a number"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to ``tp`` (lists -> tuples, mappings -> dataclasses) or raise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise CbxError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, path)
            except CbxError as e:
                errors.append(str(e))
        # A mapping that failed inside a dataclass arm has the more useful message.
        for msg in errors:
            if not msg.startswith(f"{path}: expected"):
                raise CbxError(msg)
        raise CbxError(f"{path}: expected {_describe(tp)}, got {_show(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise CbxError(f"{path}: expected null, got {_show(value)}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CbxError(f"{path}: expected {_describe(tp)}, got {_show(value)}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(tp):
            if len(value) != len(args):
                raise CbxError(f"{path}: expected a list of {len(args)} values, got {len(value)}")
            items = [_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_check(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise CbxError(f"{path}: expected a mapping, got {_show(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation this checker does not know: let the class validate it
        return value
    raise CbxError(f"{path}: expected {_describe(tp)}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def from_mapping(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a YAML mapping, checking keys and types; errors name ``path``."""
    where = path or "top level"
    if not isinstance(data, dict):
        raise CbxError(f"{where}: expected a mapping with keys {', '.join(_field_names(cls))}, got {_show(data)}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise CbxError(f"{_join(path, str(k))}: unknown key; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = _check(data[name], hints.get(name, Any), sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CbxError(f"{sub}: missing required key ({_describe(hints.get(name, Any))})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CbxError(f"{where}: {e}") from e


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    # typing.get_type_hints re-evaluates every string annotation on each call: cached, it was
    # 45% of the time to load a sweep of 8000 variants.
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser where installed: 10x faster on a large sweep), except that ``1e-3`` is a float (YAML 1.2) rather than the string
    YAML 1.1 makes of an exponent without a dot, which researchers write for learning rates."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text for experiment and training configs (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML of ``path``; :class:`CbxError` naming the file (and for a syntax error
    the line and column, 1-based, as editors count them) when it cannot be read or parsed."""
    path = Path(path)
    if path.is_dir():
        raise CbxError(f"{path}: is a folder; give the {what} itself")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CbxError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CbxError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise CbxError(f"{path}{yaml_error_where(e)}: not valid YAML ({yaml_error_problem(e)})") from None


def yaml_error_where(e: yaml.YAMLError) -> str:
    """``:LINE:COLUMN`` (1-based) of a YAML error, or ``""`` when PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def yaml_error_problem(e: yaml.YAMLError) -> str:
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    text = "; ".join(p for p in parts if p)
    return text or str(e).splitlines()[0]
