"""``cbx synth``: synthesize one text with one voice prompt to a 24 kHz wav and print the timings.

Every argument is checked before the model is loaded (voice readable, output folder writable,
numbers in range via :class:`cbx.engine.synth.SynthSettings`), so a bad call fails in a second
with exit status 2 and one line naming the argument, and no output file is created. The wav is
written to a temporary name beside the target and renamed into place, so an interrupted run
never leaves a half-written file. Setting flags default to ``None`` and only flags the user
gives reach ``SynthSettings``: its defaults stay the only ones.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cbx.errors import CbxError

# flag -> (SynthSettings field, type, help)
SETTING_FLAGS: dict[str, tuple[str, type, str]] = {
    "--seed": ("seed", int, "random seed (same seed, same audio)"),
    "--temperature": ("temperature", float, "sampling temperature (0 = greedy)"),
    "--top-p": ("top_p", float, "nucleus sampling mass"),
    "--min-p": ("min_p", float, "min-p filter"),
    "--top-k": ("top_k", int, "top-k filter (0 = off)"),
    "--repetition-penalty": ("repetition_penalty", float, "repetition penalty"),
    "--cfg-weight": ("cfg_weight", float, "classifier-free guidance weight of T3"),
    "--exaggeration": ("exaggeration", float, "emotion exaggeration"),
    "--max-speech-tokens": ("max_speech_tokens", int, "cap on speech tokens per text chunk"),
    "--cfm-steps": ("cfm_steps", int, "flow-matching steps (default: 10, Turbo 2)"),
    "--dtype": ("dtype", str, "auto (bf16 where the device runs it natively), fp32 or bf16"),
    "--cfm-dtype": ("cfm_dtype", str, "the CFM estimator's dtype: auto, fp32 or bf16 (default: --dtype's)"),
    "--batch-size": ("batch_size", int, "text chunks decoded together"),
    "--s3gen-prompt-s": ("s3gen_prompt_s", float, "opt-in, off by default: cut S3Gen's reference prompt to its first N "
                         "seconds (faster flow and first audio, less faithful voice; docs/CONTRACTS.md)"),
    "--language-id": ("language_id", str, "language code for the multilingual model"),
}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthesis-setting flags, shared by ``cbx synth`` and ``cbx demo``."""
    g = parser.add_argument_group("synthesis settings (default: the model variant's)")
    for flag, (name, typ, help_) in SETTING_FLAGS.items():
        g.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    g.add_argument("--no-watermark", dest="watermark", action="store_false", default=None,
                   help="skip the Perth watermark")
    g.add_argument("--s3gen-bf16", dest="s3gen_bf16", action="store_true", default=None,
                   help="run HiFT and the flow encoder in bf16 (error bounds: docs/CONTRACTS.md)")


