"""Experiment files -> typed, validated experiments.

An experiment file is YAML: either one experiment (its top-level keys are the fields of
:class:`Experiment`) or a sweep (a single top-level key ``sweep`` with ``base``, and
``variants`` and/or ``grid``) that expands to several experiments. Every key is checked
against frozen dataclasses: an unknown key, a wrong type, an unknown transform or metric
name is a :class:`CbxError` naming the file, the key's path (``steps[1].params.group_size``),
what was expected and the valid choices, raised before anything is written.

YAML parsing and the dataclass checker are shared with the training configs and live in
:mod:`cbx.config` (re-exported here: ``load_yaml``, ``from_mapping``, ``to_plain``,
``TrackingConfig``).

Defaults live in one place: the dataclass fields below, the engine's ``SynthSettings`` and
each transform's config class. The resolved experiment (every default filled in) is what a
run folder records.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cbx.config import (  # noqa: F401 (re-exported: the shared config pieces)
    TrackingConfig,
    _join,
    _show,
    from_mapping,
    load_yaml,
    read_yaml_file,
    to_plain,
)
from cbx.errors import CbxError

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class TrainRef:
    """``train:`` of a step: the training config that makes the step's checkpoint, with
    optional dotted-key overrides (``set: {train.max_steps: 80}``). Paths are relative to the
    current folder, like every path in an experiment file."""

    config: str
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One compression step: a registered transform name and its parameters.

    ``train`` (a config path, or a :class:`TrainRef` mapping) stands for the checkpoint
    parameter of a transform that loads a trained checkpoint: ``cbx run`` trains it on first
    use and fills the parameter in (:mod:`cbx.lab.recipes`)."""

    transform: str
    params: dict[str, Any] = field(default_factory=dict)
    train: TrainRef | str | None = None

    def __post_init__(self):
        if isinstance(self.train, str):
            object.__setattr__(self, "train", TrainRef(self.train))


