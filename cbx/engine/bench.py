"""``cbx bench engine``: upstream's inference path vs the engine, on the full-size architecture.

What it measures: the full-size original Chatterbox (T3 Llama-520M, S3Gen, voice encoder) with
random weights (no download; real sizes, real costs, meaningless audio), one reference voice of
fixed length, and a fixed number of speech tokens, through

(a) upstream's own path, step by step as ``ChatterboxTTS.generate`` runs it: its
    ``prepare_conditionals``, ``T3.inference`` (HF-cache decoding, a host sync and tqdm update
    per token, ``output_attentions=True``), ``S3Gen.flow_inference`` (10 CFM steps with CFG),
    ``hift_inference`` and the perth watermark;
(b) the engine: :class:`cbx.engine.synth.Synthesizer` (static KV cache, batched CFG, no per-token
    sync, batched CFM) at ``--dtype`` (default: bf16 on CUDA or a CPU with native bf16 (AMX, AVX512-BF16), else fp32).

Why it is built this way:

* Both paths run in ONE process on the SAME weights (the ~3 GB model is built once), so the
  ratio is meaningful on a noisy shared machine. Figures are medians over ``--repeats``.
* Equal work: random weights would stop at a random EOS, so both paths decode exactly
  ``--tokens`` tokens with the non-speech ids (EOS, start, unused >= 6561) masked out of the
  logits: the engine through ``force_tokens``, upstream through a forward hook on its
  ``speech_head`` that does the same masking (upstream's loop is not edited).
* A short warm-up of each path (1 s reference, 2 tokens) loads lazy pieces (perth's model,
  kernels) so that one-off costs are not charged to either side.
* ``--compile BACKEND`` adds a column for the engine with T3's decode step compiled; it is
  compiled once for the timed shapes before timing, and that cost is printed on its own line.
* The last line is exactly ``engine speed-up vs upstream: N.NNx`` (per-utterance wall time of
  upstream over the engine's last column; with ``--batch B`` the engine's batch time is divided
  by B).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbx.engine.timing import STAGES, SPEECH_TOKENS_PER_AUDIO_S, PeakMemory, StageTimer, machine_description
from cbx.errors import CbxError

BENCH_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest."
REF_SR = 24_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens per utterance (25 = 1 s; default 50)")
    parser.add_argument("--batch", type=int, default=1, help="utterances the engine synthesizes at once (default 1)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="engine compute dtype (auto: bf16 on CUDA or a CPU with AMX/AVX512-BF16, else fp32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path; medians are printed")
    parser.add_argument("--ref-seconds", type=float, default=10.0,
                        help="length of the synthetic reference voice (default 10 s, upstream's maximum)")
    parser.add_argument("--voice", default=None, help="use this reference audio instead of the synthetic one")
    parser.add_argument("--cfm-steps", type=int, default=10, help="CFM steps for both paths (upstream: 10)")
    parser.add_argument("--model", default="full",
                        help="full (= random:original: full-size, random weights; default) | tiny (smoke test) | "
                             "any model source of the original variant (folder, Hub id)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--no-warmup", action="store_true", help="skip the short warm-up runs")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time the engine with T3's decode step torch.compile'd by BACKEND (inductor; "
                             "cudagraphs on CUDA); the compilation is timed apart")
    parser.add_argument("--seed", type=int, default=0)


def synthetic_voice(seconds: float, sr: int = REF_SR, seed: int = 0) -> np.ndarray:
    """A few seconds of voiced, speech-like audio: harmonics of a gliding pitch (100-220 Hz) with
    a slow syllable-rate envelope, formant-ish weighting and a little noise. Deterministic."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 20 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = np.zeros(n)
    for k in range(1, 16):
        formant = np.exp(-((k * 150 - 700) / 600) ** 2) + 0.5 * np.exp(-((k * 150 - 1800) / 500) ** 2)
        wav += (formant + 0.05) / k * np.sin(k * phase + rng.uniform(0, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)) ** 2
    wav = wav * envelope + 0.01 * rng.standard_normal(n)
    return (0.3 * wav / np.max(np.abs(wav))).astype(np.float32)


