"""The MOS predictor scores clean real speech above the same speech with 5 dB white noise."""

from __future__ import annotations

import numpy as np

from cbx.eval import assets
from cbx.eval.audio import read_audio
from cbx.eval.metrics.mos import MOS_SR
from cbx.eval.types import Utterance


def _with_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(x)).astype(np.float32)
    scale = np.sqrt(np.mean(x**2) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    return (x + scale * noise).astype(np.float32)


def test_clean_speech_beats_the_same_speech_with_5db_noise(mos_group):
    clean, noisy = [], []
    for i, voice in enumerate(assets.VOICES):
        path, _ = assets.voice_prompt(voice)
        w, sr = read_audio(path)
        x = Utterance("x", w, sr, "").audio_at(MOS_SR)
        clean.append(mos_group.predict(x))
        noisy.append(mos_group.predict(_with_noise(x, 5.0, seed=i)))
    print("MOS clean " + " ".join(f"{c:.2f}" for c in clean) + " | +5 dB noise " + " ".join(f"{n:.2f}" for n in noisy))
    assert all(c > n for c, n in zip(clean, noisy))
    assert np.mean(clean) - np.mean(noisy) > 0.5
    assert all(1.0 <= v <= 5.0 for v in clean + noisy)


def test_dnsmos_matches_the_speechmos_reference(mos_group):
    from speechmos import dnsmos

    w, sr = read_audio(assets.source_path("moonshine:two_cities.wav"))
    x = Utterance("x", w, sr, "").audio_at(MOS_SR)
    # several 1 s hops; a short clip that the reference also scores on one window; noisy speech
    for clip in (x[: int(11.5 * MOS_SR)], x[: int(4.7 * MOS_SR)], _with_noise(x[: 10 * MOS_SR], 5.0, seed=1).clip(-1, 1)):
        ref = float(dnsmos.run(clip, MOS_SR)["ovrl_mos"])
        # speechmos cuts windows at float-rounded sample indices (one sample off at some hops)
        assert abs(mos_group.predict(clip) - ref) < 0.01