@dataclass(frozen=True)
class EvalConfig:
    """How a run is evaluated. Scorer choices (``asr``, ``speaker``, ``mos``, ``normalizer``)
    default to the eval suite's own defaults (:class:`cbx.eval.scorer.ScorerConfig`, one place);
    each is a name (``asr: large-v3``) or a mapping of that config's fields
    (``asr: {model: large-v3, device: cuda, compute_type: float16}``)."""

    set: str = "offline"  # a built-in set name, or a path to a .jsonl manifest (relative to the cwd)
    limit: int | None = None  # first N items of the set (None: all)
    metrics: tuple[str, ...] | None = None  # None: the scorer's default metrics
    samples: int = 4  # audio samples listed in the run folder for the leaderboard page
    t3_fidelity: bool = True  # teacher-forced T3 top-1 agreement / KL against the baseline
    aligned_fidelity: bool = True  # both decoders on the baseline's tokens, same noise: mel L1, MCD, SNR
    warmup: int = 1  # untimed batches synthesized first (one-time costs would skew RTF)
    asr: str | dict[str, Any] | None = None  # AsrConfig.model, or AsrConfig fields
    speaker: str | dict[str, Any] | None = None  # SpeakerConfig.backend, or its fields
    mos: str | dict[str, Any] | None = None  # MosConfig.backend, or its fields
    normalizer: str | None = None  # WER text normalizer (AsrConfig.normalizer): whisper-en | seed-tts | f5-tts
    max_failed: float = 0.05  # a run fails only when more than this share of utterances fail
    timing_repeats: int = 1  # timed syntheses of the set (speed-up intervals need 2 or more)

    def scorer_config(self, path: str = "eval"):
        """The eval suite's :class:`ScorerConfig` these choices make (errors name the key)."""
        from cbx.eval.metrics.asr import AsrConfig
        from cbx.eval.metrics.mos import MosConfig
        from cbx.eval.metrics.speaker import SpeakerConfig
        from cbx.eval.scorer import ScorerConfig

        def fields(value, short_field):  # `asr: large-v3` is `asr: {model: large-v3}`
            return {short_field: value} if isinstance(value, str) else dict(value or {})

        asr = fields(self.asr, "model")
        if self.normalizer is not None:
            if "normalizer" in asr:
                raise CbxError(f"{path}.normalizer: set the normalizer once (it is also under {path}.asr)")
            asr["normalizer"] = self.normalizer
        return ScorerConfig(
            asr=_scorer_part(AsrConfig, asr, f"{path}.asr"),
            speaker=_scorer_part(SpeakerConfig, fields(self.speaker, "backend"), f"{path}.speaker"),
            mos=_scorer_part(MosConfig, fields(self.mos, "backend"), f"{path}.mos"),
        )


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str = "tiny"
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    steps: tuple[Step, ...] = ()
    synth: dict[str, Any] = field(default_factory=dict)  # cbx.engine.synth.SynthSettings fields
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    baseline: bool = True  # pair with (and if needed run) the uncompressed baseline
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def is_baseline(self) -> bool:
        return not self.steps

    def baseline_experiment(self) -> "Experiment":
        """The same model, eval set, engine settings and seed with no compression."""
        return dataclasses.replace(self, name=f"baseline-{_slug(self.model)}", steps=())

    def transform_configs(self) -> list[tuple[str, Any]]:
        """``(name, typed config)`` per step; keys and types checked with their path."""
        from cbx.compress.registry import registered

        reg = registered()
        out = []
        for i, s in enumerate(self.steps):
            if s.transform not in reg:
                raise CbxError(
                    f"steps[{i}].transform: unknown transform {s.transform!r}; "
                    f"valid choices: {', '.join(sorted(reg)) or '(none registered)'}"
                )
            params = s.params
            if s.train is not None:
                trainer = _trainer(s, i)
                if trainer.param not in params:  # not trained yet: the runner fills it in
                    params = {**params, trainer.param: PENDING_CHECKPOINT}
            out.append((s.transform, from_mapping(reg[s.transform].config_cls, params, f"steps[{i}].params")))
        return out

    def synth_settings(self):
        from cbx.engine.synth import SynthSettings

        return from_mapping(SynthSettings, {**self.synth, "seed": self.seed}, "synth")

    def resolved(self) -> dict[str, Any]:
        """Plain dict with every default filled in (what a run folder records)."""
        d = to_plain(self)
        d["steps"] = [
            {"transform": n, "params": to_plain(c), **({"train": to_plain(s.train)} if s.train else {})}
            for (n, c), s in zip(self.transform_configs(), self.steps)
        ]
        d["synth"] = to_plain(self.synth_settings())
        # The scorer configs in full (defaults filled in): a run scored otherwise is another run.
        sc = self.eval.scorer_config()
        d["eval"].update(asr=to_plain(sc.asr), speaker=to_plain(sc.speaker), mos=to_plain(sc.mos))
        d["eval"]["normalizer"] = sc.asr.normalizer
        d["inputs"] = self.input_hashes()
        d["schema_version"] = SCHEMA_VERSION
        return d

    def input_hashes(self) -> dict[str, str]:
        """Content hashes of files/folders that step parameters name (a student checkpoint):
        a retrained checkpoint at the same path is a different experiment, not a cached one."""
        from cbx.eval.sets import get_eval_set, is_manifest

        out = {}
        if is_manifest(self.eval.set):
            # An own eval set's version hashes its lines and the files they name: a prompt
            # re-recorded under the same name is another experiment, not a cached one.
            out["eval.set"] = get_eval_set(self.eval.set).version
        for i, (_, cfg) in enumerate(self.transform_configs()):
            for k, v in to_plain(cfg).items():
                if isinstance(v, str) and v and Path(v).exists():
                    out[f"steps[{i}].params.{k}"] = content_hash(Path(v))
        return out


