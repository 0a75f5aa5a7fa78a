"""The evaluation protocol on the real pipeline (built-in tiny model, real scorers): fidelity of
a model to itself is exact with sampling on, and an own JSONL eval set with one silent prompt
runs to the end with that utterance recorded as failed and the rest scored."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf

from cbx.compress.registry import register_transform
from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step, load_experiments

SYNTH = {"max_speech_tokens": 16, "cfm_steps": 2, "batch_size": 2}


@dataclass(frozen=True)
class _IdentityConfig:
    """Test transform that changes nothing: a 'compressed' model equal to its baseline."""

    note: str = "identity"


@register_transform("lab_test_identity", _IdentityConfig)
def _identity(model, cfg):
    return model


@pytest.mark.slow
def test_fidelity_of_a_model_to_itself_is_exact_with_sampling_on(tmp_path):
    exp = Experiment(name="self", model="tiny", steps=(Step("lab_test_identity", {}),), synth=SYNTH,
                     eval=EvalConfig(set="offline", limit=2, samples=0, warmup=0,
                                     metrics=("mel_l1", "mcd_db", "wave_snr_db", "t3_top1_agreement", "t3_kl")))
    assert exp.synth_settings().resolved("original").temperature > 0  # sampling is on
    rec = Runner(tmp_path, progress=False).run(exp).record
    assert rec["status"] == "done", rec.get("failure")
    m = {k: v for k, v in rec["aggregate"]["metrics"].items()}
    assert m["t3_kl"]["value"] == 0.0 and m["t3_top1_agreement"]["value"] == 1.0
    assert m["mel_l1"]["value"] == 0.0 and m["mcd_db"]["value"] == 0.0 and m["wave_snr_db"]["value"] == 200.0
    assert all(m[k]["n"] == 2 for k in m)


def _good_prompts(d, n):
    from cbx.eval import assets

    out = []
    for i, (p, t) in enumerate(assets.real_speech_clips(n, min_s=2.0)):
        shutil.copy(p, d / f"good{i}.wav")
        out.append((f"voices/good{i}.wav", t))
    return out


@pytest.mark.slow
def test_own_eval_set_with_a_silent_prompt_runs_to_the_end(tmp_path, monkeypatch):
    voices = tmp_path / "voices"
    voices.mkdir()
    sf.write(voices / "silent.wav", np.zeros(3 * 16000, np.float32), 16000)
    lines = [{"prompt": "voices/silent.wav", "text": "Nobody can hear this prompt.", "id": "silent"}]
    lines += [{"prompt": p, "text": f"Sentence number {i} is read here.", "prompt_text": t} for i, (p, t) in enumerate(_good_prompts(voices, 5))]
    (tmp_path / "my.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "exp.yaml").write_text(
        "model: tiny\n"
        f"synth: {json.dumps(SYNTH)}\n"
        "eval: {set: my.jsonl, asr: tiny.en, normalizer: seed-tts, max_failed: 0.5, metrics: [wer, cer, speaker_sim], warmup: 0}\n"
    )
    monkeypatch.chdir(tmp_path)
    (exp,) = load_experiments(tmp_path / "exp.yaml")
    rec = Runner(tmp_path / "runs", progress=False).run(exp).record
    assert rec["status"] == "done", rec.get("failure")
    assert rec["eval_set"]["name"] == "my.jsonl" and rec["eval_set"]["n_items"] == 6
    f = rec["failures"]
    assert f["n"] == 1 and f["ids"] == ["silent"] and "silent" in f["utterances"][0]["reason"]
    agg = rec["aggregate"]
    assert agg["n_scored"] == 5 and agg["metrics"]["wer"]["n"] == 5
    assert "seed-tts" in agg["metrics"]["wer"]["variant"] and "seed-tts" in rec["metric_versions"]["wer"]
    assert rec["config"]["eval"]["asr"]["normalizer"] == "seed-tts"


def test_turbo_refuses_a_prompt_under_five_seconds_as_a_per_utterance_reason(tiny_turbo, tmp_path):
    from cbx.engine.bench import synthetic_voice
    from cbx.lab.runner import Backend

    short, long_ = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, synthetic_voice(3.0, sr=16000, seed=1), 16000)
    sf.write(long_, synthetic_voice(6.0, sr=16000, seed=1), 16000)
    why = Backend().check_prompt(tiny_turbo, str(short))
    assert why is not None and "too short" in why and "5 s" in why and "short.wav" in why
    assert Backend().check_prompt(tiny_turbo, str(long_)) is None
