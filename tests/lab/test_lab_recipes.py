"""Train-on-demand (``train:`` in a step) and the run plan, with a fake trainer and the fake
engine: trained once on first use, reused by later runs and other experiments, retrained when
the config changes, provenance in run.json, every input refused before any synthesis."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbx.compress.registry import register_trainer, register_transform
from cbx.config import read_yaml_file
from cbx.errors import CbxError
from cbx.lab import recipes
from cbx.lab.plan import plan_runs
from cbx.lab.runner import Backend, Runner
from cbx.lab.schema import EvalConfig, Experiment, Step, TrainRef, load_experiments
from lab_fakes import FakeBackend


@dataclass(frozen=True)
class LabCkptConfig:
    checkpoint: str
    gain: float = 1.0


@register_transform("lab_test_trained", LabCkptConfig)
def _ckpt(model, cfg):
    model.gain *= json.loads((Path(cfg.checkpoint) / "weights.json").read_text())["gain"] * cfg.gain
    return model


class FakeTrainer:
    """Trains by writing weights.json with gain = config 'gain' (after optional overrides)."""

    param = "checkpoint"
    checkpoint_dir = "ckpt"

    def __init__(self):
        self.calls: list[dict] = []
        self.fail = False

    def load_config(self, path, overrides):
        data = read_yaml_file(path, "training config")
        for k, v in overrides.items():
            data[k] = v
        if "gain" not in data:
            raise CbxError(f"{path}: gain: missing required key")
        return dict(data)

    def resolved(self, config):
        return {k: v for k, v in config.items() if k != "out_dir"}

    def teacher(self, config):
        return config.get("teacher", "tiny")

    def estimate_seconds(self, config, device):
        return 42.0

    def check_checkpoint(self, path):
        if not (Path(path) / "weights.json").is_file():
            raise CbxError(f"{path}: not a lab_test_trained checkpoint (no weights.json)")

    def train(self, config, out_dir, progress):
        self.calls.append(dict(config))
        if self.fail:
            (Path(out_dir) / "partial").write_text("half")
            raise RuntimeError("training crashed")
        ck = Path(out_dir) / self.checkpoint_dir
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "weights.json").write_text(json.dumps({"gain": config["gain"]}))
        return {"checkpoint": ck, "metrics": {"final_loss": 0.5}}


TRAINER = register_trainer("lab_test_trained", FakeTrainer())


@pytest.fixture(autouse=True)
def _fresh_trainer(monkeypatch, tmp_path):
    monkeypatch.setattr(TRAINER, "calls", [])
    monkeypatch.setattr(TRAINER, "fail", False)
    monkeypatch.chdir(tmp_path)  # train: paths are relative to the current folder


def _cfg(name="recipe.yaml", gain=0.5, **extra) -> str:
    Path(name).write_text(f"gain: {gain}\n" + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return name


def _exp(name="stud", train="recipe.yaml", sets=None, **kw) -> Experiment:
    step = Step("lab_test_trained", {"gain": 1.0}, TrainRef(train, sets or {}))
    return Experiment(name=name, model="tiny", steps=(step,), synth={"batch_size": 2},
                      eval=EvalConfig(set="fake", samples=1, warmup=0), **kw)


def test_first_use_trains_once_then_every_run_and_experiment_reuses(tmp_path):
    _cfg()
    be = FakeBackend(n_items=2)
    r = Runner(tmp_path / "runs", backend=be, progress=False)
    out = r.run(_exp())
    assert out.record["status"] == "done" and len(TRAINER.calls) == 1
    (prov,) = out.record["trained"].values()
    assert prov["config"] == {"gain": 0.5} and prov["metrics"] == {"final_loss": 0.5}
    assert prov["teacher"] == "tiny" and prov["teacher_identity"].startswith("tiny:")
    assert prov["checkpoint"] == "ckpt" and len(prov["checkpoint_hash"]) == 64
    folder = Path(prov["folder"])
    assert folder.parent == tmp_path / "runs" / "trained" and (folder / "trained.json").is_file()
    # the run's config names the trained checkpoint and the recipe it came from
    (step,) = out.record["config"]["steps"]
    assert step["params"]["checkpoint"] == str(folder / "ckpt")
    assert step["train"] == {"config": "recipe.yaml", "set": {}}
    # the transform really loaded the trained weights: the gain reached the audio
    assert out.record["config"]["inputs"]["steps[0].params.checkpoint"] == prov["checkpoint_hash"]

    again = r.run(_exp())
    assert again.reused and len(TRAINER.calls) == 1
    other = r.run(_exp(name="other-exp", seed=3))  # another experiment naming the same config
    assert not other.reused and len(TRAINER.calls) == 1
    assert other.record["trained"] == out.record["trained"]


def test_a_changed_config_or_override_trains_anew(tmp_path):
    _cfg()
    r = Runner(tmp_path / "runs", backend=FakeBackend(n_items=2), progress=False)
    a = r.run(_exp()).record
    b = r.run(_exp(name="over", sets={"gain": 0.25})).record
    _cfg(gain=0.75)
    c = r.run(_exp(name="edited")).record
    keys = [next(iter(x["trained"].values()))["key"] for x in (a, b, c)]
    assert len(set(keys)) == 3 and [c_["gain"] for c_ in TRAINER.calls] == [0.5, 0.25, 0.75]
    assert next(iter(b["trained"].values()))["overrides"] == {"gain": 0.25}


def test_a_failed_training_leaves_no_record_and_the_next_run_trains_again(tmp_path):
    _cfg()
    TRAINER.fail = True
    be = FakeBackend(n_items=2)
    r = Runner(tmp_path / "runs", backend=be, progress=False)
    with pytest.raises(RuntimeError, match="training crashed"):
        r.run(_exp())
    assert be.synthesized == []  # trained before anything was synthesized
    assert not list((tmp_path / "runs" / "trained").glob("*/trained.json"))
    TRAINER.fail = False
    assert r.run(_exp()).record["status"] == "done" and len(TRAINER.calls) == 2


def test_plan_says_what_it_will_train_then_that_it_reuses(tmp_path):
    _cfg()
    be = FakeBackend(n_items=2)
    plan = plan_runs([_exp(), _exp(name="twin")], tmp_path / "runs", be)
    assert plan.problems == [] and len(plan.trainings) == 1 and len(plan.to_train) == 1
    (line,) = plan.training_lines()
    assert line.startswith("will train lab_test_trained checkpoint from recipe.yaml") and "about a minute" in line
    d = plan.to_dict()
    assert d["trainings"][0]["estimate_s"] == 42.0 and not d["trainings"][0]["ready"]
    Runner(tmp_path / "runs", backend=be, progress=False).run(_exp())
    plan = plan_runs([_exp()], tmp_path / "runs", be)
    assert plan.to_train == [] and plan.training_lines()[0].startswith("reusing trained lab_test_trained")


@pytest.mark.parametrize("case, expect", [
    ("missing-config", "steps[0].train: nope.yaml: no such training config"),
    ("bad-config", "recipe.yaml: gain: missing required key"),
    ("missing-checkpoint", "steps[0].params.checkpoint: gone/ckpt: no such checkpoint folder; name its training config"),
    ("not-a-checkpoint", "steps[0].params.checkpoint: empty: not a lab_test_trained checkpoint"),
    ("teacher", "trains against teacher 'tiny-turbo', but the experiment's model is 'tiny'"),
    ("model", "model: model source 'no-such-model'"),
    ("device", "device: 'cuda' asked for but CUDA is not available"),
])
def test_plan_refuses_missing_inputs_before_any_work(tmp_path, case, expect):
    _cfg()
    exp = _exp()
    if case == "missing-config":
        exp = _exp(train="nope.yaml")
    elif case == "bad-config":
        Path("recipe.yaml").write_text("other: 1\n")
    elif case in ("missing-checkpoint", "not-a-checkpoint"):
        Path("empty").mkdir()
        path = "gone/ckpt" if case == "missing-checkpoint" else "empty"
        exp = dataclasses.replace(exp, steps=(Step("lab_test_trained", {"checkpoint": path}),))
    elif case == "teacher":
        _cfg(teacher="tiny-turbo")
    elif case == "model":
        exp = dataclasses.replace(exp, model="no-such-model")
    elif case == "device":
        exp = dataclasses.replace(exp, device="cuda")

    class NoCuda(FakeBackend):
        device = Backend.device  # the real check

    be = NoCuda(n_items=2) if case == "device" else FakeBackend(n_items=2)
    if case == "device":
        import torch

        if torch.cuda.is_available():
            pytest.skip("checks the refusal on a machine without CUDA")
    base = _exp(name="fine-first")  # a valid experiment listed first: nothing of it may run either
    plan = plan_runs([base, exp], tmp_path / "runs", be)
    with pytest.raises(CbxError) as e:
        plan.check()
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert be.synthesized == [] and TRAINER.calls == [] and not (tmp_path / "runs").exists()


def test_experiment_files_name_train_and_refuse_both_or_the_wrong_transform(tmp_path):
    _cfg()
    Path("e.yaml").write_text(
        "model: tiny\nsteps:\n  - transform: lab_test_trained\n    train: recipe.yaml\n"
        "  - transform: lab_test_trained\n    train: {config: recipe.yaml, set: {gain: 2}}\n")
    (exp,) = load_experiments("e.yaml")
    assert exp.steps[0].train == TrainRef("recipe.yaml") and exp.steps[1].train.set == {"gain": 2}
    Path("both.yaml").write_text("steps:\n  - transform: lab_test_trained\n    params: {checkpoint: x}\n    train: recipe.yaml\n")
    with pytest.raises(CbxError, match=r"both.yaml: steps\[0\]: give either params.checkpoint or train, not both"):
        load_experiments("both.yaml")
    Path("wrong.yaml").write_text("steps:\n  - transform: int8_weight_only\n    train: recipe.yaml\n")
    with pytest.raises(CbxError, match=r"steps\[0\].train: transform 'int8_weight_only' loads no trained checkpoint"):
        load_experiments("wrong.yaml")


def test_shipped_experiments_name_their_recipes():
    """Every shipped cfm_student step trains on demand (no step points at a folder only a
    separate command would make)."""
    root = Path(__file__).resolve().parents[2]
    exps = [e for f in sorted((root / "experiments").glob("*.yaml")) if not f.name.startswith("distill-")
            for e in load_experiments(f)]
    student_steps = [s for e in exps for s in e.steps if s.transform == "cfm_student"]
    assert student_steps and all(s.train is not None and "checkpoint" not in s.params for s in student_steps)
    for s in student_steps:
        assert (root / s.train.config).is_file()


def test_distill_trainer_keys_ignore_cadence_and_output_folder(tmp_path):
    from cbx.distill.transform import TRAINER as DISTILL

    root = Path(__file__).resolve().parents[2]
    cfg = DISTILL.load_config(root / "experiments/distill-demo.yaml", {})
    same = DISTILL.load_config(root / "experiments/distill-demo.yaml", {"train.out_dir": "elsewhere", "train.save_every": 5})
    other = DISTILL.load_config(root / "experiments/distill-demo.yaml", {"train.max_steps": 41})
    assert DISTILL.resolved(cfg) == DISTILL.resolved(same) != DISTILL.resolved(other)
    assert 1 < DISTILL.estimate_seconds(cfg, "cpu") < 600
    assert recipes.describe_seconds(DISTILL.estimate_seconds(cfg, "cpu")) == "about a minute or less"


def test_export_carries_the_trained_provenance_of_its_run(tmp_path):
    from cbx.lab import store
    from cbx.lab.export import export_run, verify_export

    run = tmp_path / "runs" / "r1"
    prov = {"steps[0]": {"config_file": "recipe.yaml", "config_hash": "abc", "metrics": {"final_loss": 0.5}}}
    store.atomic_write_json(run / "run.json", {"run_id": "r1", "status": "done", "trained": prov,
                                               "config": {"model": "tiny", "steps": []}})
    info = verify_export(export_run(run, tmp_path / "out"))
    assert info["trained"] == prov
