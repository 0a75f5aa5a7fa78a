"""Streaming synthesis: audio of each utterance yielded in pieces while T3 is still decoding.

T3 decodes all rows of a group in one loop (:func:`cbx.engine.t3_decode.generate_stream`) and
pauses after a short first chunk of tokens, then after every ``chunk_tokens`` more. At each
pause S3Gen renders, for every row that has new tokens, the audio those tokens now determine,
in ONE batched flow solve over the rows (batched streaming: each utterance gets its own pieces),
and HiFT renders each row's new mel frames. The pieces are yielded as :class:`StreamPiece`.

How a row's pieces join without clicks or gaps (what upstream's ``finalize`` and HiFT's
``cache_source`` allow, as in CosyVoice's streaming that upstream's S3Gen comes from):

* Flow: each render runs the flow over the prompt and ALL tokens so far (the encoder attends
  over the whole sequence), with the last ``LOOKAHEAD_TOKENS`` tokens' frames left out until
  the row is final, upstream's ``finalize=False`` (the encoder's look-ahead convolution has not
  seen their right context yet). Mel frames already turned into audio are never redone.
* Noise: drawn once per row for the longest possible utterance and sliced, so a frame gets the
  same noise in every render (and the whole-utterance path given this noise is the reference).
* HiFT: each render vocodes the new frames plus ``CONTEXT_FRAMES`` frames already played on
  their left, with the source excitation of those frames passed as ``cache_source`` (the same
  sine phases continue). The last ``HOLD_FRAMES`` frames of a non-final render are held back
  (their audio depends on frames not decoded yet); the joint is crossfaded over
  ``CROSSFADE_SAMPLES`` (equal power) between the old and the new rendering of the same samples.

Deliberate differences from :meth:`Synthesizer.synthesize` (same model, settings and seed):

* the CFM noise of a row is the first frames of a longer draw, so the audio is not
  sample-identical to the whole path's; given the same tokens and noise the mels agree within
  the bound ``tests/engine/test_engine_stream.py`` states.
* sentence chunks of one request are played one after another (each with upstream's fade-in)
  instead of cross-faded: a crossfade would hold back the end of every sentence.
* the watermark is applied to each piece as it is emitted (perth marks frame by frame).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cbx.errors import CbxError

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 480  # 24 kHz / 50 mel frames per second
LOOKAHEAD_TOKENS = 3  # upstream flow.pre_lookahead_len
CONTEXT_FRAMES = 12
HOLD_FRAMES = 6
CROSSFADE_SAMPLES = 480
# The first pause emits 2 * (first - LOOKAHEAD_TOKENS) - HOLD_FRAMES mel frames' audio less the
# crossfade tail (:func:`first_piece_samples`): nothing below 7 tokens, 20 ms at 7. 8 is the
# fewest whose first piece holds a whole token's audio (60 ms); each token fewer before the first
# render saves one decode step of the time to first audio (10 -> 8: full-size stack on the 2-core
# CPU, see docs/CONTRACTS.md). Later chunks are long: every render pays the flow over the prompt.
FIRST_CHUNK_TOKENS = 8
CHUNK_TOKENS = 25


@dataclass
class StreamPiece:
    """The next audio of request ``request`` (index in the request list): append ``wav``.
    ``final``: the request's last piece. ``t`` seconds since the stream started."""

    request: int
    id: str
    wav: np.ndarray
    final: bool
    t: float


def first_piece_samples(first_tokens: int) -> int:
    """Samples of audio the first pause emits after ``first_tokens`` tokens of a row that goes
    on (what :func:`render` and :func:`_vocode_new` give; 0 = the first audio waits for the
    next pause): the look-ahead tokens' frames, ``HOLD_FRAMES`` and the crossfade tail wait."""
    frames = 2 * (int(first_tokens) - LOOKAHEAD_TOKENS) - HOLD_FRAMES
    return max(0, frames * SAMPLES_PER_FRAME - CROSSFADE_SAMPLES) if frames > 0 else 0