def settings_from_args(args: argparse.Namespace):
    from cbx.engine.synth import SynthSettings

    given: dict[str, Any] = {}
    for name, *_ in SETTING_FLAGS.values():
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    for flag in ("watermark", "s3gen_bf16"):
        if getattr(args, flag, None) is not None:
            given[flag] = getattr(args, flag)
    return SynthSettings(**given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="text to speak (long text is split into sentences)")
    parser.add_argument("--voice", default=None,
                        help="reference audio (wav/flac/mp3, any rate); default: the model's built-in voice")
    parser.add_argument("--out", required=True, help="output wav path (24 kHz)")
    parser.add_argument("--model", default="tiny", help="tiny | tiny-turbo | tiny-multilingual | random:original | random:turbo | random:multilingual | HUB_ID | DIR (upstream layout, or a compressed checkpoint/export) (default: tiny)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--stream", action="store_true",
                        help="stream: write the audio piece by piece while T3 decodes (to OUT.partial.wav, renamed "
                             "to OUT at the end) and print the time to first audio")
    parser.add_argument("--first-chunk-tokens", type=int, default=None,
                        help="with --stream: speech tokens decoded before the first piece is rendered (default 8: its piece holds 60 ms; below 7 the first piece waits for the next chunk)")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="with --stream: speech tokens per later piece (default 25)")
    add_settings_arguments(parser)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CbxError(f"--device '{name}': not a device (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CbxError(f"--device '{name}': CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CbxError(f"--device '{name}': only cpu and cuda are supported")
    return dev


def check_voice(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise CbxError(f"--voice '{path}': is a folder; give one audio file (wav, flac, mp3, ...)")
    if not p.is_file():
        raise CbxError(f"--voice '{path}': no such file")
    if not os.access(p, os.R_OK):
        raise CbxError(f"--voice '{path}': file is not readable")


def check_out(path: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in (".wav", ".flac"):
        raise CbxError(f"--out '{path}': must end in .wav or .flac")
    if p.is_dir():
        raise CbxError(f"--out '{path}': is a folder")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CbxError(f"--out '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CbxError(f"--out '{path}': not writable")
    return p


def format_timings(batch) -> str:
    """A small table of stage seconds, totals, RTF, tokens/s and peak memory."""
    run = batch.run
    lines = [f"{'stage':<14}{'seconds':>10}"]
    for s in (*_stages(), "total"):
        lines.append(f"{s:<14}{run.stages.get(s, 0.0):>10.3f}")
    lines.append(f"{'audio':<14}{run.audio_s:>10.3f}")
    lines.append(f"real-time factor {run.rtf:.3f}   speech tokens/s {run.speech_tokens_per_s:.1f}   "
                 f"peak memory {run.peak_mem_bytes / 2**20:.0f} MiB ({run.mem_kind})")
    return "\n".join(lines)


def is_random(model) -> bool:
    meta = getattr(model, "meta", None) or {}
    return bool(getattr(model, "is_tiny", False) or meta.get("random_full_size") or meta.get("random_weights"))


def describe_model(model, source: str) -> str:
    """``tiny (original, random weights, 71.0 MiB of weights, cpu)``: which model spoke."""
    seen: dict[int, int] = {}
    for t in model.state_dict(keep_vars=True).values():
        if hasattr(t, "untyped_storage") and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    kind = "random weights" if is_random(model) else "trained weights"
    return (f"{source} ({getattr(model, 'variant', '?')}, {kind}, {sum(seen.values()) / 2**20:.1f} MiB of weights, "
            f"{getattr(model, 'device', '?')})")


def _stages():
    from cbx.engine.timing import STAGES

    return STAGES


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    check_voice(args.voice)
    out = check_out(args.out)
    device = resolve_device(args.device)
    if not args.text.strip():
        raise CbxError("--text: empty")

    from cbx.engine.audio import write_wav
    # The one resolver of model sources (also compressed checkpoints and exports); it lives in
    # cbx.compress because loading those needs the quantized module classes.
    from cbx.compress.source import load_source
    from cbx.engine.synth import SynthRequest, Synthesizer

    import sys

    if args.stream:
        from cbx.engine.stream import chunk_boundaries

        chunk_boundaries(10 if args.first_chunk_tokens is None else args.first_chunk_tokens,
                         25 if args.chunk_tokens is None else args.chunk_tokens, 1)
    elif args.first_chunk_tokens is not None or args.chunk_tokens is not None:
        raise CbxError("--first-chunk-tokens/--chunk-tokens: only with --stream")
    model = load_source(args.model, device=str(device))
    print(f"model: {describe_model(model, args.model)}", file=sys.stderr)
    if is_random(model):
        print(f"cbx synth: warning: '{args.model}' has random weights: the audio is noise, not speech "
              "(give --model ResembleAI/chatterbox or a folder of real weights)", file=sys.stderr)
    if args.stream:
        return _run_stream(args, model, device, settings, out)
    batch = Synthesizer(model, device=device).synthesize(
        [SynthRequest(text=args.text, voice=args.voice, id="cli")], settings, progress=True)
    res = batch.results[0]
    if res.degenerate is not None:
        # Nothing worth writing (a voice of pure noise can make T3 stop at once: 0 speech tokens).
        raise CbxError(f"the model produced no usable audio for this text and voice ({res.degenerate} output, "
                       f"{int(res.speech_tokens.size)} speech token(s)); check the voice prompt "
                       f"({args.voice or 'built-in voice'}); nothing written to {out}")
    write_wav(out, res.wav, res.sample_rate)
    print(f"wrote {out} ({res.audio_s:.2f} s, {res.sample_rate} Hz, {len(res.chunks)} chunk(s))")
    print(format_timings(batch))
    return 0


def _run_stream(args: argparse.Namespace, model: Any, device: Any, settings: Any, out: Path) -> int:
    """Write the pieces as they come to ``OUT.partial.wav`` (playable while it grows), rename it
    to ``OUT`` when the last piece is in; an interrupted run leaves no ``OUT`` and removes the
    partial file."""
    import time

    import soundfile as sf

    from cbx.engine.synth import SAMPLE_RATE, SynthRequest, Synthesizer

    partial = out.with_name(out.stem + ".partial" + out.suffix)
    syn = Synthesizer(model, device=device)
    t0 = time.perf_counter()
    first = None
    samples = pieces = 0
    try:
        with sf.SoundFile(str(partial), "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as f:
            for piece in syn.stream([SynthRequest(text=args.text, voice=args.voice, id="cli")], settings,
                                    args.first_chunk_tokens, args.chunk_tokens):
                if piece.wav.size:
                    if first is None:
                        first = time.perf_counter() - t0
                        print(f"first audio after {first:.2f} s", flush=True)
                    f.write(piece.wav.clip(-1.0, 1.0))
                    f.flush()
                    samples += piece.wav.size
                    pieces += 1
        if samples == 0:
            raise CbxError(f"the model produced no audio for this text and voice; check the voice prompt "
                           f"({args.voice or 'built-in voice'}); nothing written to {out}")
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    total = time.perf_counter() - t0
    audio_s = samples / SAMPLE_RATE
    print(f"wrote {out} ({audio_s:.2f} s, {SAMPLE_RATE} Hz, {pieces} piece(s), streamed)")
    rtf = total / audio_s if audio_s else float("inf")
    print(f"time to first audio {first if first is not None else float('nan'):.2f} s   total {total:.2f} s   "
          f"real-time factor {rtf:.3f}")
    return 0
