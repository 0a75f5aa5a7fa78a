"""cbx.engine.audio: formats, mixdown, resampling and the errors a bad voice file gets."""

import numpy as np
import pytest
import soundfile as sf

from cbx.engine import audio
from cbx.errors import CbxError


def _tone(sr, seconds, freq=220.0, amp=0.3):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3"])
def test_engine_audio_reads_formats_and_resamples(tmp_path, ext):
    if ext == "mp3" and "MP3" not in sf.available_formats():
        pytest.skip("libsndfile without mp3")
    x = _tone(44100, 1.0)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 44100)
    y = audio.load_audio(p, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16000) <= (1200 if ext == "mp3" else 0)  # mp3 adds encoder padding
    # still a 220 Hz tone of the same level after resampling
    spec = np.abs(np.fft.rfft(y[2000:14000]))
    assert abs(np.argmax(spec) * 16000 / 12000 - 220) < 3
    assert abs(np.sqrt(np.mean(y[2000:14000] ** 2)) - 0.3 / np.sqrt(2)) < 0.02


def test_engine_audio_matches_librosa_load(tmp_path):
    import librosa

    x = np.stack([_tone(22050, 1.0, 300), _tone(22050, 1.0, 500, 0.1)], axis=1)
    p = tmp_path / "stereo.wav"
    sf.write(p, x, 22050, subtype="FLOAT")
    ours = audio.load_audio(p, 24000)
    ref, _ = librosa.load(str(p), sr=24000)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-6
    native, sr = audio.load_audio_native(p)
    assert sr == 22050
    assert np.allclose(native, x.mean(axis=1), atol=1e-7)  # mono mixdown is the channel mean


def test_engine_audio_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(CbxError, match="nope.wav: audio file not found"):
        audio.load_audio(missing, 16000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(CbxError, match="empty.wav: audio file is empty"):
        audio.load_audio(empty, 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    with pytest.raises(CbxError, match="corrupt.wav: cannot read audio"):
        audio.load_audio(corrupt, 16000)
    noframes = tmp_path / "noframes.wav"
    sf.write(noframes, np.zeros(0, np.float32), 16000)
    with pytest.raises(CbxError, match="noframes.wav: audio is empty"):
        audio.load_audio(noframes, 16000)


def test_engine_audio_too_short_and_silent(tmp_path):
    short = tmp_path / "short.wav"
    sf.write(short, _tone(16000, 0.5), 16000)
    with pytest.raises(CbxError, match=r"short.wav: audio is too short \(0.50 s; the minimum is 5 s\)"):
        audio.load_audio(short, 16000, min_seconds=5)
    assert len(audio.load_audio(short, 16000, min_seconds=0.4)) == 8000
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(CbxError, match="silent.flac: audio is silent"):
        audio.load_audio(silent, 16000)
    hiss = tmp_path / "hiss.wav"
    sf.write(hiss, 1e-4 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    with pytest.raises(CbxError, match="silent"):
        audio.load_audio(hiss, 16000)
    quiet_speech_level = tmp_path / "quiet.wav"
    sf.write(quiet_speech_level, _tone(16000, 1.0, amp=0.01), 16000)  # -40 dBFS: accepted
    assert audio.load_audio(quiet_speech_level).shape == (16000,)


def test_engine_audio_write_wav_round_trip(tmp_path):
    x = _tone(24000, 0.5)
    p = audio.write_wav(tmp_path / "sub" / "out.wav", x, 24000)
    info = sf.info(p)
    assert info.samplerate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
    y = audio.load_audio(p)
    assert np.abs(y - x).max() < 1.0 / 32767 + 1e-6
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary left behind
    with pytest.raises(CbxError, match="NaN"):
        audio.write_wav(tmp_path / "bad.wav", np.array([0.0, np.nan], np.float32), 24000)
    assert not (tmp_path / "bad.wav").exists()
