"""T3 prefill (cbx.engine.t3_prefill): voice-prefix keys/values computed once and reused, and the
float32 prefill, against the plain left-padded prefill on tiny models.

Bounds: reusing the prefix changes only the float summation order (products over fewer rows),
so every step's logits agree within 1e-4 (fp32 tiny models; measured ~1e-6) and greedy tokens
are identical. A cold voice's prefix is computed in the prefill's one backbone pass, alongside
the rows' suffixes: its keys/values differ from a lone prefix pass only in float summation
order, held within 1e-5 (measured 0 to 1.4e-6), and a warm call from either gives the same
tokens. The fp32 prefill of a bf16 model is held against the same model run in fp32 (its bf16
weights widened, fp32 KV cache): within 0.1 of the first logits and no farther than the bf16
prefill (measured 0.068 vs 0.101 original, 0.027 vs 0.071 Turbo; the prompt embeddings
and the KV cache stay bf16). Quantized modules' fp32 path: within 1e-5 of the float64 product
with the dequantized weight, ten times closer than the bf16 kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cbx.engine import t3_decode as td
from cbx.engine import t3_prefill as tp
from cbx.engine.text import t3_text_tokens

TEXTS = ["Hello there, this is a test.", "Short one.", "A somewhat longer sentence with more words in it!"]
LOGIT_TOL = 1e-4


def _voices(model):
    """The built-in voice and a second one (other speaker, other prompt; for Turbo a prompt of
    another length, so the two prefixes differ in width)."""
    base = model.builtin_conds.t3
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 6561, (1, 13), generator=g)
    spk = base.speaker_emb + 0.3 * torch.randn(base.speaker_emb.shape, generator=g)
    return [base, type(base)(speaker_emb=spk, cond_prompt_speech_tokens=prompt, emotion_adv=0.7 * torch.ones(1, 1, 1))]


def _rows(model, voices, lang=None):
    kw = {"language_id": lang} if lang else {}
    return [td.T3Row(t3_text_tokens(model, t, **kw), voices[i % len(voices)], seed=i) for i, t in enumerate(TEXTS)]


def _decode(model, rows, cache=None, **kw):
    """Greedy decode recording every step's speech-head logits (rows, V)."""
    steps: list[torch.Tensor] = []
    t3 = model.t3
    handle = t3.speech_head.register_forward_hook(lambda _m, _i, out: steps.append(out.float().clone()))
    try:
        out = td.generate(model, rows, td.DecodeSettings(**{"temperature": 0.0, "max_new_tokens": 24, **kw}),
                          prefix_cache=cache)
    finally:
        handle.remove()
    return out, steps


@pytest.mark.parametrize("variant", ["original", "turbo", "multilingual"])
def test_prefix_reuse_equals_plain_prefill(variant, tiny_model, tiny_turbo, tiny_multilingual):
    model = {"original": tiny_model, "turbo": tiny_turbo, "multilingual": tiny_multilingual}[variant]
    rows = _rows(model, _voices(model), "en" if variant == "multilingual" else None)
    plain, plain_logits = _decode(model, rows, share_prefix=False)
    cache = tp.PrefixCache()
    for call in range(2):  # computed in the first call, read from the cache in the second
        shared, shared_logits = _decode(model, rows, cache)
        assert [t.tolist() for t in shared.tokens] == [t.tolist() for t in plain.tokens]
        assert shared.finished == plain.finished
        assert len(shared_logits) == len(plain_logits)
        err = max((a - b).abs().max().item() for a, b in zip(shared_logits, plain_logits))
        assert err < LOGIT_TOL, (call, err)
    assert (cache.misses, cache.hits) == (2, 2)  # two voices: computed once, then found
    assert sum(len(t) for t in plain.tokens) >= 20  # real sequences, not immediate EOS
    if variant == "turbo":  # the two prefixes differ in width: the [prefix | pad | suffix] layout
        assert len({td._prompt_embeds(model.t3, r, None, False).shape[0] - len(r.text_tokens) for r in rows}) == 2


def _prefill_passes(monkeypatch):
    """Counts the backbone passes of more than one query per row (prefills; decode steps run one)."""
    passes = []
    inner = td._backbone

    def counting(t3, x, *args, **kwargs):
        if x.shape[1] > 1:
            passes.append(x.shape)
        return inner(t3, x, *args, **kwargs)

    monkeypatch.setattr(td, "_backbone", counting)
    return passes