def _scorer_part(cls, data: dict, where: str):
    try:
        return from_mapping(cls, data, where)
    except CbxError as e:  # the config's own check (a bad name) says what; this says where
        msg = str(e)
        raise CbxError(msg if msg.startswith(where) else f"{where}: {msg}") from None


# What a trained step's checkpoint parameter holds until cbx run has trained it.
PENDING_CHECKPOINT = "<trained on first use>"


def _trainer(step: Step, i: int):
    from cbx.compress.registry import get_trainer, trainable_transforms

    trainer = get_trainer(step.transform)
    if trainer is None:
        raise CbxError(f"steps[{i}].train: transform {step.transform!r} loads no trained checkpoint; "
                       f"train: is for {', '.join(trainable_transforms()) or '(none registered)'}")
    return trainer


def content_hash(path: Path) -> str:
    """SHA-256 over a file, or over a folder's sorted (relative path, file hash) pairs."""
    import hashlib

    from cbx.files import sha256_file as file_hash

    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path)}\0{file_hash(p)}\n".encode())
    return h.hexdigest()


def _slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in s.lower()).strip("-.")
    return out or "x"


# ---------------------------------------------------------------- semantic checks


def validate(exp: Experiment, path: str = "") -> Experiment:
    """Names checked against the registries; engine settings and transform params typed."""
    try:
        for i, s in enumerate(exp.steps):
            if s.train is not None and _trainer(s, i).param in s.params:
                raise CbxError(f"steps[{i}]: give either params.{_trainer(s, i).param} or train, not both")
        exp.transform_configs()
    except CbxError as e:
        raise CbxError(f"{path}.{e}" if path else str(e)) from None
    if exp.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", exp.device):
        raise CbxError(f"{_join(path, 'device')}: unknown device {exp.device!r}; valid choices: auto, cpu, cuda, cuda:N, mps")
    if exp.eval.metrics is not None:
        from cbx.eval.registry import metric_specs

        specs = metric_specs()
        for i, m in enumerate(exp.eval.metrics):
            if m not in specs:
                raise CbxError(
                    f"{_join(path, f'eval.metrics[{i}]')}: unknown metric {m!r}; valid choices: {', '.join(sorted(specs)) or '(none registered)'}"
                )
    if exp.eval.limit is not None and exp.eval.limit < 1:
        raise CbxError(f"{_join(path, 'eval.limit')}: expected a positive integer or null, got {exp.eval.limit}")
    if exp.eval.warmup < 0:
        raise CbxError(f"{_join(path, 'eval.warmup')}: expected 0 or more, got {exp.eval.warmup}")
    if exp.eval.samples < 0:
        raise CbxError(f"{_join(path, 'eval.samples')}: expected 0 or more, got {exp.eval.samples}")
    if not 0.0 <= exp.eval.max_failed < 1.0:
        raise CbxError(f"{_join(path, 'eval.max_failed')}: expected a share in [0, 1), got {exp.eval.max_failed}")
    if exp.eval.timing_repeats < 1:
        raise CbxError(f"{_join(path, 'eval.timing_repeats')}: expected 1 or more, got {exp.eval.timing_repeats}")
    exp.eval.scorer_config(_join(path, "eval"))
    if "seed" in exp.synth:
        raise CbxError(f"{_join(path, 'synth.seed')}: set the top-level 'seed' instead (one place for it)")
    from cbx.engine.synth import SynthSettings

    from_mapping(SynthSettings, {**exp.synth, "seed": exp.seed}, _join(path, "synth"))
    if not exp.name.strip():
        raise CbxError(f"{_join(path, 'name')}: must not be empty")
    return exp


# ---------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
    base: dict[str, Any] = field(default_factory=dict)
    variants: tuple[dict[str, Any], ...] = ()
    grid: dict[str, Any] = field(default_factory=dict)  # "synth.cfm_steps": [2, 4, 10]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise CbxError(f"{where}: {k!r} is not a mapping in the base experiment")
        cur = nxt
    cur[keys[-1]] = value


