"""WER/CER: the error arithmetic, the normalizer, and the offline ASR on real recorded speech."""

from __future__ import annotations

import numpy as np
import pytest

from cbx.eval.audio import read_audio
from cbx.eval.metrics.asr import ASR_SR, error_counts, normalizer
from cbx.eval.types import Utterance

N_CLIPS = 40


def test_error_counts_arithmetic():
    c = error_counts("the cat sat on the mat", "the cat sat on mat today")
    assert (c.errors, c.ref_units) == (2, 6)  # one deletion, one insertion
    assert error_counts("", "anything") is None
    assert error_counts("abc", "abd", "char").rate == pytest.approx(1 / 3)


def test_normalizer_makes_spelling_and_numbers_agree():
    n = normalizer()
    ref = n("The train leaves from platform twelve, Dr. Smith said; it's the colour of 25 apples.")
    hyp = n("the train leaves from platform 12 doctor smith said it is the color of twenty five apples")
    assert error_counts(ref, hyp).errors == 0
    assert error_counts(ref, n("the bus leaves from platform 12")).errors > 5


@pytest.fixture(scope="module")
def clips():
    from cbx.eval.assets import real_speech_clips

    return [(read_audio(p), t) for p, t in real_speech_clips(N_CLIPS)]


@pytest.fixture(scope="module")
def scored(asr_group, clips):
    return [asr_group.score(Utterance(f"c{i}", w, sr, t)) for i, ((w, sr), t) in enumerate(clips)]


def test_offline_asr_wer_on_real_speech_is_at_most_ten_percent(scored):
    assert len(scored) >= 20
    corpus = sum(s["wer_errors"] for s in scored) / sum(s["wer_ref_words"] for s in scored)
    mean = float(np.mean([s["wer"] for s in scored]))
    print(f"offline ASR on {len(scored)} real Allison clips: corpus WER {corpus:.3f}, mean WER {mean:.3f}")
    assert corpus <= 0.10
    assert mean <= 0.10


def test_wer_catches_wrong_words(asr_group, clips):
    # The same audio scored against another clip's transcript must look unintelligible.
    (w, sr), _ = clips[0]
    wrong = clips[len(clips) // 2][1]
    s = asr_group.score(Utterance("x", w, sr, wrong))
    assert s["wer"] > 0.6 and s["cer"] > 0.4


def test_asr_is_deterministic_and_resamples_once(asr_group, clips):
    (w, sr), t = clips[3]
    u = Utterance("x", w, sr, t)
    a = asr_group.score(u)
    assert (("audio", ASR_SR) in u._resampled) and len(u._resampled) == 1
    b = asr_group.score(Utterance("y", w.copy(), sr, t))
    assert a == b