def _lone_prefix(model, cond, s):
    """A voice prefix's keys/values from a backbone pass over the prefix alone (the prefill's
    former way: a pass of its own before the suffixes)."""
    t3 = model.t3
    emb = t3.prepare_conditioning(td._row_cond(t3, cond, s.exaggeration))[0]
    length = emb.shape[0]
    n_layers, kv_heads, head_dim = td._backbone_dims(t3)
    dtype = td.kv_cache_dtype(s.compute_dtype or t3.speech_emb.weight.dtype, emb.device)
    tmp = td.StaticKVCache(n_layers, 1, kv_heads, head_dim, length, dtype, emb.device)
    ar = torch.arange(length, device=emb.device)
    td._backbone(t3, emb[None], ar[None], ar, (ar[:, None] >= ar[None, :])[None], tmp, length, td.fusion_plan(t3))
    return tp.PrefixKV([k.clone() for k in tmp.k], [v.clone() for v in tmp.v], length)


def _store(model, cache, s):
    return cache.entries(model.t3, tp.weights_signature(model.t3))


def _key(model, cond, s):
    return tp.prefix_key(td._row_cond(model.t3, cond, s.exaggeration), tp.compute_context(model.t3, s))


@pytest.mark.parametrize("variant", ["original", "turbo", "multilingual"])
def test_cold_voice_prefix_computed_in_the_one_prefill_pass(variant, tiny_model, tiny_turbo, tiny_multilingual,
                                                            monkeypatch):
    """A cold call runs one prefill pass; the prefixes it keeps match a lone prefix pass within
    1e-5, and a warm call from them gives the tokens a cache of lone-pass prefixes gives."""
    model = {"original": tiny_model, "turbo": tiny_turbo, "multilingual": tiny_multilingual}[variant]
    voices = _voices(model)
    rows = _rows(model, voices, "en" if variant == "multilingual" else None)
    s = td.DecodeSettings(temperature=0.0, max_new_tokens=24)
    plain, _ = _decode(model, rows, share_prefix=False)
    passes = _prefill_passes(monkeypatch)
    cache = tp.PrefixCache()
    cold, _ = _decode(model, rows, cache)
    assert len(passes) == 1  # prefixes and suffixes in one pass
    assert (cache.misses, cache.hits) == (2, 0) and len(cache) == 2  # two voices, each stored once
    store = _store(model, cache, s)
    lone = tp.PrefixCache()
    lone_store = _store(model, lone, s)
    with torch.inference_mode():
        for v in voices:
            key = _key(model, v, s)
            ref = _lone_prefix(model, v, s)
            got = store[key]
            assert got.length == ref.length and all(t.shape == r.shape for t, r in zip(got.k, ref.k))
            assert all(t.dtype == r.dtype for t, r in zip(got.k + got.v, ref.k + ref.v))  # the cache dtype
            err = max((t - r).abs().max().item() for t, r in zip(got.k + got.v, ref.k + ref.v))
            assert err < 1e-5, err
            lone_store[key] = ref
    passes.clear()
    warm, _ = _decode(model, rows, cache)
    from_lone, _ = _decode(model, rows, lone)
    assert len(passes) == 2 and (cache.misses, cache.hits) == (2, 2) and (lone.misses, lone.hits) == (0, 2)
    for out in (cold, warm, from_lone):
        assert [t.tolist() for t in out.tokens] == [t.tolist() for t in plain.tokens]


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_held_and_new_voices_in_one_call(variant, tiny_model, tiny_turbo, monkeypatch):
    """One voice held, another new, in one batch: one prefill pass, the plain prefill's logits
    (within 1e-4 at every step) and tokens, the new prefix stored once (a CFG pair, two rows)."""
    model = {"original": tiny_model, "turbo": tiny_turbo}[variant]
    voices = _voices(model)
    rows = _rows(model, voices)  # voices 0, 1, 0
    plain, plain_logits = _decode(model, rows, share_prefix=False)
    cache = tp.PrefixCache()
    _decode(model, rows[:1], cache)  # voice 0 held from here
    assert (cache.misses, cache.hits, len(cache)) == (1, 0, 1)
    passes = _prefill_passes(monkeypatch)
    mixed, mixed_logits = _decode(model, rows, cache)
    assert len(passes) == 1
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    assert [t.tolist() for t in mixed.tokens] == [t.tolist() for t in plain.tokens]
    err = max((a - b).abs().max().item() for a, b in zip(mixed_logits, plain_logits))
    assert len(mixed_logits) == len(plain_logits) and err < LOGIT_TOL, err
    warm, warm_logits = _decode(model, rows, cache)  # both held now
    assert (cache.misses, cache.hits) == (2, 3)
    assert [t.tolist() for t in warm.tokens] == [t.tolist() for t in plain.tokens]
    assert max((a - b).abs().max().item() for a, b in zip(warm_logits, plain_logits)) < LOGIT_TOL