@contextlib.contextmanager
def _mask_non_speech(t3: Any):
    """Forward hook on upstream's ``speech_head`` that masks ids >= 6561 (what the engine's
    ``force_tokens`` does), so upstream decodes exactly as many real speech tokens."""
    from cbx.engine.t3_decode import SPEECH_VOCAB

    def hook(_module, _inputs, out):
        # Finite, not -inf: upstream mixes cond and uncond rows (-inf - -inf would be NaN).
        out = out.clone()
        out[..., SPEECH_VOCAB:] = -1e9
        return out

    handle = t3.speech_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def upstream_once(model: Any, up: Any, voice: str, n_tokens: int, cfm_steps: int, seed: int,
                  device: torch.device) -> tuple[dict[str, float], float, int]:
    """One utterance through upstream's own code path; returns (stage seconds, audio s, peak bytes)."""
    from cbx.engine import upstream as U
    from cbx.engine.text import t3_text_tokens

    torch.manual_seed(seed)
    timer = StageTimer(device)
    with PeakMemory(device) as mem:
        with timer.stage("conditioning"):
            up.prepare_conditionals(voice, exaggeration=0.5)
        with timer.stage("t3"):
            tt = torch.tensor([t3_text_tokens(model, BENCH_TEXT)], dtype=torch.long, device=device)
            tt = torch.cat([tt, tt], dim=0)  # the CFG pair, as generate() builds it
            with torch.inference_mode(), _mask_non_speech(model.t3), contextlib.redirect_stderr(io.StringIO()):
                tokens = model.t3.inference(t3_cond=up.conds.t3, text_tokens=tt, max_new_tokens=n_tokens,
                                            temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2, min_p=0.05,
                                            top_p=1.0)
            tokens = U.drop_invalid_tokens(tokens[0])
            tokens = tokens[tokens < U.SPEECH_VOCAB_SIZE].to(device)
        s3 = model.s3gen
        with timer.stage("cfm"), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            mels = s3.flow_inference(tokens, ref_dict=up.conds.gen, n_cfm_timesteps=cfm_steps, finalize=True)
        with timer.stage("vocoder"), torch.inference_mode():  # S3Gen.inference runs in inference mode
            wav, _ = s3.hift_inference(mels.to(dtype=s3.dtype), None)
            wav[:, : len(s3.trim_fade)] *= s3.trim_fade
            wav = wav.squeeze(0).detach().cpu().numpy()
        with timer.stage("watermark"):
            wav = up.watermarker.apply_watermark(wav, sample_rate=REF_SR)
    timer.stop()
    return timer.seconds(), len(wav) / REF_SR, mem.peak_bytes


def engine_once(syn: Any, voice: str, n_tokens: int, cfm_steps: int, seed: int, dtype: str,
                batch: int, compile: str | None = None) -> tuple[dict[str, float], float, int]:
    """``batch`` utterances through the engine; returns (stage seconds, audio s per utterance, peak bytes).
    The voice cache is emptied first so every run pays for conditioning, as upstream's does."""
    from cbx.engine.synth import SynthRequest, SynthSettings

    torch.manual_seed(seed)
    settings = SynthSettings(force_tokens=n_tokens, max_speech_tokens=n_tokens, cfm_steps=cfm_steps, seed=seed,
                             dtype=dtype, batch_size=batch, temperature=0.8, cfg_weight=0.5, exaggeration=0.5,
                             compile=compile)
    syn.clear_voices()
    with contextlib.redirect_stdout(io.StringIO()):  # perth announces its model on stdout
        out = syn.synthesize([SynthRequest(BENCH_TEXT, voice, id=f"b{i}") for i in range(batch)], settings,
                         progress=False)
    return dict(out.run.stages), out.run.audio_s / batch, out.run.peak_mem_bytes


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in (*STAGES, "total")}


def _build(kind: str, device: torch.device) -> Any:
    from cbx.engine.model import BENCH_ALIASES, load_model

    with contextlib.redirect_stderr(io.StringIO()):
        model = load_model(BENCH_ALIASES.get(kind, kind))
    if model.variant != "original":
        raise CbxError(f"--model {kind}: the engine bench compares with upstream's original-model path; "
                       f"this source is the {model.variant} model")
    return model.to(device).eval()


def _millions(module: Any) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.0f}M"


