"""The batched T3 decoder against upstream ``T3.inference`` / ``inference_turbo`` on tiny models.

Upstream's loops are hooked, not copied: its last logits warper (original) or its processor
list (Turbo) is wrapped to record the processed logits, and ``torch.multinomial`` is replaced to
force the teacher's token (teacher forcing) or to take the arg-max (greedy).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

from cbx.engine import t3_decode as td
from cbx.engine.text import t3_text_tokens

ORIGINAL = dict(temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.3, cfg_weight=0.5)
TURBO = dict(temperature=0.8, top_k=300, top_p=0.95, repetition_penalty=1.2)
TEXTS = ["Hello there, this is a test.", "Short one.", "A somewhat longer sentence with more words in it!"]


@contextlib.contextmanager
def hooked_upstream(teacher: list[int] | None, turbo: bool):
    """Record upstream's processed logits; force ``teacher`` tokens (None: greedy arg-max)."""
    from cbx.engine import upstream

    t3mod = __import__(upstream.T3.__module__, fromlist=["x"])
    recorded: list[torch.Tensor] = []
    picks = iter(teacher or [])

    class RecTopP(t3mod.TopPLogitsWarper):
        def __call__(self, ids, scores):
            out = super().__call__(ids, scores)
            if not turbo:  # T3.inference: top-p is its last step
                recorded.append(out[0].clone())
            return out

    class RecList(t3mod.LogitsProcessorList):
        def __call__(self, ids, scores, **kw):
            out = super().__call__(ids, scores, **kw)
            recorded.append(out[0].clone())
            return out

    def fake_multinomial(probs, num_samples=1, **kw):
        if teacher is None:
            return probs.argmax(-1, keepdim=True)
        return torch.tensor([[next(picks)]], device=probs.device)

    saved = (t3mod.TopPLogitsWarper, t3mod.LogitsProcessorList, torch.multinomial)
    t3mod.TopPLogitsWarper, t3mod.LogitsProcessorList, torch.multinomial = RecTopP, RecList, fake_multinomial
    try:
        yield recorded
    finally:
        t3mod.TopPLogitsWarper, t3mod.LogitsProcessorList, torch.multinomial = saved


def upstream_run(model, text_ids, cond, settings: dict, n_tokens: int, teacher=None):
    """Upstream's decode loop for one utterance; returns (tokens, recorded processed logits).

    Runs on a copy: upstream's ``inference`` attaches a ``patched_model`` submodule to its T3."""
    t3 = copy.deepcopy(model.t3)
    c = td._row_cond(t3, cond, None)
    tt = torch.tensor([text_ids])
    with hooked_upstream(teacher, model.variant == "turbo") as rec, torch.inference_mode():
        if model.variant == "turbo":
            toks = t3.inference_turbo(c, tt, temperature=settings["temperature"], top_k=settings["top_k"],
                                      top_p=settings["top_p"], repetition_penalty=settings["repetition_penalty"],
                                      max_gen_len=n_tokens - 1)
        else:
            toks = t3.inference(t3_cond=c, text_tokens=torch.cat([tt, tt]), max_new_tokens=n_tokens,
                                temperature=settings["temperature"], top_p=settings["top_p"],
                                min_p=settings["min_p"], repetition_penalty=settings["repetition_penalty"],
                                cfg_weight=settings["cfg_weight"])
    return toks[0].tolist(), torch.stack(rec)