def test_prefix_cache_hits_and_misses(tiny_model):
    model = tiny_model
    voices = _voices(model)
    ids = [t3_text_tokens(model, t) for t in TEXTS]
    cache = tp.PrefixCache()
    greedy = td.DecodeSettings(temperature=0.0, max_new_tokens=4)

    def run(text, voice, **kw):
        before = (cache.misses, cache.hits)
        td.generate(model, [td.T3Row(text, voice)], td.DecodeSettings(**{**greedy.__dict__, **kw}), prefix_cache=cache)
        return cache.misses - before[0], cache.hits - before[1]

    assert run(ids[0], voices[0]) == (1, 0)
    assert run(ids[1], voices[0]) == (0, 1)  # next sentence, same voice
    # an equal conditioning in another object is the same prefix (keyed by content)
    assert run(ids[2], copy.deepcopy(voices[0])) == (0, 1)
    assert run(ids[1], voices[1]) == (1, 0)  # another voice
    assert run(ids[1], voices[0], exaggeration=0.9) == (1, 0)  # another exaggeration
    assert run(ids[1], voices[0], exaggeration=0.9) == (0, 1)
    assert run(ids[1], voices[0], cfg_weight=0.0) == (0, 1)  # no CFG: the same prefix
    assert len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and run(ids[1], voices[0]) == (1, 0)


def test_prefix_cache_dropped_when_weights_change(tiny_copy):
    model = tiny_copy("original")
    rows = _rows(model, _voices(model)[:1])[:1]
    cache = tp.PrefixCache()
    _decode(model, rows, cache)
    with torch.no_grad():
        model.t3.tfmr.layers[0].self_attn.k_proj.weight.mul_(1.5)  # in place: same tensor, new version
    fresh, fresh_logits = _decode(model, rows, cache)
    assert (cache.misses, cache.hits) == (2, 0)
    _, plain_logits = _decode(model, rows, share_prefix=False)
    assert max((a - b).abs().max().item() for a, b in zip(fresh_logits, plain_logits)) < LOGIT_TOL


def test_synthesizer_reuses_prefix_per_voice_and_clear_voices_empties_it(tiny_model):
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer

    syn = Synthesizer(copy.deepcopy(tiny_model), disk_cache=False)
    s = SynthSettings(temperature=0.0, max_speech_tokens=8, batch_size=1, watermark=False, dtype="fp32", cfm_steps=1)
    req = [SynthRequest("First sentence here. And a second one follows.", None)]
    syn.synthesize(req, s, progress=False)
    assert (syn.prefix_cache.misses, syn.prefix_cache.hits) == (1, 1)  # sentence 2 (its own decode) hits
    syn.synthesize(req, s, progress=False)
    assert (syn.prefix_cache.misses, syn.prefix_cache.hits) == (1, 3)
    syn.clear_voices()
    assert len(syn.prefix_cache) == 0
    syn.synthesize(req, s, progress=False)
    assert syn.prefix_cache.misses == 2


def test_static_shapes_with_prefix_reuse(tiny_turbo, tiny_model):
    for model in (tiny_model, tiny_turbo):
        rows = _rows(model, _voices(model))
        plain, _ = _decode(model, rows, share_prefix=False)
        static, _ = _decode(model, rows, tp.PrefixCache(), static_shapes=True)
        assert [t.tolist() for t in static.tokens] == [t.tolist() for t in plain.tokens]


# ----------------------------------------------------------------------------- fp32 prefill


def _first_logits(model, rows, **kw):
    _, steps = _decode(model, rows, max_new_tokens=1, **kw)
    return steps[0]


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_fp32_prefill_of_a_bf16_model_is_the_fp32_arithmetic(variant, tiny_copy):
    model = tiny_copy(variant)
    model.t3.to(torch.bfloat16)
    wide = copy.deepcopy(model)
    wide.t3.float()  # the same (bf16-valued) weights, run in fp32
    rows = _rows(model, _voices(model))
    ref = _first_logits(wide, rows)
    fp32 = _first_logits(model, rows, prefill_dtype=torch.float32)
    bf16 = _first_logits(model, rows)
    err32, err16 = (fp32 - ref).abs().max().item(), (bf16 - ref).abs().max().item()
    assert err32 < 0.1 and err32 <= err16, (err32, err16)


