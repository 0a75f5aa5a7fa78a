"""Registry of compression transforms: a config dataclass plus one function ``model -> model``.

Follows torchao's ``register_quantize_module_handler`` and llm-compressor's modifiers: each
method is a frozen config dataclass (validated in ``__post_init__``) registered under a name
with exactly one transform function. Experiment files name the method and give its
parameters; :func:`build_config` turns that mapping into the typed config and rejects unknown
keys with the valid choices, and :func:`apply_transforms` runs an ordered list of them.

A transform receives a :class:`cbx.engine.model.ChatterboxModel` and returns it (modified in
place or replaced). Modules are chosen by name patterns (``fnmatch`` globs over
``named_modules()`` names relative to the model, e.g. ``t3.tfmr.layers.*.mlp.*``) with an
explicit ``ignore`` list; upstream code is never edited.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from cbx.errors import CbxError


@dataclass(frozen=True)
class TransformSpec:
    name: str
    config_cls: type
    fn: Callable[[Any, Any], Any]
    doc: str


_REGISTRY: dict[str, TransformSpec] = {}


def register_transform(name: str, config_cls: type):
    """Decorator: ``@register_transform("int8_weight_only", Int8WeightOnlyConfig)``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} must be a dataclass")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"transform {name!r} registered twice")
        _REGISTRY[name] = TransformSpec(name, config_cls, fn, (fn.__doc__ or "").strip())
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the method modules registers them. Kept here so callers need one import.
    import importlib

    for mod in ("cbx.compress.methods", "cbx.compress.prune_methods", "cbx.distill.transform"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def registered() -> dict[str, TransformSpec]:
    _load_builtin()
    return dict(_REGISTRY)


def get_transform(name: str) -> TransformSpec:
    reg = registered()
    if name not in reg:
        raise CbxError(f"unknown transform {name!r}; valid choices: {', '.join(sorted(reg)) or '(none)'}")
    return reg[name]


def build_config(name: str, params: dict[str, Any] | None, where: str = "params") -> Any:
    """Typed config from a plain mapping; unknown keys and bad values name ``where``."""
    spec = get_transform(name)
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise CbxError(
            f"{where}: unknown key(s) {', '.join(unknown)} for transform {name!r}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    try:
        return spec.config_cls(**params)
    except (TypeError, ValueError) as e:
        raise CbxError(f"{where}: invalid parameters for transform {name!r}: {e}") from e


def apply_transforms(model: Any, steps: Iterable[tuple[str, Any]]) -> Any:
    """Apply ``(name, config)`` pairs in order; each returns the (possibly new) model."""
    from cbx.compress.kernels import name_modules

    for name, config in steps:
        model = get_transform(name).fn(model, config)
    name_modules(model)  # kernel fallbacks name their module (cbx.compress.kernels)
    return model


def select_modules(
    root: torch.nn.Module,
    targets: Iterable[str],
    ignore: Iterable[str] = (),
    types: tuple[type, ...] | None = None,
) -> list[tuple[str, torch.nn.Module]]:
    """Modules under ``root`` whose qualified name matches a target glob and no ignore glob.

    ``types`` restricts the match to module classes (e.g. ``nn.Linear``). The order is that of
    ``named_modules()``, so the result is deterministic.
    """
    targets, ignore = list(targets), list(ignore)
    out = []
    for name, mod in root.named_modules():
        if not name:
            continue
        if types is not None and not isinstance(mod, types):
            continue
        if any(fnmatch.fnmatchcase(name, t) for t in targets) and not any(
            fnmatch.fnmatchcase(name, i) for i in ignore
        ):
            out.append((name, mod))
    return out