def chunk_boundaries(first: int, every: int, limit: int) -> list[int]:
    """Decode step counts after which T3 pauses for S3Gen: ``first``, then every ``every``."""
    if isinstance(first, bool) or isinstance(every, bool) or not isinstance(first, int) \
            or not isinstance(every, int) or first < 1 or every < 1:
        raise CbxError(f"stream chunks: first chunk ({first}) and chunk size ({every}) must be >= 1 token")
    return list(range(first, limit, every))


@dataclass
class _RowState:
    """Where one row's audio stands: mel frames played (``frames``), samples emitted, the
    pending crossfade tail, the last HiFT window (start frame, end frame, source)."""

    noise: torch.Tensor  # [80, max frames]
    seed: int
    frames: int = 0
    samples: int = 0
    pending: np.ndarray | None = None
    window: tuple[int, int, torch.Tensor] | None = None
    renders: int = 0
    tokens_rendered: int = -1
    done: bool = False
    pieces: list[np.ndarray] = field(default_factory=list)


def row_noise(seed: int, prompt_frames: int, max_tokens: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A row's CFM noise [80, frames] for the longest utterance it may become (prompt + 2 mel
    frames per token); every render takes its first columns. Drawn on the CPU from ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(80, prompt_frames + 2 * max_tokens + 8, generator=g).to(device=device, dtype=dtype)


def render(model: Any, estimator: Any, states: Sequence[_RowState], tokens: Sequence[torch.Tensor],
           finals: Sequence[bool], conds: Sequence[Any], n_steps: int, encoder: Any = None,
           hift: Any = None) -> list[np.ndarray]:
    """Render what is new for each row (one batched flow solve, then HiFT per row); returns the
    audio each row can emit now (possibly empty). ``tokens[i]``: all S3Gen tokens of row i so
    far; ``finals[i]``: no more will come."""
    from cbx.engine import s3gen_batch as sb
    from cbx.engine.t3_decode import autocast

    s3 = model.s3gen
    meanflow = bool(getattr(s3, "meanflow", False))
    usable = [int(t.numel()) - (0 if f else LOOKAHEAD_TOKENS) for t, f in zip(tokens, finals)]
    out = [np.zeros(0, np.float32) for _ in states]
    # Rendered: final rows, and rows whose new frames reach past what is held back.
    todo = [i for i, n in enumerate(usable) if n > 0 and (finals[i] or 2 * n - HOLD_FRAMES > states[i].frames)]
    if not todo:
        return out
    inputs = sb.cfm_inputs(model, [tokens[i] for i in todo], [conds[i] for i in todo], encoder=encoder)
    # Non-final rows: leave out the look-ahead tokens' frames (mask them: the flow's padding is
    # invisible, so this equals cutting them off as upstream's finalize=False does).
    inputs.out_lens = [o - (0 if finals[i] else 2 * LOOKAHEAD_TOKENS) for o, i in zip(inputs.out_lens, todo)]
    T = inputs.mu.shape[-1]
    lens = torch.tensor(inputs.total_lens, device=inputs.mu.device)
    inputs.mask = (torch.arange(T, device=lens.device)[None] < lens[:, None]).unsqueeze(1).to(inputs.mask.dtype)
    noise = torch.zeros(len(todo), 80, T, dtype=inputs.mu.dtype, device=inputs.mu.device)
    for j, i in enumerate(todo):
        n = inputs.total_lens[j]
        noise[j, :, :n] = states[i].noise[:, :n].to(noise.dtype)
    with autocast(inputs.mu.device, next(estimator.parameters()).dtype):
        mels = sb.solve_cfm(estimator, inputs, noise, n_steps, s3.flow.decoder.inference_cfg_rate, meanflow)
    mels = [m.float() for m in sb.crop_mels(mels, inputs)]
    for j, i in enumerate(todo):
        out[i] = _vocode_new(model, states[i], mels[j], finals[i], hift)
    return out