@pytest.mark.parametrize("method", ["int4_weight_only", "int8_weight_only"])
def test_quantized_fp32_prefill_multiplies_the_dequantized_weight(method):
    """Many-row float32 inputs under the fp32 prefill: ``x @ dequantize().T`` in float32 (the
    kernel path rounds x to bf16), recorded as its own kernel path; few rows keep the kernel."""
    from cbx.compress.modules import FP32_MIN_ROWS, Int4Linear, Int8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 320, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(320, 256, generator=g) * 0.05)
    q = Int4Linear.from_float(lin, 64) if method == "int4_weight_only" else Int8Linear.from_float(lin)
    x = torch.randn(FP32_MIN_ROWS + 6, 256, generator=g)
    ref = x.double() @ q.dequantize().double().t() + lin.bias.double()
    with torch.inference_mode():
        kernel = q(x)
        token = tp._PREFILL_FP32.set(True)
        try:
            dense = q(x)
            path = q.cbx_kernel
            q(x[:4])
            few = q.cbx_kernel
        finally:
            tp._PREFILL_FP32.reset(token)
    assert path == ("int4-dense-fp32" if method == "int4_weight_only" else "int8-dense-fp32")
    assert few in ("int4pack-cpu", "int8pack-cpu")
    assert dense.dtype == torch.float32
    err_dense = (dense.double() - ref).abs().max().item()
    err_kernel = (kernel.double() - ref).abs().max().item()
    assert err_dense < 1e-5 and err_dense < 0.1 * err_kernel, (err_dense, err_kernel)


def test_int4_dense_chunks_equal_the_whole_unpacking():
    from cbx.compress import primitives as P
    from cbx.compress.modules import Int4Linear

    lin = torch.nn.Linear(256, 384, bias=False)
    q = Int4Linear.from_float(lin, 64)
    whole = P.int4_cpu_layout_dense_t(q.packed, q.scale, q.zero, torch.float32)
    assert torch.equal(whole, q.dequantize().float().t())
    parts = list(P.int4_cpu_layout_dense_t_chunks(q.packed, q.scale, q.zero, 128))
    assert [s for s, _ in parts] == [0, 128, 256]
    torch.testing.assert_close(torch.cat([w for _, w in parts], dim=1), whole, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        next(P.int4_cpu_layout_dense_t_chunks(q.packed, q.scale, q.zero, 100))  # not whole blocks


def test_prefill_dtype_setting_resolves_by_device(tiny_model, monkeypatch):
    from cbx.engine import synth
    from cbx.engine.synth import SynthSettings
    from cbx.errors import CbxError

    monkeypatch.setattr(synth, "auto_dtype", lambda device: "fp32")  # a CPU without native bf16
    assert SynthSettings(dtype="bf16").resolved(tiny_model).prefill_dtype == "fp32"
    assert SynthSettings(dtype="fp32").resolved(tiny_model).prefill_dtype == "fp32"
    assert SynthSettings(dtype="bf16", prefill_dtype="bf16").resolved(tiny_model).prefill_dtype == "bf16"
    monkeypatch.setattr(synth, "auto_dtype", lambda device: "bf16")  # native bf16 (AMX)
    assert SynthSettings(dtype="bf16").resolved(tiny_model).prefill_dtype == "bf16"
    assert synth.auto_prefill_dtype("bf16", "cuda") == "bf16"
    with pytest.raises(CbxError, match="prefill_dtype"):
        SynthSettings(dtype="fp32", prefill_dtype="bf16")
    with pytest.raises(CbxError, match="prefill_dtype"):
        SynthSettings(prefill_dtype="fp16")


def test_prefill_dtype_with_a_module_without_fp32_path(tiny_model, monkeypatch):
    """A library-quantized T3 (no fp32 prefill path): an fp32 model resolves, and resolves again
    (the runner re-resolves recorded settings), to an fp32 prefill; a bf16 model keeps bf16 under
    auto and refuses an explicit fp32 prefill in one CbxError naming the setting and the module."""
    import copy

    from cbx.compress.registry import apply_transforms, build_config
    from cbx.engine import synth
    from cbx.engine.synth import SynthSettings
    from cbx.errors import CbxError

    model = copy.deepcopy(tiny_model)
    apply_transforms(model, [("torchao_int8_weight_only", build_config("torchao_int8_weight_only", {}))])
    assert synth._fp32_prefill_unsupported(model)  # the library module has no fp32 path
    monkeypatch.setattr(synth, "auto_dtype", lambda device: "fp32")  # a CPU without native bf16
    once = SynthSettings().resolved(model)
    assert (once.dtype, once.prefill_dtype) == ("fp32", "fp32")
    assert once.resolved(model) == once
    assert SynthSettings(dtype="bf16").resolved(model).prefill_dtype == "bf16"
    with pytest.raises(CbxError, match=r"prefill_dtype.*no float32 path"):
        SynthSettings(dtype="bf16", prefill_dtype="fp32").resolved(model)
