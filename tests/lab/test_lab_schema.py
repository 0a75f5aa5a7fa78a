"""Experiment files: strict keys and types with the key's path, registry names, sweeps, and
`cbx run` refusing a bad file with exit status 2 and nothing written."""

from __future__ import annotations

import textwrap

import pytest

import lab_fakes  # noqa: F401  (registers the lab_test_gain transform)
from cbx.cli import main
from cbx.errors import CbxError
from cbx.lab.schema import Experiment, load_experiments


def _write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_a_valid_file_loads_with_defaults_filled_in(tmp_path):
    p = _write(tmp_path, """
        model: tiny
        steps:
          - transform: lab_test_gain
            params: {gain: 1}
        synth: {cfm_steps: 2, temperature: 1}
        eval: {set: offline, limit: 2}
        tracking: none
    """)
    (exp,) = load_experiments(p)
    assert isinstance(exp, Experiment) and exp.name == "exp"  # name defaults to the file stem
    assert exp.tracking.backend == "none" and exp.eval.limit == 2
    (name, cfg), = exp.transform_configs()
    assert name == "lab_test_gain" and cfg.gain == 1.0 and isinstance(cfg.gain, float)
    res = exp.resolved()
    assert res["synth"]["cfm_steps"] == 2 and res["synth"]["temperature"] == 1.0
    assert res["synth"]["max_speech_tokens"] == 1000  # the engine's default, recorded
    assert res["steps"] == [{"transform": "lab_test_gain", "params": {"gain": 1.0, "nan": False}}]
    assert res["inputs"] == {}