def engine_settings(settings: dict, **kw) -> td.DecodeSettings:
    return td.DecodeSettings(**{**settings, **kw})


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == theirs.shape
    fin_o, fin_t = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(fin_o, fin_t), "different tokens filtered out"
    assert fin_o.sum(-1).min() >= 1
    err = (ours[fin_o] - theirs[fin_t]).abs().max().item()
    assert err < tol, err


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_t3_teacher_forced_logits_equal_upstream(variant, tiny_model, tiny_turbo):
    model = tiny_model if variant == "original" else tiny_turbo
    settings = ORIGINAL if variant == "original" else TURBO
    ids = t3_text_tokens(model, TEXTS[0])
    g = torch.Generator().manual_seed(3)
    teacher = torch.randint(0, 6561, (24,), generator=g).tolist()
    teacher[5] = teacher[9] = teacher[2]  # repeated tokens: the repetition penalty must agree
    _, theirs = upstream_run(model, ids, model.builtin_conds.t3, settings, len(teacher), teacher=teacher)
    ours = td.teacher_forced_logits(model, model.builtin_conds, ids, teacher, engine_settings(settings))
    assert theirs.shape[0] == len(teacher)
    assert_logits_match(ours, theirs)
    # The filters really filtered (otherwise the -inf comparison above proves little).
    assert (~torch.isfinite(ours)).any()


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_t3_quantized_positions_and_perceiver_logits_equal_upstream(variant, tiny_copy):
    """int4 position tables (upstream reads them through ``get_fixed_embedding`` and
    ``LearnedPositionEmbeddings.forward``; Turbo through GPT-2's ``wpe``) and int4 perceiver
    linears (``T3_EXTRA_TARGETS`` named beside the default): the engine's logits and greedy tokens
    are still upstream's on the same modules, and differ from the default-targets model's."""
    from cbx.compress.methods import T3_EXTRA_TARGETS, T3_TARGETS
    from cbx.compress.modules import Int4Embedding
    from cbx.compress.registry import apply_transforms, build_config

    settings = ORIGINAL if variant == "original" else TURBO
    models = {}
    for extra in (False, True):
        m = tiny_copy(variant)
        params = {"group_size": 32, "targets": [*T3_TARGETS[variant], *(T3_EXTRA_TARGETS[variant] if extra else ())]}
        models[extra] = apply_transforms(m, [("int4_weight_only", build_config("int4_weight_only", params))])
    model = models[True]
    pos = model.t3.tfmr.wpe if variant == "turbo" else model.t3.speech_pos_emb.emb
    assert isinstance(pos, Int4Embedding)
    ids = t3_text_tokens(model, TEXTS[0])
    teacher = torch.randint(0, 6561, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    _, theirs = upstream_run(model, ids, model.builtin_conds.t3, settings, len(teacher), teacher=teacher)
    ours = td.teacher_forced_logits(model, model.builtin_conds, ids, teacher, engine_settings(settings))
    assert_logits_match(ours, theirs)
    # the decode loop's position lookup (one row per step) too: greedy tokens are upstream's
    up_tokens, _ = upstream_run(model, ids, model.builtin_conds.t3, settings, 30)
    out = td.generate(model, [td.T3Row(ids, model.builtin_conds.t3, 0)],
                      engine_settings(settings, temperature=0.0, max_new_tokens=30))
    eos = model.t3.hp.stop_speech_token
    assert out.tokens[0].tolist() == (up_tokens[:-1] if up_tokens[-1] == eos else up_tokens)
    default = td.teacher_forced_logits(models[False], model.builtin_conds, ids, teacher, engine_settings(settings),
                                       processed=False)
    assert not torch.equal(default, td.teacher_forced_logits(model, model.builtin_conds, ids, teacher,
                                                             engine_settings(settings), processed=False))


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_t3_greedy_tokens_equal_upstream(variant, tiny_model, tiny_turbo):
    model = tiny_model if variant == "original" else tiny_turbo
    settings = ORIGINAL if variant == "original" else TURBO
    ids = t3_text_tokens(model, TEXTS[1])
    up_tokens, _ = upstream_run(model, ids, model.builtin_conds.t3, settings, 120)
    out = td.generate(model, [td.T3Row(ids, model.builtin_conds.t3, 0)],
                      engine_settings(settings, temperature=0.0, max_new_tokens=120))
    eos = model.t3.hp.stop_speech_token
    expected = up_tokens[:-1] if up_tokens and up_tokens[-1] == eos else up_tokens
    assert out.tokens[0].tolist() == expected
    assert len(expected) >= 3  # a real sequence, not an immediate EOS
    assert out.finished[0] == (up_tokens[-1] == eos)


def _rows(model, voices):
    # Text i with voice i+1: with the seed-0 tiny models, these rows end at different steps.
    voices = voices[1:] + voices[:1]
    return [td.T3Row(t3_text_tokens(model, t), v, seed=100 + i) for i, (t, v) in enumerate(zip(TEXTS, voices))]


def _voices(model):
    """Three different voices: the built-in one and two perturbed copies (other speaker, prompt)."""
    base = model.builtin_conds.t3
    out = [base]
    for k in (1, 2):
        g = torch.Generator().manual_seed(k)
        prompt = torch.randint(0, 6561, (1, 10 + 7 * k), generator=g)
        spk = base.speaker_emb + 0.3 * torch.randn(base.speaker_emb.shape, generator=g)
        out.append(type(base)(speaker_emb=spk, cond_prompt_speech_tokens=prompt, emotion_adv=0.3 * k * torch.ones(1, 1, 1)))
    return out


@pytest.mark.parametrize("variant", ["original", "turbo"])
def test_t3_batch_equals_alone_and_rows_stop_at_own_eos(variant, tiny_model, tiny_turbo):
    model = tiny_model if variant == "original" else tiny_turbo
    settings = ORIGINAL if variant == "original" else TURBO
    rows = _rows(model, _voices(model))
    greedy = engine_settings(settings, temperature=0.0, max_new_tokens=100)
    batch = td.generate(model, rows, greedy)
    alone = [td.generate(model, [r], greedy) for r in rows]
    for b, a, fin, afin in zip(batch.tokens, (x.tokens[0] for x in alone), batch.finished, (x.finished[0] for x in alone)):
        assert torch.equal(b, a)
        assert fin == afin
    ended = [len(t) for t, f in zip(batch.tokens, batch.finished) if f]
    assert len(ended) >= 2 and len(set(ended)) == len(ended), ended  # rows stopped at their own steps
    if all(batch.finished):  # the loop ends soon after the last row's EOS
        assert batch.steps <= max(ended) + 1 + greedy.check_every

    sampled = engine_settings(settings, max_new_tokens=60)
    batch = td.generate(model, rows, sampled)
    agree = total = 0
    for row, b in zip(rows, batch.tokens):
        a = td.generate(model, [row], sampled).tokens[0]
        n = max(len(a), len(b))
        total += n
        agree += sum(int(x == y) for x, y in zip(a.tolist(), b.tolist()))
    assert agree / total >= 0.99


def test_t3_seed_controls_sampling(tiny_model):
    ids = t3_text_tokens(tiny_model, TEXTS[0])
    s = engine_settings(ORIGINAL, max_new_tokens=30)
    cond = tiny_model.builtin_conds.t3
    a = td.generate(tiny_model, [td.T3Row(ids, cond, 1)], s).tokens[0]
    b = td.generate(tiny_model, [td.T3Row(ids, cond, 1)], s).tokens[0]
    c = td.generate(tiny_model, [td.T3Row(ids, cond, 2)], s).tokens[0]
    assert torch.equal(a, b)
    assert not torch.equal(a[: len(c)], c[: len(a)])


def test_t3_no_host_sync_per_token(tiny_model, monkeypatch):
    """The loop asks the device "all done?" once per ``check_every`` tokens, never per token."""
    calls = {"n": 0}
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):
        calls["n"] += 1
        return real_bool(self)

    def counting_item(self):
        calls["n"] += 1
        return real_item(self)

    ids = t3_text_tokens(tiny_model, TEXTS[2])
    s = engine_settings(ORIGINAL, max_new_tokens=64, check_every=16, repetition_penalty=1.0)
    s_forced = engine_settings(ORIGINAL, force_tokens=64)
    rows = [td.T3Row(ids, tiny_model.builtin_conds.t3, 0)]
    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    forced = td.generate(tiny_model, rows, s_forced)
    n_forced = calls["n"]
    calls["n"] = 0
    td.generate(tiny_model, rows, s)
    n_free = calls["n"]
    monkeypatch.undo()
    assert forced.steps == 64 and len(forced.tokens[0]) == 64
    assert all(int(t) < td.SPEECH_VOCAB for t in forced.tokens[0])
    assert n_forced <= 2  # nothing per token
    assert n_free <= 64 // 16 + 2