def run(args: argparse.Namespace) -> int:
    from cbx.engine.cli_synth import check_voice, resolve_device
    from cbx.engine.synth import auto_dtype

    for name in ("tokens", "batch", "repeats", "cfm_steps"):
        if getattr(args, name) < 1:
            raise CbxError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not 1.0 <= args.ref_seconds <= 30.0:
        raise CbxError(f"--ref-seconds {args.ref_seconds}: must be between 1 and 30")
    check_voice(args.voice)
    if args.threads is not None:
        if args.threads < 1:
            raise CbxError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    if args.compile is not None:
        from cbx.engine.synth import SynthSettings

        SynthSettings(compile=args.compile)  # an unknown backend fails here, before the model is built
    device = resolve_device(args.device)
    dtype = auto_dtype(device) if args.dtype == "auto" else args.dtype

    info = machine_description(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    t0 = time.perf_counter()
    model = _build(args.model, device)
    from cbx.engine import upstream as U

    from cbx.engine.synth import Synthesizer

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        up = U.ChatterboxTTS(model.t3, model.s3gen, model.ve, model.tokenizer, str(device))
    syn = Synthesizer(model, device=device, disk_cache=False)  # every run pays conditioning, as upstream's
    audio_s = args.tokens / SPEECH_TOKENS_PER_AUDIO_S
    print(f"model: {args.model} ({model.source}), original architecture (T3 {_millions(model.t3)}, "
          f"S3Gen {_millions(model.s3gen)}, VE {_millions(model.ve)}), built in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory(prefix="cbx-bench-") as tmp:
        import soundfile as sf

        if args.voice:
            voice, voice_desc = args.voice, args.voice
        else:
            voice = str(Path(tmp) / "ref.wav")
            sf.write(voice, synthetic_voice(args.ref_seconds), REF_SR)
            voice_desc = f"synthetic {args.ref_seconds:g} s"
        print(f"work: {args.tokens} speech tokens ({audio_s:.2f} s of audio) per utterance, reference {voice_desc}, "
              f"CFM {args.cfm_steps} steps; engine dtype {dtype}, batch {args.batch}; repeats {args.repeats}")
        if not args.no_warmup:
            short = str(Path(tmp) / "warm.wav")
            sf.write(short, synthetic_voice(1.0, seed=1), REF_SR)
            upstream_once(model, up, short, 2, 2, args.seed, device)
            engine_once(syn, short, 2, 2, args.seed, dtype, 1)
        # The engine at fp32 too when it runs in bf16: what the engine's structure buys apart
        # from the lower precision (fp32 is what the faithfulness tests check).
        paths = [(f"engine {dt}", dt, None) for dt in (["fp32", dtype] if dtype != "fp32" else ["fp32"])]
        if args.compile:
            paths.append((f"engine {dtype}+{args.compile}", dtype, args.compile))
            t0 = time.perf_counter()  # compiles for these exact shapes, so the timed runs reuse it
            engine_once(syn, voice, args.tokens, args.cfm_steps, args.seed, dtype, args.batch, args.compile)
            print(f"compiling T3's decode step ({args.compile}) + one run: {time.perf_counter() - t0:.1f} s")
        runs: dict[str, list[dict[str, float]]] = {"upstream": []}
        mems: dict[str, int] = {"upstream": 0}
        audio: dict[str, float] = {}
        for r in range(args.repeats):
            st, up_audio, mem = upstream_once(model, up, voice, args.tokens, args.cfm_steps, args.seed + r, device)
            runs["upstream"].append(st)
            mems["upstream"] = max(mems["upstream"], mem)
            audio["upstream"] = up_audio
            for label, dt, backend in paths:
                st, en_audio, mem = engine_once(syn, voice, args.tokens, args.cfm_steps, args.seed + r, dt,
                                                args.batch, backend)
                runs.setdefault(label, []).append({k: v / args.batch for k, v in st.items()})
                mems[label] = max(mems.get(label, 0), mem)
                audio[label] = en_audio
    med = {name: _median(rs) for name, rs in runs.items()}
    if args.batch > 1:
        print(f"engine columns: seconds per utterance (batch time / {args.batch})")
    print_table(med, mems, audio, args.tokens)
    speedup = med["upstream"]["total"] / med[paths[-1][0]]["total"]
    print(f"engine speed-up vs upstream: {speedup:.2f}x")
    return 0


def print_table(med: dict[str, dict[str, float]], mems: dict[str, int], audio: dict[str, float],
                tokens: int) -> None:
    """Seconds per stage, one column per path, then the last path's speed-up over the first."""
    names = list(med)
    w = max(16, *(len(n) + 4 for n in names))  # column width: the longest path name
    first, last = med[names[0]], med[names[-1]]
    print(f"{'stage':<16}" + "".join(f"{n + ' s':>{w}}" for n in names) + f"{'speed-up':>10}")
    for stage in (*STAGES, "total"):
        ratio = f"{first[stage] / last[stage]:.2f}x" if last[stage] > 0 else "-"
        print(f"{stage:<16}" + "".join(f"{med[n][stage]:>{w}.3f}" for n in names) + f"{ratio:>10}")
    print(f"{'audio s':<16}" + "".join(f"{audio[n]:>{w}.2f}" for n in names))
    rtf = {n: med[n]["total"] / audio[n] for n in names}
    print(f"{'RTF':<16}" + "".join(f"{rtf[n]:>{w}.3f}" for n in names) + f"{rtf[names[0]] / rtf[names[-1]]:>9.2f}x")
    tps = {n: tokens / med[n]["t3"] for n in names}
    print(f"{'T3 tokens/s':<16}" + "".join(f"{tps[n]:>{w}.1f}" for n in names)
          + f"{tps[names[-1]] / tps[names[0]]:>9.2f}x")
    print(f"{'peak mem MiB':<16}" + "".join(f"{mems[n] / 2**20:>{w}.0f}" for n in names))
