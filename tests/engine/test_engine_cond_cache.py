"""Voice conditioning on disk (cbx.engine.cond_cache): hits across processes are bit-identical;
changed voice bytes or conditioning weights miss; damaged entries are rejected and recomputed."""

import copy
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cbx.engine import cond_cache, conditioning

REPO = Path(__file__).resolve().parents[2]


def _voice(path, seconds=1.5, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(t)) * t) + 0.02 * rng.standard_normal(t.shape)
    sf.write(path, x.astype(np.float32), sr)
    return path


def _flat(conds):
    out = {"t3.speaker_emb": conds.t3.speaker_emb, "t3.cond_prompt_speech_tokens": conds.t3.cond_prompt_speech_tokens,
           "t3.emotion_adv": conds.t3.emotion_adv}
    out.update({f"gen.{k}": v for k, v in conds.gen.items()})
    return out


def _assert_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if fa[k] is None or fb[k] is None:
            assert fa[k] is None and fb[k] is None, k
            continue
        assert fa[k].dtype == fb[k].dtype and fa[k].device == fb[k].device, k
        assert torch.equal(fa[k], fb[k]), k


@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = conditioning._compute
    monkeypatch.setattr(conditioning, "_compute", lambda *a: calls.append(1) or real(*a))
    conditioning.clear_cache()
    yield calls
    conditioning.clear_cache()