def _vocode_new(model: Any, st: _RowState, mel: torch.Tensor, final: bool, hift: Any = None) -> np.ndarray:
    """HiFT over the new frames of ``mel`` (all of the row's new-speech frames so far) with
    left context and the cached source; returns the samples to emit (see the module docstring)."""
    hift = model.s3gen.mel2wav if hift is None else hift  # a bf16 copy when settings.s3gen_bf16
    p0 = next(hift.f0_predictor.parameters()) if hasattr(hift, "f0_predictor") else next(hift.parameters())
    total = mel.shape[-1]
    # Multilingual V3 cuts the last token's audio (2 frames; s3gen_batch.trim_last_token)
    cut = 2 if final and (getattr(model, "meta", None) or {}).get("trim_last_token") and total > 2 else 0
    emit_to = total if final else total - HOLD_FRAMES
    if emit_to <= st.frames and not final:
        return np.zeros(0, np.float32)
    start = max(0, st.frames - CONTEXT_FRAMES)
    window = mel[:, start:total].to(device=p0.device, dtype=p0.dtype)[None]
    cache = torch.zeros(1, 1, 0, device=p0.device, dtype=p0.dtype)
    if st.window is not None:
        w0, w1, source = st.window
        a, b = (start - w0) * SAMPLES_PER_FRAME, (w1 - w0) * SAMPLES_PER_FRAME
        cache = source[:, :, a:b]
    devices = [p0.device] if p0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # The first render draws as the whole path's vocoder does (seed = the row's seed).
        torch.manual_seed(int(st.seed) if st.renders == 0 else int(st.seed) * 1009 + st.renders)
        wav, source = hift.inference(speech_feat=window, cache_source=cache)
    st.renders += 1
    st.window = (start, total, source)
    wav = wav[0].float().cpu().numpy()
    base = start * SAMPLES_PER_FRAME
    end = (emit_to - cut) * SAMPLES_PER_FRAME if final else emit_to * SAMPLES_PER_FRAME - CROSSFADE_SAMPLES
    end = min(end, base + wav.shape[0])
    piece = wav[st.samples - base: end - base].copy()
    if st.pending is not None and piece.size:
        n = min(len(st.pending), len(piece))
        fo, fi = _fades(n)
        piece[:n] = st.pending[:n] * fo + piece[:n] * fi
    if st.samples == 0 and piece.size:  # upstream's fade-in at the start of every utterance
        fade = model.s3gen.trim_fade.float().cpu().numpy()
        n = min(len(fade), len(piece))
        piece[:n] *= fade[:n]
    st.pending = None if final else wav[end - base: end - base + CROSSFADE_SAMPLES].copy()
    st.samples = end
    st.frames = emit_to
    return piece.astype(np.float32)


def _fades(n: int) -> tuple[np.ndarray, np.ndarray]:
    from cbx.engine.synth import equal_power_fades

    return equal_power_fades(n)


