"""Typed configuration of a distillation run, loaded from YAML; every default is written here.

A config file has six sections (``teacher``, ``data``, ``student``, ``objective``, ``train``,
``tracking``), each a frozen dataclass below. Keys and types are checked by the same walker the
experiment files use (:func:`cbx.config.from_mapping`), so an unknown key, a wrong type or
a value outside a ``Literal`` is a :class:`CbxError` naming the file, the key's path
(``train.mixed_precision``) and the valid choices, before anything is written. The objective's
parameters are checked against the config class registered for the chosen objective
(:mod:`cbx.distill.objectives`), as transform parameters are in experiment files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from cbx.config import TrackingConfig, from_mapping, read_yaml_file, to_plain
from cbx.errors import CbxError


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "tiny"  # cbx.engine.model.load_model source: tiny, a Hub id or a local folder
    steps: int = 10  # the teacher's Euler steps (upstream default)
    cfg_rate: float = 0.7  # the teacher's CFG strength (upstream CFM_PARAMS.inference_cfg_rate)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"teacher.steps must be >= 1, got {self.steps}")
        if self.cfg_rate < 0:
            raise ValueError(f"teacher.cfg_rate must be >= 0, got {self.cfg_rate}")


@dataclass(frozen=True)
class DataConfig:
    dir: str | None = None  # teacher-data folder; None: <train.out_dir>/data
    # Voice prompts: names of offline voices (cbx.eval.assets.VOICES), audio file paths, or
    # "synthetic" (a deterministic harmonic test signal, no files needed).
    voices: tuple[str, ...] = ("allison", "diane")
    prompt_seconds: float = 2.0  # prompts are cut to at most this long (CFM cost grows with it)
    tokens: Literal["random", "audio"] = "random"  # random speech tokens, or real speech tokenized
    audio_clips: int = 64  # tokens: audio -> this many real clips (cbx.eval.assets), cycled
    min_tokens: int = 10  # speech tokens per utterance (25 per second), drawn uniformly
    max_tokens: int = 25
    n_train: int = 64
    n_heldout: int = 16
    shard_size: int = 32  # examples per shard (a shard is written atomically; resume skips it)
    batch_size: int = 8  # teacher batch while recording
    trajectory: bool = True  # also record the teacher's intermediate Euler states
    seed: int = 0

    def __post_init__(self):
        if not self.voices:
            raise ValueError("data.voices must name at least one voice")
        for name in ("n_train", "n_heldout", "shard_size", "batch_size", "min_tokens", "audio_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < self.min_tokens:
            raise ValueError(f"data.max_tokens ({self.max_tokens}) must be >= data.min_tokens ({self.min_tokens})")
        if self.prompt_seconds <= 0:
            raise ValueError(f"data.prompt_seconds must be > 0, got {self.prompt_seconds}")


@dataclass(frozen=True)
class StudentConfig:
    eval_steps: tuple[int, ...] = (1, 2)  # step counts evaluated against the teacher at equal steps
    default_steps: int = 2  # steps the checkpoint asks for when a transform does not say

    def __post_init__(self):
        if not self.eval_steps or any(s < 1 for s in self.eval_steps):
            raise ValueError(f"student.eval_steps must be positive integers, got {list(self.eval_steps)}")
        if self.default_steps < 1:
            raise ValueError(f"student.default_steps must be >= 1, got {self.default_steps}")


@dataclass(frozen=True)
class PruneStep:
    """One pruning step, as in an experiment's ``steps`` (a registered transform and its params)."""

    transform: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "endpoint"  # a registered objective: endpoint, intmeanflow, mixed
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/distill"
    max_steps: int = 200  # optimizer steps
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu"] = "auto"  # auto: what accelerate finds (CUDA when present)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50  # steps between evaluations on held-out data (0: only at the end)
    save_every: int = 50  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Pruning of the CFM estimator before the student is made from it (prune_depth, part: cfm):
    # the student is then a pruned few-step estimator, healed by the objective against the
    # unpruned teacher's endpoints (cbx.distill.student.pruned_estimator).
    prune: tuple[PruneStep, ...] = ()

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path(self.train.out_dir) / "data"

    def objective_config(self) -> Any:
        from cbx.distill.objectives import get_objective

        spec = get_objective(self.objective.name)
        return from_mapping(spec.config_cls, self.objective.params, "objective.params")

    def resolved(self) -> dict[str, Any]:
        """Plain dict with every default filled in, the objective's parameters included."""
        from cbx.compress.registry import build_config

        d = to_plain(self)
        d["objective"]["params"] = to_plain(self.objective_config())
        if self.prune:
            d["prune"] = [{"transform": s.transform, "params": to_plain(build_config(s.transform, s.params))}
                          for s in self.prune]
        else:  # no pruning: the record (and so every hash of it) is what it was before the key existed
            d.pop("prune")
        return d

    def training_fingerprint(self) -> str:
        """Hash of what determines the trained weights (not cadence, tracking or max_steps),
        so a resumed run can check it continues the same training."""
        d = without_cadence(self.resolved())
        d["train"].pop("max_steps")
        d["data"].pop("dir")
        return settings_hash(d)


