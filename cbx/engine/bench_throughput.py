"""``cbx bench throughput``: how much audio a GPU makes per second when it serves many utterances.

The other benchmarks time one utterance (latency: RTF, first audio). A server synthesizing a
queue of sentences cares about throughput instead: many utterances batched through one T3
decode (CUDA-graphed per-token step, ``SynthSettings.compile = "cudagraphs"``), one batched
flow solve per group, HiFT per row. This mode synthesizes ``--utterances`` requests in groups of
``--batch`` rows, each forced to ``--tokens`` speech tokens (EOS masked, as every bench does, so
the work is fixed), after one untimed warm-up group of the same shape (graph capture and kernel
selection paid there), and prints per-stage seconds and, as its last line,

    throughput: N.NN audio s per wall s (U utterances, batch B, T tokens each, decode: D)

Why CUDA only: on the 2-core CPU of this project a batch of full-size utterances takes minutes
and graphs do not exist; there ``--model full`` is refused with a one-line error and
``--model tiny`` runs the same code path as a smoke test (its figure means nothing). The voice is
conditioned once before timing (a serving process holds its voices; the disk cache is off so the
warm-up pays it, not the timed pass).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cbx.errors import CbxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="full", help="full (random:original, full size; CUDA only), tiny "
                        "(smoke test, any device), or any model source cbx synth takes")
    parser.add_argument("--device", default="auto", help="auto | cuda[:N] | cpu (default: auto)")
    parser.add_argument("--utterances", type=int, default=32, help="requests to synthesize (default 32)")
    parser.add_argument("--batch", type=int, default=16, help="rows decoded together (default 16)")
    parser.add_argument("--tokens", type=int, default=100, help="speech tokens per utterance (default 100 = 4 s)")
    parser.add_argument("--cfm-steps", type=int, default=None, help="flow steps (default: the model's)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", default="auto",
                        help="decode-step backend: auto (cudagraphs on CUDA, none on CPU), none, or a "
                             "torch.compile backend")
    parser.add_argument("--s3gen-bf16", action="store_true", help="HiFT and the flow encoder in bf16 too")
    parser.add_argument("--no-watermark", action="store_true", help="leave the Perth watermark out")
    parser.add_argument("--seed", type=int, default=0)


def plan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Checked settings of a throughput run (pure: no model built); CbxError on bad input."""
    for name in ("utterances", "batch", "tokens"):
        if getattr(args, name) < 1:
            raise CbxError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.cfm_steps is not None and args.cfm_steps < 1:
        raise CbxError(f"--cfm-steps {args.cfm_steps}: must be >= 1")
    if device.type != "cuda" and args.model == "full":
        raise CbxError("bench throughput: --model full measures batched synthesis on a CUDA GPU and this run has "
                       f"none (device {device}); use --model tiny for a smoke run of the same code path")
    compile_ = args.compile
    if compile_ == "auto":
        compile_ = "cudagraphs" if device.type == "cuda" else None
    elif compile_ == "none":
        compile_ = None
    if compile_ == "cudagraphs" and device.type != "cuda":
        raise CbxError("--compile cudagraphs: CUDA graphs need a CUDA device")
    return {"compile": compile_, "batch": min(args.batch, args.utterances)}


def figures(audio_s: float, wall_s: float, speech_tokens: int, t3_s: float) -> dict[str, float]:
    """Throughput figures of one timed pass: audio seconds per wall second (the inverse of the
    aggregate RTF), and speech tokens per second of the whole pass and of the T3 stage."""
    if wall_s <= 0 or audio_s < 0:
        raise ValueError("wall time must be positive and audio length non-negative")
    return {"audio_per_wall": audio_s / wall_s, "rtf": wall_s / audio_s if audio_s > 0 else float("inf"),
            "tokens_per_s": speech_tokens / wall_s, "t3_tokens_per_s": speech_tokens / t3_s if t3_s > 0 else 0.0}


def _model(name: str, device: torch.device) -> Any:
    from cbx.engine.model import load_model
    from cbx.engine.tiny import build_random

    with contextlib.redirect_stderr(io.StringIO()):
        if name == "full":
            model = build_random("original", full_size=True, seed=0)
        else:
            model = load_model(name)
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cbx.engine.bench import BENCH_TEXT, REF_SR, synthetic_voice
    from cbx.engine.cli_synth import resolve_device
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer
    from cbx.engine.timing import machine_description

    device = torch.device(resolve_device(args.device))
    p = plan(args, device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_description(device).items()), flush=True)
    t0 = time.perf_counter()
    model = _model(args.model, device)
    print(f"model: {args.model} ({model.variant}) on {device}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    settings = SynthSettings(force_tokens=args.tokens, max_speech_tokens=args.tokens, seed=args.seed, dtype=args.dtype,
                             batch_size=p["batch"], compile=p["compile"], watermark=not args.no_watermark,
                             s3gen_bf16=bool(args.s3gen_bf16),
                             **({"cfm_steps": args.cfm_steps} if args.cfm_steps else {}))
    syn = Synthesizer(model, device=device, disk_cache=False)
    with tempfile.TemporaryDirectory(prefix="cbx-throughput-") as tmp:
        import soundfile as sf

        voice = str(Path(tmp) / "voice.wav")
        sf.write(voice, synthetic_voice(10.0), REF_SR)
        # Sentences differ a little (as a queue's would) and stay one sentence each (one row per
        # utterance); the forced token count fixes the work.
        reqs = [SynthRequest(f"{BENCH_TEXT.rstrip('.')}, number {i}.", voice, id=f"u{i}") for i in range(args.utterances)]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            syn.synthesize(reqs[: p["batch"]], settings, progress=False)  # warm-up: graphs, kernels, voice
        print(f"warm-up ({p['batch']} utterances: graph capture, kernels, voice) {time.perf_counter() - t0:.1f} s",
              flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = syn.synthesize(reqs, replace(settings), progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    run_ = out.run
    f = figures(run_.audio_s, wall, run_.speech_tokens, run_.stages.get("t3", 0.0))
    stages = ", ".join(f"{k} {v:.2f}" for k, v in run_.stages.items() if k != "total")
    print(f"stages s: {stages}; total {run_.stages.get('total', wall):.2f}; wall {wall:.2f}")
    print(f"audio {run_.audio_s:.1f} s in {wall:.2f} s wall (aggregate RTF {f['rtf']:.3f}); "
          f"{f['tokens_per_s']:.0f} speech tokens/s overall, {f['t3_tokens_per_s']:.0f} in T3; "
          f"peak memory {run_.peak_mem_bytes / 2**30:.2f} GiB ({run_.mem_kind})")
    decode = p["compile"] or "eager"
    print(f"throughput: {f['audio_per_wall']:.2f} audio s per wall s ({args.utterances} utterances, batch {p['batch']}, "
          f"{args.tokens} tokens each, decode: {decode})")
    return 0