def _entries(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_cond_cache_hit_is_bit_identical_and_changes_miss(tiny_copy, tmp_path, counting):
    model = tiny_copy("original")
    folder = tmp_path / "conds"
    voice = _voice(tmp_path / "v.wav")
    fresh = conditioning.prepare_voice(model, voice, 0.7, use_cache=False)
    assert len(counting) == 1
    stats = dict(cond_cache.STATS)
    first = conditioning.prepare_voice(model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 2 and cond_cache.STATS["miss"] == stats["miss"] + 1
    assert len(_entries(folder)) == 1 and _entries(folder)[0].endswith(".safetensors")  # no temp file left
    conditioning.clear_cache()  # a new process: only the disk remains
    hit = conditioning.prepare_voice(model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 2 and cond_cache.STATS["hit"] == stats["hit"] + 1
    _assert_identical(hit, fresh)
    _assert_identical(first, fresh)
    conditioning.clear_cache()
    other = conditioning.prepare_voice(model, voice, 0.2, disk_cache=folder)  # exaggeration is applied on the way out
    assert len(counting) == 2 and other.t3.emotion_adv.item() == pytest.approx(0.2)

    _voice(voice, seed=1)  # same name, new bytes
    conditioning.clear_cache()
    conditioning.prepare_voice(model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 3 and len(_entries(folder)) == 2

    with torch.no_grad():  # a compressed T3 does not touch conditioning: the entry still serves
        next(model.t3.parameters()).mul_(0.5)
    conditioning.clear_cache()
    conditioning.prepare_voice(model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 3
    with torch.no_grad():  # a changed voice encoder (written in place) is another model: a miss
        next(model.ve.parameters()).add_(1e-3)
    conditioning.clear_cache()
    conditioning.prepare_voice(model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 4 and len(_entries(folder)) == 3
    other_model = copy.deepcopy(model)  # a replaced tokenizer tensor too
    p = next(other_model.s3gen.tokenizer.parameters())
    p.data = p.data.clone() * 1.01
    conditioning.prepare_voice(other_model, voice, 0.7, disk_cache=folder)
    assert len(counting) == 5 and len(_entries(folder)) == 4


def test_cond_cache_other_variant_misses(tiny_model, tiny_multilingual, tmp_path, counting):
    folder = tmp_path / "c"
    voice = _voice(tmp_path / "v.wav")
    conditioning.prepare_voice(tiny_model, voice, disk_cache=folder)
    conditioning.prepare_voice(tiny_multilingual, voice, disk_cache=folder)
    assert len(counting) == 2 and len(_entries(folder)) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "key"])
def test_cond_cache_damaged_entry_is_recomputed_with_warning(tiny_model, tmp_path, counting, caplog, damage):
    folder = tmp_path / "c"
    voice = _voice(tmp_path / "v.wav")
    fresh = conditioning.prepare_voice(tiny_model, voice, disk_cache=folder)
    (entry,) = folder.iterdir()
    data = bytearray(entry.read_bytes())
    if damage == "flip":  # a flipped byte in the tensor data, header intact
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00" * 40)
    else:  # a header naming another key (e.g. written by other weights under a colliding name)
        data = bytearray(bytes(data).replace(b'format', b'formax', 1))
    entry.write_bytes(bytes(data))
    conditioning.clear_cache()
    with caplog.at_level(logging.WARNING, logger="cbx.engine.cond_cache"):
        again = conditioning.prepare_voice(tiny_model, voice, disk_cache=folder)
    assert len(counting) == 2
    assert any("rejected" in r.getMessage() and entry.name in r.getMessage() for r in caplog.records)
    _assert_identical(again, fresh)
    conditioning.clear_cache()  # the bad entry was overwritten by a good one
    conditioning.prepare_voice(tiny_model, voice, disk_cache=folder)
    assert len(counting) == 2


def test_cond_cache_unwritable_folder_warns_and_goes_on(tiny_model, tmp_path, counting, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="cbx.engine.cond_cache"):
        conds = conditioning.prepare_voice(tiny_model, _voice(tmp_path / "v.wav"), disk_cache=blocker / "sub")
    assert conds.gen["prompt_feat"].numel() > 0
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_cond_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CBX_COND_CACHE", raising=False)
    monkeypatch.setenv("CBX_CACHE_DIR", str(tmp_path))
    assert cond_cache.default_dir() == tmp_path / "conds"
    monkeypatch.delenv("CBX_CACHE_DIR")
    assert cond_cache.default_dir() == Path.home() / ".cache" / "cbx" / "conds"
    monkeypatch.setenv("CBX_COND_CACHE", str(tmp_path / "x"))
    assert cond_cache.resolve(None) == tmp_path / "x"
    assert cond_cache.resolve(False) is None
    assert cond_cache.resolve(tmp_path / "y") == tmp_path / "y"
    monkeypatch.setenv("CBX_COND_CACHE", "off")
    assert cond_cache.resolve(None) is None


def test_cond_cache_second_process_hits(tiny_model, tmp_path, counting):
    """Another Python process conditions the voice; this one loads the same bits from disk."""
    folder = tmp_path / "c"
    voice = _voice(tmp_path / "v.wav", seed=3)
    # The child sets its threads as conftest sets this process's: how torch's thread pools are set
    # up (OMP_NUM_THREADS at start vs set_num_threads later) changes the voice encoder's last bits.
    threads = "" if "OMP_NUM_THREADS" in os.environ else f"torch.set_num_threads({torch.get_num_threads()})"
    script = textwrap.dedent(f"""
        import logging, sys, torch
        {threads}
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from cbx.engine.tiny import build_tiny
        from cbx.engine.conditioning import prepare_voice
        from cbx.engine import cond_cache
        prepare_voice(build_tiny("original", seed=0), {str(voice)!r})
        print("STATS", cond_cache.STATS)
    """)
    env = dict(os.environ, CBX_COND_CACHE=str(folder), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "disk cache miss" in out.stdout and "'miss': 1" in out.stdout
    hit = conditioning.prepare_voice(tiny_model, voice, disk_cache=folder)
    assert len(counting) == 0
    _assert_identical(hit, conditioning.prepare_voice(tiny_model, voice, use_cache=False))


def test_synthesizer_uses_the_disk_cache_and_can_bypass_it(tiny_model, tmp_path, counting):
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer

    folder = tmp_path / "c"
    voice = _voice(tmp_path / "v.wav")
    req = [SynthRequest("Hello there.", str(voice))]
    s = SynthSettings(max_speech_tokens=8, cfm_steps=1, watermark=False, dtype="fp32")
    a = Synthesizer(tiny_model, disk_cache=folder).synthesize(req, s, progress=False)
    conditioning.clear_cache()
    b = Synthesizer(tiny_model, disk_cache=folder).synthesize(req, s, progress=False)  # a fresh Synthesizer
    assert len(counting) == 1
    np.testing.assert_array_equal(a.results[0].wav, b.results[0].wav)
    conditioning.clear_cache()
    Synthesizer(tiny_model, disk_cache=False).synthesize(req, s, progress=False)  # bypass: paid again
    assert len(counting) == 2