def stream(syn: Any, requests: Sequence[Any], settings: Any = None, first_tokens: int = FIRST_CHUNK_TOKENS,
           chunk_tokens: int = CHUNK_TOKENS) -> Iterator[StreamPiece]:
    """Yield :class:`StreamPiece` s for ``requests`` (see the module docstring); ``syn`` is a
    :class:`cbx.engine.synth.Synthesizer`. Requests are decoded ``settings.batch_size`` rows at a
    time; a request's pieces come in order, its last one with ``final=True``."""
    from cbx.engine.synth import SynthSettings, _float_dtype
    from cbx.engine.t3_decode import T3Row, autocast, generate_stream

    t_start = time.perf_counter()
    s = (settings or SynthSettings()).resolved(syn.model, syn.device)
    requests = list(requests)
    if not requests:
        raise CbxError("nothing to synthesize: the request list is empty")
    with torch.inference_mode():
        rows = syn._rows(requests, s)
        conds: dict[Any, Any] = {}
        for req in requests:
            key = syn._voice_key(req.voice, float(s.exaggeration))
            if key not in conds:
                conds[key] = syn._conditioning(req.voice, key, float(s.exaggeration))
    model = syn.model
    t3 = syn._low_precision(model.t3, s)
    syn.prepare(s)  # cast copies (built once per Synthesizer: a warm caller has them) and stage dtypes logged
    estimator = syn._estimator(s)
    s3gen_low = syn._s3gen_low(s)
    dsettings = syn._decode_settings(s)
    max_new = min(dsettings.force_tokens or dsettings.max_new_tokens, t3.hp.max_speech_tokens)
    bounds = chunk_boundaries(first_tokens, chunk_tokens, max_new)
    s3conds = {k: syn._s3gen_conds(c, s) for k, c in conds.items()}
    p_frames = {k: int(torch.as_tensor(c["prompt_feat"]).reshape(-1, 80).shape[0]) for k, c in s3conds.items()}
    # Per request: which row (sentence) plays now; later rows' pieces wait in their state.
    n_rows = {i: sum(1 for r in rows if r.request == i) for i in range(len(requests))}
    playing = {i: 0 for i in range(len(requests))}
    states: dict[int, _RowState] = {}

    def ids(i: int) -> str:
        return requests[i].id if requests[i].id is not None else f"utt{i}"

    def drain(row_index: int) -> Iterator[StreamPiece]:
        """Emit what can be played now, in request order of sentences."""
        req = rows[row_index].request
        while playing[req] < n_rows[req]:
            idx = next(j for j, r in enumerate(rows) if r.request == req and r.chunk == playing[req])
            st = states.get(idx)
            if st is None:
                return
            last_row = playing[req] == n_rows[req] - 1
            while st.pieces:
                piece = st.pieces.pop(0)
                final = last_row and st.done and not st.pieces
                if piece.size or final:
                    if s.watermark and piece.size:
                        piece, why = syn._watermark(piece)
                        if why:  # said, not hidden: the piece goes out unmarked
                            log.warning("stream %s: piece not watermarked (%s)", ids(req), why)
                    yield StreamPiece(req, ids(req), piece, final, time.perf_counter() - t_start)
            if not st.done:
                return
            if last_row:
                return
            playing[req] += 1

    groups = [list(range(i, min(i + s.batch_size, len(rows)))) for i in range(0, len(rows), s.batch_size)]
    for group in groups:
        with torch.inference_mode():
            for idx in group:
                r = rows[idx]
                states[idx] = _RowState(row_noise(r.seed, p_frames[r.voice_key], max_new, model.device), r.seed)
            t3rows = [T3Row(rows[i].text_tokens, conds[rows[i].voice_key].t3, rows[i].seed) for i in group]
            it = generate_stream(t3, t3rows, dsettings, chunk_steps=bounds, prefix_cache=syn.prefix_cache)
        while True:
            with torch.inference_mode(), autocast(model.device, _float_dtype(t3)):
                part = next(it, None)
            if part is None:
                break
            with torch.inference_mode():
                live = [j for j, idx in enumerate(group) if not states[idx].done]
                toks = [syn._s3gen_tokens(part.tokens[j]) for j in live]
                finals = [part.final or part.finished[j] for j in live]
                new = [(j, t, f) for j, t, f in zip(live, toks, finals)
                       if f or t.numel() > states[group[j]].tokens_rendered]
                for j, t, f in new:
                    states[group[j]].tokens_rendered = t.numel()
                empty = [(j, f) for j, t, f in new if t.numel() == 0 and f]
                for j, _ in empty:
                    states[group[j]].done = True
                    states[group[j]].pieces.append(np.zeros(0, np.float32))
                work = [(j, t, f) for j, t, f in new if t.numel() > 0]
                if work:
                    pieces = render(model, estimator, [states[group[j]] for j, _, _ in work], [t for _, t, _ in work],
                                    [f for _, _, f in work], [s3conds[rows[group[j]].voice_key] for j, _, _ in work],
                                    int(s.cfm_steps), *s3gen_low)
                    for (j, _, f), piece in zip(work, pieces):
                        st = states[group[j]]
                        st.pieces.append(piece)
                        st.done = st.done or f
            for idx in group:
                yield from drain(idx)