# train: keys that say where and how often a run logs, evaluates and saves, not what it trains
TRAIN_CADENCE = ("out_dir", "log_every", "eval_every", "save_every", "keep_checkpoints")


def without_cadence(resolved: dict[str, Any]) -> dict[str, Any]:
    """A training config's plain record (distill or heal: ``resolved()``, changed in place)
    without ``tracking`` and the ``train`` cadence keys (:data:`TRAIN_CADENCE`): what its
    settings fingerprint and train-on-demand's identity of it are made from."""
    resolved.pop("tracking")
    for k in TRAIN_CADENCE:
        resolved["train"].pop(k)
    return resolved


def settings_hash(d: dict[str, Any]) -> str:
    """The 16-hex-digit fingerprint of a settings record (``trainer_state.json``'s ``fingerprint``)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def from_dict(data: dict[str, Any], where: str = "") -> DistillConfig:
    cfg = training_from_mapping(DistillConfig, data, where)
    try:
        cfg.objective_config()
    except CbxError as e:
        raise CbxError(f"{where + ': ' if where else ''}{e}") from None
    from cbx.compress.registry import build_config

    for i, st in enumerate(cfg.prune):
        at = f"{where + ': ' if where else ''}prune[{i}]"
        pc = build_config(st.transform, st.params, f"{at}.params")
        if st.transform != "prune_depth" or getattr(pc, "part", None) != "cfm":
            raise CbxError(f"{at}: a student is pruned in its CFM estimator only "
                           f"(transform prune_depth with params.part: cfm), got {st.transform}")
    if cfg.student.default_steps not in cfg.student.eval_steps:
        raise CbxError(f"student.default_steps ({cfg.student.default_steps}) must be one of "
                       f"student.eval_steps {list(cfg.student.eval_steps)}")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Config from a YAML file; ``overrides`` maps dotted keys (``train.out_dir``) to values."""
    return load_training_config(path, "teacher, data, student, objective, train, tracking", from_dict, overrides)


def training_from_mapping(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """A training config (distill or heal: dataclass ``cls``) from its mapping, checked by
    :func:`cbx.config.from_mapping`; ``tracking: none`` / ``tracking: wandb`` is short for
    ``tracking: {backend: ...}``."""
    if isinstance(data.get("tracking"), str):
        data = {**data, "tracking": {"backend": data["tracking"]}}
    return from_mapping(cls, data, where)


def load_training_config(path: str | Path, expected: str, from_dict: Callable[[dict[str, Any]], Any],
                         overrides: dict[str, Any] | None = None) -> Any:
    """A training config (distill or heal) from a YAML file: its mapping
    (:func:`read_config_mapping`, ``overrides`` applied) checked by ``from_dict``, whose refusal
    is prefixed with the file's path."""
    path = Path(path)
    data = read_config_mapping(path, expected, overrides)
    try:
        return from_dict(data)
    except CbxError as e:
        raise CbxError(f"{path}: {e}") from None


def read_config_mapping(path: Path, expected: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mapping a training config file holds (an empty file: ``{}``), with ``overrides``
    (dotted keys such as ``train.out_dir``) applied; ``expected`` names the top-level keys
    in the error for a file that holds something else."""
    data = read_yaml_file(path, "training config")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CbxError(f"{path}: expected a mapping with keys {expected}")
    for dotted, value in (overrides or {}).items():
        cur = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
            if not isinstance(cur, dict):
                raise CbxError(f"{path}: cannot override {dotted}: {k} is not a mapping")
        cur[keys[-1]] = value
    return data

