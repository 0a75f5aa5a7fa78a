"""Paired baseline-relative statistics, the speed-up interval from repeated timings, and the
mel cepstral distortion of aligned outputs."""

from __future__ import annotations

import numpy as np
import pytest

from cbx.eval import fidelity as F
from cbx.eval import stats
from cbx.eval.metrics.fidelity import FidelityGroup
from cbx.eval.paired import compare
from cbx.eval.types import Utterance


def _rows(values, name="wer", skip=()):
    return [{"id": f"u{i}", "metrics": {} if i in skip else {name: v}} for i, v in enumerate(values)]


def test_pairing_finds_a_small_systematic_change_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.6, size=40)  # utterances differ a lot in difficulty
    test = base + 0.02  # every utterance 2 points worse
    out = compare(_rows(base), _rows(test))["metrics"]["wer"]
    assert out["n"] == 40 and out["delta"] == pytest.approx(0.02)
    lo, hi = out["delta_ci95"]
    assert 0 < lo <= 0.02 <= hi and out["significant"] is True
    # the two separate intervals overlap: without pairing the change would look like noise
    a, b = stats.mean_ci(base), stats.mean_ci(test)
    assert a[1] > b[0]


def test_noise_only_differences_are_marked_not_significant():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.0, 0.5, size=30)
    test = base + rng.normal(0, 0.05, size=30) - 0.0
    test -= test.mean() - base.mean()  # no change on average
    out = compare(_rows(base), _rows(test))["metrics"]["wer"]
    assert out["delta_ci95"][0] < 0 < out["delta_ci95"][1] and out["significant"] is False


def test_pairs_cover_only_utterances_scored_in_both_runs():
    base = _rows([0.1, 0.2, 0.3, 0.4], skip={0})  # u0 has no WER in the baseline
    test = _rows([0.5, 0.2, 0.3, 0.9], skip={3})[:-1] + [{"id": "u3", "metrics": {}}]  # u3 none here
    out = compare(base, test)
    assert out["n_common"] == 4
    m = out["metrics"]["wer"]
    assert m["n"] == 2 and m["base"] == pytest.approx(0.25) and m["value"] == pytest.approx(0.25)
    assert m["delta"] == 0.0 and m["ratio"] == pytest.approx(1.0)


def test_similarity_ratio_interval_and_single_pair_has_none():
    base = [0.80, 0.70, 0.90, 0.75, 0.85]
    test = [0.72, 0.63, 0.81, 0.675, 0.765]  # 10% lower each
    m = compare(_rows(base, "speaker_sim"), _rows(test, "speaker_sim"))["metrics"]["speaker_sim"]
    assert m["ratio"] == pytest.approx(0.9) and m["ratio_ci95"] == pytest.approx([0.9, 0.9], abs=1e-9)
    one = compare(_rows([0.8], "speaker_sim"), _rows([0.7], "speaker_sim"))["metrics"]["speaker_sim"]
    assert one["delta_ci95"] is None and one["significant"] is None


def test_speedup_interval_from_repeated_timings():
    base = [1.00, 1.05, 0.95, 1.02]
    fast = [0.50, 0.52, 0.49, 0.51]
    lo, hi = stats.ratio_of_means_ci(base, fast)
    assert lo <= np.mean(base) / np.mean(fast) <= hi and lo > 1.5 and stats.excludes((lo, hi), 1.0)
    same = stats.ratio_of_means_ci(base, [1.01, 0.97, 1.04, 0.99])
    assert same[0] < 1.0 < same[1] and not stats.excludes(same, 1.0)  # "within noise"
    assert stats.ratio_of_means_ci([1.0], fast) is None


@pytest.fixture(scope="module")
def speech():
    from cbx.eval import assets, dsp
    from cbx.eval.audio import read_audio

    path, _ = assets.real_speech_clips(1)[0]
    wav, sr = read_audio(path)
    return dsp.resample(wav.astype(np.float64), sr, 24000)[: 2 * 24000]


def test_mcd_is_zero_at_identity_and_grows_with_distortion(speech):
    assert F.mel_cepstral_distortion(speech, speech) == 0.0
    rng = np.random.default_rng(0)
    d = [F.mel_cepstral_distortion(speech, speech + rng.normal(0, s, speech.shape)) for s in (0.001, 0.01, 0.05)]
    assert 0 < d[0] < d[1] < d[2]
    # a pure level change moves only c0, which MCD leaves out (on a signal above the log floor)
    loud = rng.normal(0, 0.3, 24000)
    assert F.mel_cepstral_distortion(loud, 0.5 * loud) < 1e-6 < F.mel_cepstral_distortion(loud, loud + rng.normal(0, 0.1, 24000))


def test_fidelity_group_compares_the_aligned_output_when_given(speech):
    g = FidelityGroup()
    far = speech + np.random.default_rng(0).normal(0, 0.05, speech.shape)
    u = Utterance("x", far.astype(np.float32), 24000, "t", reference_audio=speech.astype(np.float32), reference_sr=24000)
    sampled = g.score(u)
    u.fidelity_audio, u.fidelity_sr = speech.astype(np.float32), 24000  # the aligned output: identical
    aligned = g.score(u)
    assert sampled["mel_l1"] > 0 and sampled["mcd_db"] > 0
    assert aligned["mel_l1"] == 0.0 and aligned["mcd_db"] == 0.0 and aligned["wave_snr_db"] == 200.0
