"""The synthesis pipeline on the built-in tiny model: batching, chunking, seeding, timings.

Voices are synthetic voiced audio (harmonics with a gliding pitch and noise) written to temp
files at different rates and formats, so these tests need no assets. CFM runs 2 steps and
T3 is capped to a few dozen tokens to keep the whole file within a few seconds of CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from cbx.engine.bench import synthetic_voice
from cbx.engine.synth import (
    SAMPLE_RATE,
    SynthRequest,
    SynthSettings,
    Synthesizer,
    crossfade_join,
    equal_power_fades,
)
from cbx.engine.timing import STAGES
from cbx.errors import CbxError

SAMPLES_PER_TOKEN = SAMPLE_RATE // 25  # S3Gen: 25 tokens/s -> 960 samples per token
# fp32: the engine's faithfulness and batch invariance are contracts at fp32 (dtype "auto" would
# pick bf16 on a CPU with native bf16)
FAST = dict(max_speech_tokens=40, cfm_steps=2, batch_size=8, dtype="fp32")
LONG_TEXT = ("The first sentence is here. A second one follows it closely! "
             "And a third sentence closes the paragraph?")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model ops are far too small to gain from intra-op threads, and on a shared 2-core
    machine OpenMP threads spinning against each other made these tests 20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    a = d / "a.wav"
    sf.write(a, synthetic_voice(3.0, sr=16_000, seed=1), 16_000)
    b = d / "b.flac"
    stereo = np.stack([synthetic_voice(4.0, sr=44_100, seed=2), synthetic_voice(4.0, sr=44_100, seed=3)], axis=1)
    sf.write(b, stereo, 44_100)
    return str(a), str(b)


@pytest.fixture(scope="module")
def batch3(model, voices):
    a, b = voices
    reqs = [SynthRequest("Hello there, this is short.", a, id="short"),
            SynthRequest(LONG_TEXT, b, id="long"),
            SynthRequest("A medium length sentence for the test.", a)]
    return reqs, Synthesizer(model).synthesize(reqs, SynthSettings(seed=3, **FAST), progress=False)


def _expected_len(chunk_tokens: list[int], overlap: int) -> int:
    pieces = [n * SAMPLES_PER_TOKEN for n in chunk_tokens if n > 0]
    joints = sum(min(overlap, x, y) for x, y in zip(pieces, pieces[1:]))
    return sum(pieces) - joints


def test_batch_of_three_gives_finite_nonsilent_24k_audio(batch3):
    reqs, batch = batch3
    assert [r.id for r in batch.results] == ["short", "long", "utt2"]
    for res in batch.results:
        assert res.sample_rate == SAMPLE_RATE
        assert res.wav.dtype == np.float32 and res.wav.ndim == 1
        assert np.all(np.isfinite(res.wav))
        assert res.speech_tokens.size > 0
        assert np.sqrt(np.mean(res.wav**2)) > 1e-4, "silent output"
        assert res.audio_s == pytest.approx(len(res.wav) / SAMPLE_RATE)
        assert res.speech_tokens.max() < 6561  # only real speech tokens reach S3Gen
    assert batch.results[1].chunks == ["The first sentence is here.", "A second one follows it closely!",
                                       "And a third sentence closes the paragraph?"]


def test_chunked_text_is_joined_with_crossfades(batch3):
    _, batch = batch3
    long = batch.results[1]
    overlap = int(round(SynthSettings().crossfade_ms * SAMPLE_RATE / 1000))
    per_chunk = long.chunk_tokens
    assert len(per_chunk) == 3
    assert sum(per_chunk) == long.speech_tokens.size
    assert len(long.wav) == _expected_len(per_chunk, overlap)
    short = batch.results[0]
    assert len(short.wav) == short.speech_tokens.size * SAMPLES_PER_TOKEN


def test_timings_cover_every_stage_and_add_up(batch3):
    _, batch = batch3
    t = batch.timings
    for stage in (*STAGES, "total"):
        assert stage in t and t[stage] >= 0.0
    assert t["t3"] > 0 and t["cfm"] > 0 and t["vocoder"] > 0 and t["watermark"] > 0
    staged = sum(t[s] for s in STAGES)
    assert staged <= t["total"] + 1e-6
    assert staged >= 0.8 * t["total"], f"{staged:.3f} s of {t['total']:.3f} s accounted for by stages"
    # per-utterance shares add up to the batch figure, stage by stage
    for stage in STAGES:
        assert sum(r.timings[stage] for r in batch.results) == pytest.approx(t[stage], rel=1e-6, abs=1e-9)
    assert batch.speech_tokens_per_s == pytest.approx(
        sum(r.speech_tokens.size for r in batch.results) / t["t3"])
    assert batch.peak_mem_bytes > 0
    d = batch.run.to_dict()
    assert d["n_utterances"] == 3 and d["speech_tokens"] == sum(r.speech_tokens.size for r in batch.results)


def test_same_seed_same_audio_different_seed_different_audio(model, voices):
    syn = Synthesizer(model)
    req = [SynthRequest("Seeds make this repeatable.", voices[0])]
    s = SynthSettings(seed=11, watermark=False, **FAST)
    a = syn.synthesize(req, s, progress=False).results[0]
    b = syn.synthesize(req, s, progress=False).results[0]
    np.testing.assert_array_equal(a.speech_tokens, b.speech_tokens)
    np.testing.assert_array_equal(a.wav, b.wav)
    c = syn.synthesize(req, SynthSettings(seed=12, watermark=False, **FAST), progress=False).results[0]
    assert not (a.speech_tokens.size == c.speech_tokens.size and np.array_equal(a.speech_tokens, c.speech_tokens))


def test_compiled_decode_step_gives_the_same_audio(model, voices):
    """``compile`` reaches T3's decode (the "eager" backend captures the step's graph without a
    C++ toolchain) and changes nothing in what is synthesized."""
    from cbx.engine import t3_decode

    syn = Synthesizer(model)
    req = [SynthRequest("Compiled or not, the same.", voices[0])]
    plain = syn.synthesize(req, SynthSettings(seed=5, watermark=False, **FAST), progress=False).results[0]
    t3_decode._COMPILED.pop("eager", None)
    comp = syn.synthesize(req, SynthSettings(seed=5, watermark=False, compile="eager", **FAST), progress=False).results[0]
    assert "eager" in t3_decode._COMPILED  # the compiled step was built and used
    np.testing.assert_array_equal(plain.speech_tokens, comp.speech_tokens)
    np.testing.assert_allclose(plain.wav, comp.wav, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_result_equals_alone_result(model, voices, temperature):
    syn = Synthesizer(model)
    target = SynthRequest("This one is checked alone and in company.", voices[1], id="t")
    others = [SynthRequest("Some other words to pad the batch.", voices[0]),
              SynthRequest("Yet another sentence, quite a bit longer than the rest of them.", voices[0])]
    s = SynthSettings(seed=5, temperature=temperature, watermark=False, **FAST)
    alone = syn.synthesize([target], s, progress=False).results[0]
    mixed = syn.synthesize([others[0], target, others[1]], s, progress=False).results[1]
    if temperature == 0.0:
        np.testing.assert_array_equal(alone.speech_tokens, mixed.speech_tokens)
    else:
        n = min(alone.speech_tokens.size, mixed.speech_tokens.size)
        agree = np.mean(alone.speech_tokens[:n] == mixed.speech_tokens[:n])
        assert agree >= 0.99 and abs(alone.speech_tokens.size - mixed.speech_tokens.size) <= 1
    if np.array_equal(alone.speech_tokens, mixed.speech_tokens):
        np.testing.assert_allclose(alone.wav, mixed.wav, atol=1e-4)


def test_groups_of_batch_size_give_the_same_results(model, voices):
    reqs = [SynthRequest(f"Sentence number {w}.", voices[i % 2]) for i, w in enumerate(["one", "two", "three"])]
    s = dict(seed=2, temperature=0.0, watermark=False, max_speech_tokens=20, cfm_steps=2, dtype="fp32")
    whole = Synthesizer(model).synthesize(reqs, SynthSettings(batch_size=3, **s), progress=False)
    split = Synthesizer(model).synthesize(reqs, SynthSettings(batch_size=2, **s), progress=False)
    assert whole.run.extra["groups"] == 1 and split.run.extra["groups"] == 2
    for x, y in zip(whole.results, split.results):
        np.testing.assert_array_equal(x.speech_tokens, y.speech_tokens)
        np.testing.assert_allclose(x.wav, y.wav, atol=1e-4)


def test_force_tokens_decodes_exactly_that_many(model, voices):
    out = Synthesizer(model).synthesize([SynthRequest("Forced length.", voices[0])],
                                        SynthSettings(force_tokens=7, cfm_steps=1, watermark=False, dtype="fp32"), progress=False)
    res = out.results[0]
    assert res.speech_tokens.size == 7
    assert len(res.wav) == 7 * SAMPLES_PER_TOKEN


def test_bad_requests_raise_cbx_errors_naming_the_problem(model, tmp_path):
    syn = Synthesizer(model)
    with pytest.raises(CbxError, match="empty"):
        syn.synthesize([SynthRequest("   ", None)], SynthSettings(**FAST), progress=False)
    with pytest.raises(CbxError, match="missing.wav"):
        syn.synthesize([SynthRequest("Hi.", str(tmp_path / "missing.wav"))], SynthSettings(**FAST), progress=False)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(48_000, np.float32), 24_000)
    with pytest.raises(CbxError, match="silent.wav"):
        syn.synthesize([SynthRequest("Hi.", str(silent))], SynthSettings(**FAST), progress=False)
    short = tmp_path / "short.wav"
    sf.write(short, synthetic_voice(0.3, sr=16_000), 16_000)
    with pytest.raises(CbxError, match="short.wav.*too short"):
        syn.synthesize([SynthRequest("Hi.", str(short))], SynthSettings(**FAST), progress=False)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(CbxError, match="garbage.mp3"):
        syn.synthesize([SynthRequest("Hi.", str(garbage))], SynthSettings(**FAST), progress=False)
    with pytest.raises(CbxError, match="nothing to synthesize"):
        syn.synthesize([], SynthSettings(**FAST), progress=False)


# ----------------------------------------------------------------------------- settings


def test_settings_validate_and_name_the_field():
    with pytest.raises(CbxError, match="'top_p'"):
        SynthSettings(top_p=0.0)
    with pytest.raises(CbxError, match="'temperature'"):
        SynthSettings(temperature=float("nan"))
    with pytest.raises(CbxError, match="'dtype'"):
        SynthSettings(dtype="fp8")
    with pytest.raises(CbxError, match="'batch_size'"):
        SynthSettings(batch_size=0)
    with pytest.raises(CbxError, match="'seed'"):
        SynthSettings(seed=1.5)
    with pytest.raises(CbxError, match="'watermark'"):
        SynthSettings(watermark="yes")
    with pytest.raises(CbxError, match="'compile'.*inductor"):
        SynthSettings(compile="inductr")


def test_settings_fill_variant_defaults_but_keep_given_values():
    orig = SynthSettings().resolved("original")
    turbo = SynthSettings(top_p=0.5).resolved("turbo")
    mtl = SynthSettings().resolved("multilingual")
    assert (orig.cfm_steps, orig.cfg_weight, orig.repetition_penalty) == (10, 0.5, 1.2)
    assert (turbo.cfm_steps, turbo.cfg_weight, turbo.top_k, turbo.top_p) == (2, 0.0, 1000, 0.5)
    assert mtl.repetition_penalty == 2.0
    with pytest.raises(CbxError, match="variant"):
        SynthSettings().resolved("huge")


def test_a_student_models_step_count_is_the_default_but_an_explicit_one_wins():
    from types import SimpleNamespace

    student = SimpleNamespace(variant="original", meta={"cfm_steps": 3})
    assert SynthSettings().resolved(student).cfm_steps == 3
    assert SynthSettings(cfm_steps=7).resolved(student).cfm_steps == 7
    assert SynthSettings().resolved(SimpleNamespace(variant="original", meta={})).cfm_steps == 10


# ----------------------------------------------------------------------------- crossfade math


def test_equal_power_fades_keep_power_constant():
    fo, fi = equal_power_fades(257)
    np.testing.assert_allclose(fo**2 + fi**2, 1.0, atol=1e-6)
    assert fo[0] > 0.99 and fi[0] < 0.01 and fo[-1] < 0.01 and fi[-1] > 0.99
    assert np.all(np.diff(fo) < 0) and np.all(np.diff(fi) > 0)


def test_crossfade_join_lengths_and_values():
    a, b, c = np.ones(100, np.float32), 2 * np.ones(50, np.float32), 3 * np.ones(10, np.float32)
    out = crossfade_join([a, b, c], overlap=20)
    # the second joint is limited by the 10-sample piece
    assert len(out) == 100 + 50 + 10 - 20 - 10
    np.testing.assert_array_equal(out[:80], 1.0)
    np.testing.assert_array_equal(out[100:110], 2.0)
    fo, fi = equal_power_fades(20)
    np.testing.assert_allclose(out[80:100], fo * 1.0 + fi * 2.0, rtol=1e-6)
    assert len(crossfade_join([a], 20)) == 100 and len(crossfade_join([], 20)) == 0
    np.testing.assert_array_equal(crossfade_join([a, b], 0), np.concatenate([a, b]))


# ----------------------------------------------------------------------------- variants, dtype


def test_turbo_appends_silence_tokens_before_s3gen(tiny_turbo):
    out = Synthesizer(tiny_turbo).synthesize([SynthRequest("Turbo speaks too.", None)],
                                             SynthSettings(force_tokens=6, watermark=False, dtype="fp32"), progress=False)
    res = out.results[0]
    assert out.settings.cfm_steps == 2 and out.settings.cfg_weight == 0.0  # Turbo's own defaults
    assert res.speech_tokens.size == 6
    # tts_turbo.generate() adds 3 silence tokens: S3Gen renders 6 + 3 tokens
    assert len(res.wav) == 9 * SAMPLES_PER_TOKEN
    assert np.all(np.isfinite(res.wav))


def test_multilingual_uses_the_language_of_each_request(tiny_multilingual):
    syn = Synthesizer(tiny_multilingual)
    s = SynthSettings(force_tokens=4, cfm_steps=1, watermark=False, language_id="fr", dtype="fp32")
    out = syn.synthesize([SynthRequest("Bonjour tout le monde.", None),
                          SynthRequest("Hola a todos.", None, language_id="es")], s, progress=False)
    assert [r.speech_tokens.size for r in out.results] == [4, 4]
    with pytest.raises(CbxError, match="xx"):
        syn.synthesize([SynthRequest("Hi.", None, language_id="xx")], s, progress=False)


def test_bf16_runs_on_cast_copies_and_leaves_the_model_fp32(model):
    import torch

    syn = Synthesizer(model)
    s = dict(seed=4, temperature=0.0, watermark=False, max_speech_tokens=24, cfm_steps=2)
    fp = syn.synthesize([SynthRequest("Precision check.", None)], SynthSettings(dtype="fp32", **s),
                        progress=False).results[0]
    bf = syn.synthesize([SynthRequest("Precision check.", None)], SynthSettings(dtype="bf16", **s),
                        progress=False).results[0]
    assert next(model.t3.parameters()).dtype == torch.float32
    assert next(model.s3gen.flow.decoder.estimator.parameters()).dtype == torch.float32
    assert bf.wav.dtype == np.float32 and np.all(np.isfinite(bf.wav)) and bf.speech_tokens.size > 0
    cast = [copy for _, copy in syn._casts.values()]
    assert len(cast) == 2 and all(next(m.parameters()).dtype == torch.bfloat16 for m in cast)
    # greedy decoding in bf16 follows fp32 for a while on the tiny model
    n = min(8, fp.speech_tokens.size, bf.speech_tokens.size)
    assert np.mean(fp.speech_tokens[:n] == bf.speech_tokens[:n]) >= 0.75


@pytest.mark.cuda
def test_cuda_synthesis_matches_cpu_greedy_tokens(tiny_copy, voices):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    s = SynthSettings(seed=1, temperature=0.0, watermark=False, max_speech_tokens=24, cfm_steps=2, dtype="fp32")
    req = [SynthRequest("Same on every device.", voices[0])]
    cpu = Synthesizer(tiny_copy("original")).synthesize(req, s, progress=False)
    gpu = Synthesizer(tiny_copy("original"), device="cuda").synthesize(req, s, progress=False)
    assert gpu.run.mem_kind == "cuda_max_allocated" and gpu.peak_mem_bytes > 0
    n = min(cpu.results[0].speech_tokens.size, gpu.results[0].speech_tokens.size)
    assert np.mean(cpu.results[0].speech_tokens[:n] == gpu.results[0].speech_tokens[:n]) >= 0.9
    assert np.all(np.isfinite(gpu.results[0].wav))


def test_dtype_auto_is_resolved_per_device():
    from cbx.engine.synth import auto_dtype, cpu_has_native_bf16

    assert SynthSettings().dtype == "auto"
    assert cpu_has_native_bf16("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512vl")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16x")
    resolved = SynthSettings().resolved("original")
    assert resolved.dtype == auto_dtype("cpu") and resolved.dtype in ("fp32", "bf16")
    assert SynthSettings(dtype="fp32").resolved("original").dtype == "fp32"


def test_cfm_dtype_is_chosen_apart_from_t3_and_recorded(model, voices, caplog):
    """``cfm_dtype`` picks the CFM estimator's dtype apart from ``dtype`` (T3): None follows
    ``dtype``, ``auto`` is the device's; the resolved settings and the log name every stage's."""
    import logging

    import torch

    from cbx.engine.synth import auto_dtype, stage_dtypes
    from cbx.errors import CbxError
    from cbx.lab.bench_stack import default_settings

    assert SynthSettings(dtype="bf16").resolved("original").cfm_dtype == "bf16"
    assert SynthSettings(dtype="fp32", cfm_dtype="auto").resolved("original").cfm_dtype == auto_dtype("cpu")
    mixed = SynthSettings(dtype="bf16", cfm_dtype="fp32").resolved("original")
    assert mixed.to_dict()["cfm_dtype"] == "fp32"
    assert stage_dtypes(mixed) == {"t3_prefill": mixed.prefill_dtype, "t3_decode": "bf16", "flow_encoder": "fp32",
                                   "cfm_estimator": "fp32", "hift": "fp32"}
    with pytest.raises(CbxError, match="cfm_dtype"):
        SynthSettings(cfm_dtype="fp16")
    with pytest.raises(CbxError, match="resolved"):
        stage_dtypes(SynthSettings())
    # bench stack's default: T3 bf16, every S3Gen stage in the device's own choice
    auto = auto_dtype("cpu")
    assert set(stage_dtypes(default_settings(torch.device("cpu")).resolved("original")).values()) == {"bf16", auto}
    assert stage_dtypes(default_settings(torch.device("cpu")).resolved("original"))["hift"] == auto
    # the decoder alone (no T3): an fp32 estimator under a bf16 T3 is the all-fp32 decoder, bit for bit
    tokens = np.arange(1, 40) * 37 % 6561
    base = dict(seed=2, watermark=False, **{k: v for k, v in FAST.items() if k != "dtype"})
    syn = Synthesizer(model)
    with caplog.at_level(logging.INFO, logger="cbx.engine.synth"):
        a = syn.decode_tokens(voices[0], tokens, SynthSettings(dtype="bf16", cfm_dtype="fp32", **base))
        syn.prepare(SynthSettings(dtype="bf16", cfm_dtype="fp32", **base))
    assert "t3_decode bf16, flow_encoder fp32, cfm_estimator fp32, hift fp32" in caplog.text
    # a memory-bound bf16 decode is no warning; a bf16 S3Gen stage is, where bf16 is emulated
    assert not any("emulated" in r.getMessage() and "t3_decode" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cbx.engine.synth"):
        syn.prepare(SynthSettings(dtype="fp32", cfm_dtype="bf16", **base))
    assert ("emulated here" in caplog.text and "cfm_estimator" in caplog.text) == (auto_dtype("cpu") != "bf16")
    np.testing.assert_array_equal(a, syn.decode_tokens(voices[0], tokens, SynthSettings(dtype="fp32", **base)))
    b = syn.decode_tokens(voices[0], tokens, SynthSettings(dtype="fp32", cfm_dtype="bf16", **base))
    assert b.shape == a.shape and not np.array_equal(a, b)
    assert [next(m.parameters()).dtype for m in syn.cast_copies()] == [torch.bfloat16, torch.bfloat16]

def test_s3gen_prompt_cap_is_opt_in_recorded_and_cuts_the_flow_prompt(model, voices, caplog):
    """``s3gen_prompt_s`` (off by default) cuts S3Gen's prompt to its first seconds: the flow's
    prompt is 50 frames a second, the speech keeps its length, the audio is the decoder's given
    that cut prompt exactly, and the log and the resolved settings say so."""
    import logging

    import torch

    from cbx.engine import s3gen_batch as sb
    from cbx.engine.conditioning import prepare_voice
    from cbx.errors import CbxError

    assert SynthSettings().s3gen_prompt_s is None
    with pytest.raises(CbxError, match="s3gen_prompt_s"):
        SynthSettings(s3gen_prompt_s=0)
    gen = prepare_voice(model, voices[1]).gen  # a 4 s reference: 100 prompt tokens, 200 frames
    assert int(gen["prompt_token_len"].reshape(-1)[0]) == 100
    cut = sb.cap_prompt(gen, 1.5)
    assert cut["prompt_token"].shape[-1] == int(cut["prompt_token_len"].reshape(-1)[0]) == 37
    assert cut["prompt_feat"].shape[-2] == 74 and torch.equal(cut["prompt_feat"], gen["prompt_feat"][:, :74])
    assert torch.equal(cut["prompt_token"], gen["prompt_token"][..., :37]) and cut["embedding"] is gen["embedding"]
    assert sb.cap_prompt(gen, 10.0) is gen and sb.cap_prompt(gen, None) is gen
    with pytest.raises(ValueError):
        sb.cap_prompt(gen, -1.0)
    base = dict(seed=2, watermark=False, **FAST)
    tokens = np.arange(1, 40) * 37 % 6561
    syn = Synthesizer(model)
    with caplog.at_level(logging.WARNING, logger="cbx.engine.synth"):
        syn.prepare(SynthSettings(s3gen_prompt_s=1.5, **base))
    assert "prompt capped to its first 1.5 s" in caplog.text
    capped = syn.decode_tokens(voices[1], tokens, SynthSettings(s3gen_prompt_s=1.5, **base))
    whole = syn.decode_tokens(voices[1], tokens, SynthSettings(**base))
    assert capped.shape == whole.shape and not np.array_equal(capped, whole)
    with torch.inference_mode():  # the decoder given the cut prompt, by hand
        inputs = sb.cfm_inputs(model, [torch.as_tensor(tokens)], [cut])
        assert inputs.prompt_lens == [74]
        mel = sb.solve_cfm(model.s3gen.flow.decoder.estimator, inputs, sb.cfm_noise(inputs, [2], False), 2,
                           model.s3gen.flow.decoder.inference_cfg_rate, False)
        by_hand = sb.vocode(model, sb.crop_mels(mel, inputs), seeds=[2])[0]
    np.testing.assert_array_equal(capped, by_hand)
    req = [SynthRequest("A capped prompt.", voices[1])]
    out = syn.synthesize(req, SynthSettings(s3gen_prompt_s=1.5, **base), progress=False)
    assert out.settings.to_dict()["s3gen_prompt_s"] == 1.5 and out.results[0].wav.size > 0
    pieces = list(syn.stream(req, SynthSettings(s3gen_prompt_s=1.5, **base), first_tokens=8, chunk_tokens=12))
    assert pieces[-1].final and sum(p.wav.size for p in pieces) > 0


def test_decode_tokens_redoes_the_decoder_of_a_synthesized_utterance_exactly(model, voices):
    """S3Gen alone on an utterance's own tokens, with the engine's seeding, gives its audio back
    bit for bit (no watermark): the aligned-fidelity path decodes what synthesis decodes."""
    syn = Synthesizer(model)
    s = SynthSettings(seed=5, watermark=False, **FAST)
    r = syn.synthesize([SynthRequest("One sentence only here.", voices[0])], s, progress=False).results[0]
    assert len(r.chunks) == 1 and r.speech_tokens.size > 0
    again = Synthesizer(model).decode_tokens(voices[0], r.speech_tokens, s)
    np.testing.assert_array_equal(again, r.wav)
    other = Synthesizer(model).decode_tokens(voices[0], r.speech_tokens, SynthSettings(seed=6, watermark=False, **FAST))
    assert other.shape == r.wav.shape and not np.array_equal(other, r.wav)  # other seed: other CFM noise
    assert Synthesizer(model).decode_tokens(voices[0], [], s).size == 0