@pytest.mark.parametrize(
    "body,needle",
    [
        ("modle: tiny\n", "modle: unknown key; valid keys: name, model, device"),
        ("steps:\n  - transform: lab_test_gain\n    params: {gian: 2}\n", "steps[0].params.gian: unknown key; valid keys: gain, nan"),
        ("steps:\n  - transform: lab_test_gain\n  - transform: lab_test_gain\n    params: {gain: '4'}\n", "steps[1].params.gain: expected a number, got str '4'"),
        ("steps:\n  - transform: lab_test_gain\n    params: {gain: -1}\n", "steps[0].params: gain must be >= 0"),
        ("steps:\n  - transform: int9\n", "steps[0].transform: unknown transform 'int9'; valid choices:"),
        ("eval: {metrics: [wer_typo]}\n", "eval.metrics[0]: unknown metric 'wer_typo'; valid choices:"),
        ("eval: {limit: 0}\n", "eval.limit: expected a positive integer"),
        ("synth: {cfm_steps: 2.5}\n", "synth.cfm_steps: expected int or null, got float 2.5"),
        ("synth: {seed: 3}\n", "synth.seed: set the top-level 'seed'"),
        ("synth: {temprature: 0.5}\n", "synth.temprature: unknown key; valid keys: temperature"),
        ("tracking: {backend: mlflow}\n", "tracking.backend: expected one of 'none', 'wandb', got 'mlflow'"),
        ("seed: true\n", "seed: expected int, got bool True"),
        ("steps: {transform: x}\n", "steps: expected a list of a mapping"),
        ("- a\n- b\n", "expected a mapping of experiment keys"),
        ("name: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_key_and_the_choices(tmp_path, body, needle):
    p = _write(tmp_path, body)
    with pytest.raises(CbxError) as e:
        load_experiments(p)
    assert str(e.value).startswith(str(p)) and needle in str(e.value), str(e.value)


def test_metric_choices_are_listed(tmp_path):
    p = _write(tmp_path, "eval: {metrics: [nope]}\n")
    with pytest.raises(CbxError, match="speaker_sim, .*wer"):
        load_experiments(p)


def test_sweep_variants_times_grid(tmp_path):
    p = _write(tmp_path, """
        sweep:
          base: {model: tiny, eval: {limit: 2}, synth: {cfm_steps: 4}}
          variants:
            - name: base
            - name: gain
              steps: [{transform: lab_test_gain, params: {gain: 0.5}}]
              synth: {temperature: 0.5}
          grid:
            seed: [0, 1]
            synth.cfm_steps: [2, 10]
    """)
    exps = load_experiments(p)
    assert len(exps) == 8
    names = [e.name for e in exps]
    assert names[:4] == ["base-seed0-cfm_steps2", "base-seed0-cfm_steps10", "base-seed1-cfm_steps2", "base-seed1-cfm_steps10"]
    g = [e for e in exps if e.name == "gain-seed1-cfm_steps10"][0]
    # variant keys merge into the base mapping; grid values override both
    assert g.synth == {"cfm_steps": 10, "temperature": 0.5} and g.seed == 1 and g.eval.limit == 2
    assert g.steps[0].params == {"gain": 0.5}


def test_sweep_errors_carry_the_variant_path(tmp_path):
    p = _write(tmp_path, """
        sweep:
          base: {model: tiny}
          variants:
            - name: a
            - name: b
              steps: [{transform: lab_test_gain, params: {gain: x}}]
    """)
    with pytest.raises(CbxError, match=r"sweep\.variants\[1\]\.steps\[0\]\.params\.gain: expected a number"):
        load_experiments(p)
    p = _write(tmp_path, "sweep:\n  variants: [{name: a}, {name: a}]\n")
    with pytest.raises(CbxError, match="'a' appears more than once"):
        load_experiments(p)
    p = _write(tmp_path, "sweep:\n  variants: [{name: a}]\nmodel: tiny\n")
    with pytest.raises(CbxError, match="model: unknown key beside 'sweep'"):
        load_experiments(p)


def test_cbx_run_rejects_a_bad_file_with_status_2_and_writes_nothing(tmp_path, capsys):
    good = _write(tmp_path, "model: tiny\n", "good.yaml")
    bad = _write(tmp_path, "model: tiny\nsteps: [{transform: lab_test_gain, params: {gain: '1'}}]\n", "bad.yaml")
    results = tmp_path / "runs"
    assert main(["run", str(good), str(bad), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: steps[0].params.gain: expected a number, got str '1'" in err
    assert len(err.strip().splitlines()) == 1
    assert not results.exists()
    assert main(["run", str(tmp_path / "missing.yaml"), "--results", str(results)]) == 2
    assert "missing.yaml: no such experiment file" in capsys.readouterr().err


def test_shipped_experiment_files_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments"
    # (experiments/ also holds distillation configs for `cbx distill`, which have their own schema)
    files = sorted(f for f in root.glob("*.yaml") if not f.name.startswith("distill-"))
    assert {f.name for f in files} >= {"demo.yaml", "baseline-original.yaml", "baseline-turbo.yaml", "baseline-multilingual.yaml"}
    for f in files:
        exps = load_experiments(f)
        assert exps and all(e.resolved()["synth"] for e in exps)
    demo = load_experiments(root / "demo.yaml")
    assert demo[0].is_baseline and demo[0].model == "tiny" and demo[0].eval.set == "offline"
    from cbx.compress.registry import registered

    used = {s.transform for e in demo for s in e.steps}
    # every registered compression of the workbench is in the demo (the student's checkpoint:
    # make demo trains it), and one row per field library (cbx.compress.libraries)
    reg = {n: spec for n, spec in registered().items() if not n.startswith("lab_test_")}
    library = {n for n, spec in reg.items() if spec.fn.__module__ == "cbx.compress.libraries"}
    assert used - library == set(reg) - library
    assert {n.split("_")[0] for n in used & library} == {"torchao", "bnb", "quanto"}


def test_a_checkpoint_named_by_a_step_is_part_of_the_experiment_identity(tmp_path):
    from dataclasses import dataclass

    from cbx.compress.registry import register_transform

    @dataclass(frozen=True)
    class LabCkptConfig:
        checkpoint: str = ""

    register_transform("lab_test_ckpt", LabCkptConfig)(lambda model, cfg: model)
    ck = tmp_path / "student"
    ck.mkdir()
    (ck / "w.bin").write_bytes(b"one")
    p = _write(tmp_path, f"steps: [{{transform: lab_test_ckpt, params: {{checkpoint: {ck}}}}}]\n")
    (exp,) = load_experiments(p)
    first = exp.resolved()["inputs"]
    assert list(first) == ["steps[0].params.checkpoint"]
    (ck / "w.bin").write_bytes(b"two")  # retrained in place
    assert exp.resolved()["inputs"] != first


@pytest.mark.parametrize("text, where", [
    ("model: tiny\nsteps:\n  - transform: [int8\n    x: 1\n", ":4:6: not valid YAML"),
    ("model: tiny\n  seed: 1\n", ":2:7: not valid YAML"),
    ("model: 'tiny\n", ":2:1: not valid YAML"),
])
def test_a_yaml_syntax_error_names_line_and_column(tmp_path, text, where):
    p = _write(tmp_path, text, "syntax.yaml")
    with pytest.raises(CbxError) as e:
        load_experiments(p)
    assert f"syntax.yaml{where}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_an_unknown_device_is_refused_at_load(tmp_path, device):
    p = _write(tmp_path, f"model: tiny\ndevice: '{device}'\n", "dev.yaml")
    with pytest.raises(CbxError, match=r"dev.yaml: device: unknown device .*valid choices: auto, cpu, cuda, cuda:N, mps"):
        load_experiments(p)


def test_a_folder_given_as_experiment_file_is_refused(tmp_path):
    with pytest.raises(CbxError, match="is a folder; give the experiment file itself"):
        load_experiments(tmp_path)


def test_yaml_reads_exponent_floats_like_yaml_1_2():
    from cbx.lab.schema import load_yaml

    data = load_yaml("a: 1e-3\nb: 2E5\nc: -1.5e+2\nd: 3\ne: '1e-3'\nf: 1.5\ng: 1e3x\n")
    assert data == {"a": 0.001, "b": 200000.0, "c": -150.0, "d": 3, "e": "1e-3", "f": 1.5, "g": "1e3x"}
    assert isinstance(data["a"], float) and isinstance(data["d"], int)


def test_eval_scorer_choices_load_resolve_and_enter_the_metric_versions(tmp_path):
    from cbx.eval.scorer import metric_versions

    p = _write(tmp_path, """
        eval:
          asr: {model: large-v3, device: cuda, compute_type: float16}
          speaker: wavlm
          mos: distillmos
          normalizer: seed-tts
          max_failed: 0.5
          timing_repeats: 3
    """)
    (exp,) = load_experiments(p)
    sc = exp.eval.scorer_config()
    assert (sc.asr.model, sc.asr.device, sc.asr.compute_type, sc.asr.normalizer) == ("large-v3", "cuda", "float16", "seed-tts")
    assert sc.speaker.backend == "wavlm" and sc.mos.backend == "distillmos"
    res = exp.resolved()["eval"]
    assert res["asr"]["model"] == "large-v3" and res["asr"]["beam_size"] == 5 and res["normalizer"] == "seed-tts"
    assert res["max_failed"] == 0.5 and res["timing_repeats"] == 3
    (default,) = load_experiments(_write(tmp_path, "eval: {set: offline}\n", "d.yaml"))
    assert default.resolved()["eval"]["asr"]["model"] == "tiny.en"  # the eval suite's default, recorded
    mv, dv = metric_versions(["wer", "speaker_sim", "mos", "mel_l1"], sc), metric_versions(["wer", "speaker_sim", "mos", "mel_l1"], default.eval.scorer_config())
    assert mv["wer"] != dv["wer"] and "seed-tts" in mv["wer"] and "large-v3" in mv["wer"]
    assert mv["speaker_sim"] != dv["speaker_sim"] and mv["mos"] != dv["mos"] and mv["mel_l1"] == dv["mel_l1"]
    # a shorthand and its mapping are the same experiment
    (short,) = load_experiments(_write(tmp_path, "eval: {asr: large-v3}\n", "s.yaml"))
    (long,) = load_experiments(_write(tmp_path, "eval: {asr: {model: large-v3}}\n", "l.yaml"))
    assert short.resolved()["eval"] == long.resolved()["eval"]


@pytest.mark.parametrize(
    "body,needle",
    [
        ("eval: {normalizer: lower}\n", "eval.asr: normalizer 'lower': valid choices are whisper-en, seed-tts"),
        ("eval: {asr: {modle: x}}\n", "eval.asr.modle: unknown key; valid keys: model"),
        ("eval: {speaker: ecapa}\n", "eval.speaker: speaker backend 'ecapa': valid choices are"),
        ("eval: {mos: utmos}\n", "eval.mos: MOS backend 'utmos': valid choices are"),
        ("eval: {asr: {normalizer: seed-tts}, normalizer: seed-tts}\n", "eval.normalizer: set the normalizer once"),
        ("eval: {max_failed: 1.5}\n", "eval.max_failed: expected a share in [0, 1)"),
        ("eval: {timing_repeats: 0}\n", "eval.timing_repeats: expected 1 or more"),
    ],
)
def test_bad_eval_choices_name_the_key(tmp_path, body, needle):
    with pytest.raises(CbxError) as e:
        load_experiments(_write(tmp_path, body))
    assert needle in str(e.value)


def test_an_own_eval_set_is_part_of_the_experiment_identity(tmp_path, monkeypatch):
    import json
    import shutil

    from cbx.eval import assets

    (p1, _), (p2, _) = assets.real_speech_clips(2)
    shutil.copy(p1, tmp_path / "a.wav")
    (tmp_path / "my.jsonl").write_text(json.dumps({"prompt": "a.wav", "text": "Hi."}) + "\n")
    monkeypatch.chdir(tmp_path)
    (exp,) = load_experiments(_write(tmp_path, "eval: {set: my.jsonl}\n"))
    h1 = exp.resolved()["inputs"]["eval.set"]
    shutil.copy(p2, tmp_path / "a.wav")
    assert exp.resolved()["inputs"]["eval.set"] != h1