def expand_sweep(data: dict[str, Any], where: str = "sweep") -> list[tuple[str, dict[str, Any]]]:
    """(path for errors, experiment mapping) for each variant x grid point."""
    sweep = from_mapping(Sweep, data, where)
    variants = list(sweep.variants) or [{}]
    for i, v in enumerate(sweep.variants):
        if not isinstance(v, dict):
            raise CbxError(f"{where}.variants[{i}]: expected a mapping, got {_show(v)}")
    grid_keys = list(sweep.grid)
    for k in grid_keys:
        if not isinstance(sweep.grid[k], list) or not sweep.grid[k]:
            raise CbxError(f"{where}.grid.{k}: expected a non-empty list of values")
    out = []
    for i, v in enumerate(variants):
        merged = _deep_merge(sweep.base, v)
        vpath = f"{where}.variants[{i}]" if sweep.variants else f"{where}.base"
        for combo in itertools.product(*(sweep.grid[k] for k in grid_keys)):
            m = copy.deepcopy(merged)
            suffix = []
            for k, val in zip(grid_keys, combo):
                _set_dotted(m, k, val, f"{where}.grid.{k}")
                suffix.append(f"{k.split('.')[-1]}{val}")
            if suffix:
                m["name"] = "-".join([str(m.get("name", "exp"))] + suffix)
            out.append((vpath, m))
    return out


TRAINING_KEYS = ("teacher", "student", "train", "data")


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (``eval.limit=2``, ``synth.dtype=bf16``) -> (dotted key, YAML value)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
        raise CbxError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. eval.limit=2")
    try:
        return key.strip(), load_yaml(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def load_experiments(path: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> list[Experiment]:
    """Experiments defined by one YAML file (one, or many for a sweep), all validated.

    ``overrides``: ``(dotted key, value)`` pairs set in every experiment before validation
    (``cbx run --set``). Every experiment of a sweep is checked, and all their errors are
    reported together (one line each) in the one :class:`CbxError`."""
    path = Path(path)
    data = read_yaml_file(path, "experiment file")
    if not isinstance(data, dict):
        raise CbxError(f"{path}: expected a mapping of experiment keys, got {_show(data)}")
    if "sweep" not in data and "model" not in data and "steps" not in data and any(k in data for k in TRAINING_KEYS):
        raise CbxError(f"{path}: a training config (keys {', '.join(k for k in TRAINING_KEYS if k in data)}), "
                       f"not an experiment: train it with `cbx distill {path}`")
    errors: list[str] = []
    try:
        if "sweep" in data:
            if len(data) != 1:
                extra = sorted(k for k in data if k != "sweep")
                raise CbxError(f"{extra[0]}: unknown key beside 'sweep' (put shared keys under sweep.base)")
            items = expand_sweep(data["sweep"])
        else:
            data.setdefault("name", path.stem)
            items = [("", data)]
        exps = []
        for vpath, d in items:
            try:
                for key, value in overrides:
                    _set_dotted(d, key, value, f"--set {key}")
                if isinstance(d.get("tracking"), str):  # `tracking: none` / `tracking: wandb`
                    d["tracking"] = {"backend": d["tracking"]}
                exp = from_mapping(Experiment, d, vpath)
                exps.append(validate(exp, vpath))
            except CbxError as e:
                if str(e) not in errors:
                    errors.append(str(e))
    except CbxError as e:
        raise CbxError(f"{path}: {e}") from None
    if errors:
        raise CbxError("\n".join(f"{path}: {e}" for e in errors))
    counts = collections.Counter(e.name for e in exps)  # (list.count per name was quadratic)
    dup = sorted(n for n, c in counts.items() if c > 1)
    if dup:
        raise CbxError(f"{path}: experiment name {dup[0]!r} appears more than once (names identify runs)")
    return exps
