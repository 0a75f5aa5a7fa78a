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

Some transforms load a trained checkpoint (``cfm_student``'s student; a healed pruned model).
Their training is registered beside them (:func:`register_trainer`): a :class:`Trainer` says
which parameter names the checkpoint and how to load, identify, estimate and run the training
config that makes it, so an experiment step can name ``train: CONFIG.yaml`` instead of a
checkpoint and ``cbx run`` trains it on first use (:mod:`cbx.lab.recipes`). The registry lives
here, below both the training code (``cbx.distill``) and the runner (``cbx.lab``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

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

    for mod in ("cbx.compress.methods", "cbx.compress.prune_methods", "cbx.compress.libraries",
                "cbx.distill.transform"):
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


# ---------------------------------------------------------------- trainers


class Trainer(Protocol):
    """How the checkpoint of one transform is trained from a config file (train-on-demand).

    ``param``: the transform parameter that names the checkpoint folder. Every method raises
    :class:`CbxError` (one line) for bad input."""

    param: str
    checkpoint_dir: str  # where train() puts the checkpoint, relative to its out_dir

    def load_config(self, path: Path, overrides: dict[str, Any]) -> Any:
        """The typed training config of ``path`` with dotted-key ``overrides`` applied."""

    def resolved(self, config: Any) -> dict[str, Any]:
        """What determines the trained weights (no output folder, cadence or tracking): its
        hash keys the trained checkpoint."""

    def teacher(self, config: Any) -> str:
        """The model source the training starts from (its identity keys the checkpoint too)."""

    def estimate_seconds(self, config: Any, device: str) -> float | None:
        """A rough wall time for the whole training on ``device`` (None: no idea)."""

    def check_checkpoint(self, path: Path) -> None:
        """Refuse (CbxError) a folder that is not a complete checkpoint of this kind."""

    def train(self, config: Any, out_dir: Path, progress: bool) -> dict[str, Any]:
        """Train (resuming what ``out_dir`` holds); returns ``{"checkpoint": folder, "metrics":
        {...}}`` once the checkpoint is complete."""


_TRAINERS: dict[str, Trainer] = {}


def register_trainer(transform: str, trainer: Trainer) -> Trainer:
    """Declare how the checkpoint that ``transform``'s ``trainer.param`` names is trained."""
    if transform in _TRAINERS and _TRAINERS[transform] is not trainer:
        raise ValueError(f"trainer for {transform!r} registered twice")
    _TRAINERS[transform] = trainer
    return trainer


def get_trainer(transform: str) -> Trainer | None:
    """The trainer of ``transform`` (None when its checkpoints are not trained by the workbench)."""
    _load_builtin()
    return _TRAINERS.get(transform)


def trainable_transforms() -> list[str]:
    _load_builtin()
    return sorted(_TRAINERS)
