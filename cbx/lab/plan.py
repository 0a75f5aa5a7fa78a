"""Every input of a ``cbx run`` resolved before any work: the run plan.

A run that finds its student checkpoint missing after the baseline has synthesized for ten
minutes wasted those minutes and left a half-made results folder. So before anything is
loaded or synthesized, :func:`plan_runs` looks at every experiment of the command and checks
what each will need:

* the model source (a built-in model, a folder in the upstream layout, a known Hub id that is
  cached or, online, will be downloaded);
* the device (``cuda`` on a machine without CUDA is refused now, not after the baseline);
* each step's checkpoint: a folder that must exist and be a complete checkpoint of its kind,
  or a training config (``train:``) that is either trained already (reused) or will be trained
  on first use, with a rough duration (:mod:`cbx.lab.recipes`);
* the eval set and every voice-prompt file it names.

The result is a :class:`Plan`: its ``problems`` (each one line naming the experiment, the key
and the file), what it will train, and :meth:`Plan.lines` for a human (``cbx run`` prints the
trainings; ``cbx run --dry-run`` prints it all). :meth:`Plan.check` raises the first problem
as a :class:`CbxError` (exit 2) with the count of the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cbx.errors import CbxError
from cbx.lab.recipes import Training, describe_seconds, trainings
from cbx.lab.schema import Experiment


@dataclass
class PlannedExperiment:
    name: str
    model: str
    model_kind: str | None  # builtin | folder | hub | hub-download (None: refused)
    device: str | None
    checkpoints: dict[str, str] = field(default_factory=dict)  # "steps[i].params.K" -> path
    trainings: list[Training] = field(default_factory=list)
    eval_set: str = ""
    eval_items: int = 0
    baseline: bool = False  # the experiment pairs with an uncompressed baseline run


@dataclass
class Plan:
    experiments: list[PlannedExperiment]
    problems: list[str]

    @property
    def trainings(self) -> list[Training]:
        """Unique trainings (by key), in first-use order."""
        seen, out = set(), []
        for e in self.experiments:
            for t in e.trainings:
                if t.key not in seen:
                    seen.add(t.key)
                    out.append(t)
        return out

    @property
    def to_train(self) -> list[Training]:
        return [t for t in self.trainings if not t.ready]

    def check(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
            raise CbxError(self.problems[0] + more)

    def training_lines(self) -> list[str]:
        out = []
        for t in self.trainings:
            if t.ready:
                out.append(f"reusing trained {t.transform} checkpoint {t.checkpoint} ({t.config_file}, key {t.key})")
            else:
                dev = next((e.device for e in self.experiments if t in e.trainings and e.device), "cpu")
                out.append(f"will train {t.transform} checkpoint from {t.config_file} on first use "
                           f"(teacher {t.teacher}; {describe_seconds(t.estimate_seconds(dev))}) -> {t.folder}")
        return out

    def lines(self) -> list[str]:
        out = []
        for e in self.experiments:
            out.append(f"{e.name}: model {e.model} ({e.model_kind or 'refused'}) on {e.device or '?'}; "
                       f"eval set {e.eval_set} ({e.eval_items} items)"
                       + ("; paired with its baseline" if e.baseline else ""))
            for k, v in e.checkpoints.items():
                out.append(f"  {k}: {v}")
            for t in e.trainings:
                out.append(f"  steps[{t.step}]: {'trained' if t.ready else 'to train'}: {t.config_file} -> {t.checkpoint}")
        out += self.training_lines()
        out += [f"problem: {p}" for p in self.problems]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiments": [
                {"name": e.name, "model": e.model, "model_kind": e.model_kind, "device": e.device,
                 "checkpoints": e.checkpoints, "eval_set": e.eval_set, "eval_items": e.eval_items,
                 "baseline": e.baseline,
                 "trainings": [{"step": t.step, "key": t.key, "ready": t.ready, "checkpoint": str(t.checkpoint)}
                               for t in e.trainings]}
                for e in self.experiments
            ],
            "trainings": [
                {"transform": t.transform, "config_file": t.config_file, "overrides": t.overrides,
                 "config_hash": t.config_hash, "teacher": t.teacher, "teacher_identity": t.teacher_identity,
                 "key": t.key, "folder": str(t.folder), "ready": t.ready,
                 "estimate_s": t.estimate_seconds("cpu")}
                for t in self.trainings
            ],
            "problems": list(self.problems),
        }


def plan_runs(exps: Sequence[Experiment], results: str | Path, backend=None) -> Plan:
    """Resolve every input of ``exps`` (see the module docstring); nothing is loaded or written."""
    from cbx.compress.registry import get_trainer
    from cbx.lab.runner import Backend

    b = backend or Backend()
    problems: list[str] = []
    planned: list[PlannedExperiment] = []
    sets: dict[str, tuple[str, int] | str] = {}  # eval set name -> (name, items) or problem
    sources: dict[str, tuple[str | None, str | None]] = {}  # model source -> (kind, problem)

    def note(msg: str) -> None:
        if msg not in problems:
            problems.append(msg)

    for exp in exps:
        pe = PlannedExperiment(exp.name, exp.model, None, None, eval_set=exp.eval.set,
                               baseline=exp.baseline and not exp.is_baseline)
        planned.append(pe)
        if exp.model not in sources:
            try:
                sources[exp.model] = (b.model_source_kind(exp.model), None)
            except CbxError as e:
                sources[exp.model] = (None, str(e))
        pe.model_kind, err = sources[exp.model]
        if err:
            note(f"{exp.name}: model: {err}")
        try:
            pe.device = b.device(exp.device)
        except CbxError as e:
            note(f"{exp.name}: {e}")
        for i, s in enumerate(exp.steps):
            trainer = get_trainer(s.transform)
            if trainer is None or s.train is not None:
                continue
            path = s.params.get(trainer.param)
            key = f"steps[{i}].params.{trainer.param}"
            if not isinstance(path, str):
                continue
            pe.checkpoints[key] = path
            p = Path(path)
            if not p.exists():
                hint = ("; name its training config instead (train: CONFIG.yaml) and cbx run trains it"
                        if not p.is_absolute() else "")
                note(f"{exp.name}: {key}: {path}: no such checkpoint folder{hint}")
                continue
            try:
                trainer.check_checkpoint(p)
            except CbxError as e:
                note(f"{exp.name}: {key}: {e}")
        try:
            pe.trainings = trainings(exp, results)
        except CbxError as e:
            note(str(e))
        for t in pe.trainings:
            if pe.model_kind is not None and t.teacher != exp.model:
                try:
                    from cbx.engine.identity import model_identity

                    same = model_identity(exp.model) == t.teacher_identity
                except CbxError:
                    same = False
                if not same:
                    note(f"{exp.name}: steps[{t.step}].train: {t.config_file} trains against teacher "
                         f"{t.teacher!r}, but the experiment's model is {exp.model!r}")
            if t.ready:
                try:
                    t.trainer.check_checkpoint(t.checkpoint)
                except CbxError as e:
                    note(f"{exp.name}: steps[{t.step}]: trained checkpoint is damaged ({e}); "
                         f"delete {t.folder} to train it again")
        if exp.eval.set not in sets:
            sets[exp.eval.set] = _check_eval_set(b, exp.eval.set)
        got = sets[exp.eval.set]
        if isinstance(got, str):
            note(f"{exp.name}: eval.set: {got}")
        else:
            n = got[1] if exp.eval.limit is None else min(got[1], exp.eval.limit)
            pe.eval_items = n
    return Plan(planned, problems)


def _check_eval_set(b, name: str) -> tuple[str, int] | str:
    try:
        set_name, _version, items = b.eval_set(name)
    except CbxError as e:
        return str(e)
    if not items:
        return f"{name!r}: no items"
    for it in items:
        if it.prompt and not Path(it.prompt).is_file():
            return f"{name!r}: item {it.id}: voice prompt {it.prompt}: no such file"
    return set_name, len(items)
