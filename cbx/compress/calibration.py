"""Calibration data for GPTQ: T3's own activations on text, teacher-forced through the
conditioned model.

Why this way: GPTQ minimises a layer's output error on the inputs the layer really sees, so
the inputs must come from T3 doing its real job. For each calibration sentence we

1. let the *unquantized* T3 sample its own speech tokens (conditioned on the model's built-in
   voice, seeded, all texts in one batched decode of :mod:`cbx.engine.t3_decode`), so that the
   speech part of the sequence is in T3's own distribution rather than random ids;
2. run one teacher-forced pass over ``[conditioning | text | speech]`` (and, for the models
   that use classifier-free guidance, the unconditional row with the text embeddings zeroed,
   exactly as inference runs it), with forward pre-hooks accumulating each target layer's
   input Hessian ``2/n X^T X``.

The sequences are generated once; the teacher-forced pass is repeated for chunks of layers so
that the float64 Hessians held at one time stay under ``max_hessian_bytes`` (the full-size
model's 210 layers would need 5.5 GB at once).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from cbx.compress.gptq import HessianAccumulator
from cbx.errors import CbxError

# Varied English read-speech sentences (numbers, questions, long and short clauses).
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "On March third, twenty twenty-four, the meeting started at nine fifteen sharp.",
    "Why would anyone leave the door open when it is this cold outside?",
    "Scientists measured the temperature every hour for three consecutive weeks.",
    "I honestly did not expect the results to be so clear, so quickly.",
    "Turn left at the second light, then continue straight for about two miles.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "The orchestra played a slow, gentle piece while the audience listened in silence.",
    "Could you repeat that number once more: four, eight, fifteen, sixteen, twenty-three?",
    "A small boat drifted across the lake as the sun set behind the hills.",
    "Our new policy takes effect next Monday, so please read the attached summary.",
    "He laughed, shook his head, and said that he would think about it tomorrow.",
    "Fresh bread, warm soup and a cup of tea make a perfect winter dinner.",
    "The museum closes early on holidays, but the garden stays open until dusk.",
    "Let me know whether the package arrived safely and in good condition.",
)


def check_calibration_params(config) -> None:
    """Validate a config's ``calib_texts`` / ``calib_max_speech_tokens`` (every calibrated method
    has them, with the same meaning)."""
    if not 1 <= config.calib_texts <= len(CALIBRATION_TEXTS):
        raise ValueError(f"calib_texts must be 1..{len(CALIBRATION_TEXTS)}, got {config.calib_texts}")
    if config.calib_max_speech_tokens < 1:
        raise ValueError(f"calib_max_speech_tokens must be >= 1, got {config.calib_max_speech_tokens}")


@dataclasses.dataclass
class CalibrationSequence:
    text_tokens: torch.Tensor  # [1, T_text]
    speech_tokens: torch.Tensor  # [1, T_speech], starting with the start-of-speech token
    conds: object = None  # upstream Conditionals of the voice; None: the model's built-in voice


def _t3_cond(model, device, conds=None) -> object:
    conds = conds if conds is not None else model.builtin_conds
    if conds is None:
        raise CbxError(f"model '{model.source}': GPTQ calibration needs the model's built-in voice (conds.pt), "
                       "and this model has none; use method: rtn or add conds.pt to the model folder")
    # prepare_conditioning caches the prompt embedding on the T3Cond; work on a copy.
    t3c = dataclasses.replace(conds.t3, cond_prompt_speech_emb=None)
    return t3c.to(device=device, dtype=next(model.t3.cond_enc.parameters()).dtype)


def generate_sequences(model, texts: Sequence[str], max_speech_tokens: int, seed: int,
                       voices: Sequence[object] | None = None) -> list[CalibrationSequence]:
    """Sample speech tokens for each text with the (unquantized) T3 through the engine's
    batched decoder (upstream's sampling: CFG, temperature, min_p, repetition penalty).

    ``voices``: upstream ``Conditionals`` cycled over the texts (text i in voice i mod n);
    None: the model's built-in voice for every text."""
    from cbx.engine.t3_decode import DecodeSettings, T3Row, generate
    from cbx.engine.text import t3_text_tokens

    t3 = model.t3
    lang = "en" if model.variant == "multilingual" else None
    device = next(t3.parameters()).device
    voices = list(voices) if voices else [None]
    conds = [voices[k % len(voices)] for k in range(len(texts))]
    ids = [t3_text_tokens(model, text, language_id=lang) for text in texts]
    rows = [T3Row(i, _t3_cond(model, device, c), seed=seed + k) for k, (i, c) in enumerate(zip(ids, conds))]
    out = generate(model, rows, DecodeSettings(max_new_tokens=max_speech_tokens))
    start = t3.hp.start_speech_token
    return [CalibrationSequence(torch.tensor([i]), torch.tensor([[start, *tok.tolist()]]), c)
            for i, tok, c in zip(ids, out.tokens, conds)]


def calibration_voices(model, names: Sequence[str]) -> list[object]:
    """Upstream ``Conditionals`` for each voice name: ``builtin`` (the model's ``conds.pt``), an
    offline voice of :mod:`cbx.eval.assets` (``allison``, ``diane``, ...; real recorded speech)
    or an audio file path."""
    from cbx.engine.conditioning import prepare_voice
    from cbx.eval import assets  # real-speech prompts shipped by installed packages

    out = []
    for name in names:
        if name == "builtin":
            if model.builtin_conds is None:
                raise CbxError(f"calib_voices: model '{model.source}' has no built-in voice (conds.pt); "
                               "name an offline voice or an audio file")
            out.append(model.builtin_conds)
            continue
        out.append(prepare_voice(model, assets.voice_audio_path(name, "calib_voices", also="'builtin', ")))
    return out


@torch.inference_mode()
def _teacher_forced_pass(model, seqs: list[CalibrationSequence]) -> None:
    t3 = model.t3
    device = next(t3.parameters()).device
    cfg = model.variant != "turbo"
    for s in seqs:
        tt, st = s.text_tokens.to(device), s.speech_tokens.to(device)
        if cfg:
            tt, st = tt.expand(2, -1).contiguous(), st.expand(2, -1).contiguous()
        embeds, len_cond = t3.prepare_input_embeds(t3_cond=_t3_cond(model, device, s.conds), text_tokens=tt,
                                                   speech_tokens=st, cfg_weight=0.5 if cfg else 0.0)
        hidden = t3.tfmr(inputs_embeds=embeds, use_cache=False).last_hidden_state
        n_text = tt.shape[1]
        t3.text_head(hidden[:1, len_cond:len_cond + n_text])
        t3.speech_head(hidden[:, len_cond + n_text:])


def collect_hessians(model, modules: Sequence[tuple[str, nn.Module]], seqs: list[CalibrationSequence],
                     max_hessian_bytes: int = 1 << 30) -> "dict[str, torch.Tensor]":
    """Input Hessian of each ``(name, module)`` over the teacher-forced calibration sequences."""
    out: dict[str, torch.Tensor] = {}
    chunks, cur, cur_bytes = [], [], 0
    for name, mod in modules:
        k = _in_features(mod)
        if cur and cur_bytes + 8 * k * k > max_hessian_bytes:
            chunks.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, mod))
        cur_bytes += 8 * k * k
    if cur:
        chunks.append(cur)
    for chunk in tqdm(chunks, desc="calibration: teacher-forced passes", leave=False, disable=len(chunks) < 2):
        accs = {name: HessianAccumulator(_in_features(mod)) for name, mod in chunk}
        handles = [mod.register_forward_pre_hook(_hook(accs[name])) for name, mod in chunk]
        try:
            _teacher_forced_pass(model, seqs)
        finally:
            for h in handles:
                h.remove()
        for name, acc in accs.items():
            if acc.n == 0:
                raise CbxError(f"GPTQ calibration: module '{name}' saw no input in the teacher-forced pass; "
                               "leave it out with ignore or use method: rtn")
            out[name] = acc.h
    return out


def _hook(acc: HessianAccumulator):
    def fn(module, args):
        acc.add(args[0])
    return fn


def _in_features(mod: nn.Module) -> int:
    from cbx.compress.modules import linear_weight

    return linear_weight(mod).shape[1]