def test_t3_cfg_weight_zero_is_cond_only(tiny_model):
    """cfg_weight 0 decodes without the uncond row; its logits are the cond branch of a CFG pair.

    From two CFG weights, cond = 2*L(0.5) - L(1.0); the single-row run must give exactly that.
    """
    ids = t3_text_tokens(tiny_model, TEXTS[1])
    toks = list(range(100, 112))

    def raw(w):
        return td.teacher_forced_logits(tiny_model, tiny_model.builtin_conds, ids, toks,
                                        engine_settings(ORIGINAL, cfg_weight=w), processed=False)

    cond = 2 * raw(0.5) - raw(1.0)
    alone = raw(0.0)
    assert alone.shape == (12, tiny_model.t3.hp.speech_tokens_dict_size)
    assert (alone - cond).abs().max().item() < 1e-4
    assert (raw(0.5) - alone).abs().max().item() > 1e-2  # the uncond row does matter
    out = td.generate(tiny_model, [td.T3Row(ids, tiny_model.builtin_conds.t3, 0)],
                      engine_settings(ORIGINAL, cfg_weight=0.0, temperature=0.0, max_new_tokens=20))
    assert torch.equal(out.tokens[0][:1], alone[0].argmax().view(1)) or len(out.tokens[0]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_t3_cuda_greedy_equals_cpu(tiny_copy):
    model = tiny_copy("original")
    rows = _rows(model, _voices(model))
    s = engine_settings(ORIGINAL, temperature=0.0, max_new_tokens=60)
    cpu = td.generate(model, rows, s)
    model.to("cuda")
    gpu = td.generate(model, rows, s)
    agree = sum(int(torch.equal(a, b)) for a, b in zip(cpu.tokens, gpu.tokens))
    assert agree >= 2
    bf16 = td.generate(model, rows, engine_settings(ORIGINAL, temperature=0.0, max_new_tokens=60,
                                                    compute_dtype=torch.bfloat16))
    assert all(len(t) > 0 for t in bf16.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [None, "int4_weight_only", "int8_weight_only"])
def test_t3_cuda_graph_decode_gives_the_eager_tokens(tiny_copy, monkeypatch, quantize):
    """compile_backend="cudagraphs" on CUDA captures the step in a torch.cuda.CUDAGraph (the KV
    cache is written in place, which dynamo's cudagraphs backend skips): same tokens as eager."""
    model = tiny_copy("original")
    if quantize:
        from cbx.compress.registry import apply_transforms, build_config

        params = {"group_size": 32} if quantize.startswith("int4") else {}
        model = apply_transforms(model, [(quantize, build_config(quantize, params))])
    model.to("cuda")
    rows = _rows(model, _voices(model))
    captured = []
    real = td.CUDAGraphStep

    class Counting(real):
        def __init__(self, *a, **k):
            captured.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(td, "CUDAGraphStep", Counting)
    s = engine_settings(ORIGINAL, temperature=0.0, max_new_tokens=60, static_shapes=True)
    eager = td.generate(model, rows, s)
    graphed = td.generate(model, rows, dataclasses.replace(s, compile_backend="cudagraphs"))
    assert captured == [1]
    for a, b in zip(eager.tokens, graphed.tokens):
        assert torch.equal(a, b)
    sampled = engine_settings(ORIGINAL, temperature=0.8, max_new_tokens=40, static_shapes=True)
    a = td.generate(model, rows, sampled)
    b = td.generate(model, rows, dataclasses.replace(sampled, compile_backend="cudagraphs"))
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_t3_static_shapes_and_compiled_step_give_the_same_tokens(tiny_turbo, tiny_model, monkeypatch):
    """The fixed-shape step (whole cache, tensor positions) is what torch.compile / CUDA graphs
    need; dynamo's "eager" backend checks it traces as ONE graph (fullgraph=True) without codegen.
    The eager run starts with a 4-slot cache margin, so it grows its cache several times."""
    monkeypatch.setattr(td, "CACHE_CHUNK", 4)
    for model, settings in ((tiny_model, ORIGINAL), (tiny_turbo, TURBO)):
        rows = _rows(model, _voices(model))[:2]
        base = td.generate(model, rows, engine_settings(settings, temperature=0.0, max_new_tokens=40))
        static = td.generate(model, rows, engine_settings(settings, temperature=0.0, max_new_tokens=40,
                                                          static_shapes=True))
        for a, b in zip(base.tokens, static.tokens):
            assert torch.equal(a, b)
        quick = engine_settings(settings, temperature=0.0, max_new_tokens=12)
        compiled = td.generate(model, rows, dataclasses.replace(quick, compile_backend="eager"))
        for a, b in zip(compiled.tokens, td.generate(model, rows, quick).tokens):
            assert torch.equal(a, b)


def test_compiled_step_is_not_recompiled_for_each_text_length(tiny_model):
    """Texts of different lengths in one cache chunk share the compiled step's shapes: a
    backend that counts the graphs it is given sees one graph, however many texts."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    voice = _voices(tiny_model)[0]
    settings = engine_settings(ORIGINAL, temperature=0.0, max_new_tokens=6, compile_backend=counting_backend)
    lengths = set()
    try:
        for text in ("Short.", "A somewhat longer sentence than that.", "Longer again, with a clause or two more."):
            row = td.T3Row(t3_text_tokens(tiny_model, text), voice, seed=0)
            lengths.add(len(row.text_tokens))
            td.generate(tiny_model, [row], settings)
    finally:
        td._COMPILED.pop(counting_backend, None)
    assert len(lengths) == 3 and len(graphs) == 1


def test_t3_multilingual_batch_with_language_tags(tiny_multilingual):
    model = tiny_multilingual
    rows = [td.T3Row(t3_text_tokens(model, t, language_id=lang), model.builtin_conds.t3, seed=i)
            for i, (t, lang) in enumerate([("Bonjour à tous.", "fr"), ("Guten Tag, wie geht es?", "de")])]
    s = td.DecodeSettings(temperature=0.0, repetition_penalty=2.0, max_new_tokens=40)
    batch = td.generate(model, rows, s)
    for row, toks in zip(rows, batch.tokens):
        assert torch.equal(toks, td.generate(model, [row], s).tokens[0])
    assert not torch.equal(batch.tokens[0][:5], batch.tokens[1][:5])


def test_t3_exaggeration_and_bad_text(tiny_model):
    from cbx.errors import CbxError

    ids = t3_text_tokens(tiny_model, TEXTS[0])
    toks = list(range(200, 210))
    base = tiny_model.builtin_conds.t3
    strong = type(base)(speaker_emb=base.speaker_emb, cond_prompt_speech_tokens=base.cond_prompt_speech_tokens,
                        emotion_adv=0.9 * torch.ones(1, 1, 1))
    by_setting = td.teacher_forced_logits(tiny_model, base, ids, toks, engine_settings(ORIGINAL, exaggeration=0.9),
                                          processed=False)
    by_cond = td.teacher_forced_logits(tiny_model, strong, ids, toks, engine_settings(ORIGINAL), processed=False)
    plain = td.teacher_forced_logits(tiny_model, base, ids, toks, engine_settings(ORIGINAL), processed=False)
    assert torch.allclose(by_setting, by_cond, atol=1e-5)
    assert (by_setting - plain).abs().max().item() > 1e-3
    too_long = [255] + [5] * 400 + [0]
    with pytest.raises(CbxError, match="longer than the model takes"):
        td.generate(tiny_model, [td.T3Row(too_long, base, 0)], engine_settings(ORIGINAL, max_new_tokens=2))
    with pytest.raises(CbxError, match="text token ids must lie in"):
        td.generate(tiny_model, [td.T3Row([255, 9999, 0], base, 0)], engine_settings(ORIGINAL, max_new_tokens=2))
