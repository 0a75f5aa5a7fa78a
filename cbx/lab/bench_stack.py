"""``cbx bench stack [EXPERIMENT.yaml]``: the whole compressed model speaking, against upstream.

Every other benchmark times one piece (a T3 step, a CFM solve). This one times what a user
runs: a sentence through the whole stack, on the full-size original architecture with random
weights (real sizes and costs, meaningless audio), built once, in ONE process and one run:

* ``upstream``: upstream's own path at fp32, step by step as ``ChatterboxTTS.generate`` runs
  it (:func:`cbx.engine.bench.upstream_once`: its conditioning, HF-cache T3 loop, 10 CFG steps
  of CFM, HiFT, watermark). Its whole time is the reference.
* the stack: the engine with an experiment's compression steps (default: T3 bf16 with int4 RTN
  g128 weights, a CFM student made from the teacher estimator as ``cbx distill`` makes it, with
  its untrained weights, which cost exactly what trained ones do) at each student step count
  (default 1 and 2), cold voice (conditioning paid, caches emptied) and warm voice (cached).
  The default stack's S3Gen stages (flow encoder, CFM estimator, HiFT) run in ``auto_dtype``
  of the device: bf16 where bf16 is native, fp32 on a CPU without it, where each of them
  measured slower in bf16 (full size, 2-core AVX2 EPYC: encoder 10x, 1-step student
  estimator 8x, HiFT 37x; ``scripts/s3gen_bf16_error.py``, docs/CONTRACTS.md). The header line names each stage's dtype.

Per path: stage seconds (T3 split into prefill and decode: the prefill is timed apart as a
one-token decode of the same rows and subtracted), RTF, time to first audio (a streamed run,
:meth:`cbx.engine.synth.Synthesizer.stream`, from the call to the first piece), and peak
working memory (peak over what was in use when the call started). Every path decodes exactly
``--tokens`` tokens (EOS masked, as ``cbx bench engine`` does), timed runs are interleaved
round-robin over ``--repeats`` and medians printed. The last line is exactly
``stack: RTF N.NN vs upstream N.NN (N.NNx), first audio N.NN s`` for the first step count,
warm voice. ``--compile BACKEND`` runs the stack's T3 compiled (decode step and, on CPU, the int4
prefill's weight unpacking, :attr:`cbx.engine.synth.SynthSettings.compile`), compiled during the
warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cbx.errors import CbxError

COLUMNS = ("conditioning", "t3_prefill", "t3_decode", "cfm", "vocoder", "watermark", "total")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None,
                        help="experiment YAML whose compression steps and synth settings make the stack "
                             "(default: bf16 + T3 int4 RTN g128 + an untrained CFM student)")
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens per utterance (default 50 = 2 s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2],
                        help="CFM student step counts to time (default 1 2; the first one makes the last line)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path (interleaved; medians)")
    parser.add_argument("--ref-seconds", type=float, default=10.0, help="synthetic reference voice length")
    parser.add_argument("--model", choices=["full", "tiny"], default="full",
                        help="full: full-size random weights (default); tiny: smoke test")
    parser.add_argument("--skip-upstream", action="store_true", help="leave upstream's path out (no reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="torch.compile backend for the stack's T3 (the decode step, and on CPU the int4 "
                             "prefill's weight unpacking); compiled in the warm-up, outside the timed runs")


def default_stack(model: Any) -> str:
    """bf16 + T3 int4 RTN g128 + an untrained student (what the default stack applies)."""
    from cbx.compress.registry import apply_transforms, build_config

    apply_transforms(model, [("int4_weight_only", build_config("int4_weight_only", {"group_size": 128}))])
    _swap_student(model)
    return "T3 int4 RTN g128 + CFM student (untrained weights)"


def default_settings(device: torch.device) -> Any:
    """The default stack's settings: T3 bf16 (its int4 kernels take bf16 activations), the S3Gen
    stages in ``auto_dtype(device)`` (bf16 only where it is native; see the module docstring)."""
    from cbx.engine.synth import SynthSettings, auto_dtype

    return SynthSettings(dtype="bf16", cfm_dtype="auto", s3gen_bf16=auto_dtype(device) == "bf16")


def dtype_label(settings: Any) -> str:
    """``stage dtypes: t3 bf16, flow_encoder fp32, ...`` for resolved ``settings``."""
    from cbx.engine.synth import stage_dtypes

    return "stage dtypes: " + ", ".join(f"{k} {v}" for k, v in stage_dtypes(settings).items())


def _swap_student(model: Any) -> None:
    from cbx.distill.student import make_student

    s3 = model.s3gen
    student = make_student(s3.flow.decoder.estimator)
    student.requires_grad_(False)
    s3.flow.decoder.estimator = student.eval()
    s3.meanflow = True


def _experiment_stack(model: Any, path: str) -> tuple[str, Any]:
    from cbx.compress.registry import apply_transforms
    from cbx.lab.schema import load_experiments

    exps = load_experiments(path)
    if len(exps) != 1:
        raise CbxError(f"{path}: holds {len(exps)} experiments (a sweep); bench stack takes one")
    exp = exps[0]
    steps = exp.transform_configs()
    if steps:
        apply_transforms(model, steps)
    return f"experiment {exp.name}: " + (" + ".join(n for n, _ in steps) or "no compression"), exp.synth_settings()


def _settings(base: Any, tokens: int, steps: int | None, seed: int, compile: str | None = None) -> Any:
    from dataclasses import replace

    s = base or default_settings(torch.device("cpu"))
    return replace(s, force_tokens=tokens, max_speech_tokens=tokens, seed=seed, batch_size=1,
                   **({"cfm_steps": steps} if steps is not None else {}),
                   **({"compile": compile} if compile is not None else {}))


def _engine_once(syn: Any, voice: str, settings: Any, cold: bool) -> dict[str, float]:
    """One timed synthesis and one timed streamed synthesis of the bench sentence."""
    from cbx.engine.bench import BENCH_TEXT
    from cbx.engine.synth import SynthRequest
    from cbx.engine.t3_decode import T3Row, autocast, generate

    req = [SynthRequest(BENCH_TEXT, voice, id="stack")]
    if cold:
        syn.clear_voices()
    with contextlib.redirect_stdout(io.StringIO()):
        out = syn.synthesize(req, settings, progress=False)
    row = dict(out.run.stages)
    row["work_mem"] = max(0.0, out.run.peak_mem_bytes - out.run.extra.get("mem_start_bytes", 0.0))
    row["audio_s"] = out.run.audio_s
    # T3 prefill: a one-token decode of the same row (conditioning cached by now; the voice
    # prefix's keys/values cached for a warm voice, computed again for a cold one).
    if cold:
        syn.prefix_cache.clear()
    s = out.settings
    t3 = syn._low_precision(syn.model.t3, s)
    rows = syn._rows(req, s)
    conds = syn._conditioning(voice, rows[0].voice_key, float(s.exaggeration))
    ds = syn._decode_settings(s)
    ds.force_tokens = ds.max_new_tokens = 1
    with torch.inference_mode(), autocast(syn.device, next(p for p in t3.parameters() if p.is_floating_point()).dtype):
        t0 = time.perf_counter()
        generate(t3, [T3Row(rows[0].text_tokens, conds.t3, rows[0].seed)], ds, prefix_cache=syn.prefix_cache)
        prefill = time.perf_counter() - t0
    row["t3_prefill"] = min(prefill, row["t3"])
    row["t3_decode"] = row["t3"] - row["t3_prefill"]
    if cold:
        syn.clear_voices()
    first = None
    with contextlib.redirect_stdout(io.StringIO()):
        for piece in syn.stream(req, settings):
            if first is None and piece.wav.size:
                first = piece.t
    row["first_audio"] = first if first is not None else float("nan")
    return row


def _upstream_row(model: Any, up: Any, voice: str, tokens: int, seed: int, device: torch.device) -> dict[str, float]:
    from cbx.engine.bench import upstream_once

    stages, audio_s, peak = upstream_once(model, up, voice, tokens, 10, seed, device)
    row = dict(stages)
    row["t3_prefill"], row["t3_decode"] = float("nan"), float("nan")
    row["audio_s"] = audio_s
    row["work_mem"] = float("nan")
    row["first_audio"] = stages["total"]  # no streaming: the first audio is the whole utterance
    return row


def run(args: argparse.Namespace) -> int:
    from cbx.engine.bench import REF_SR, synthetic_voice
    from cbx.engine.synth import auto_dtype
    from cbx.engine.synth import Synthesizer
    from cbx.engine.timing import machine_description
    from cbx.engine.tiny import build_random, build_tiny

    if args.tokens < 1 or args.repeats < 1 or any(n < 1 for n in args.steps):
        raise CbxError("--tokens, --repeats and --steps must be >= 1")
    if not 1.0 <= args.ref_seconds <= 30.0:
        raise CbxError(f"--ref-seconds {args.ref_seconds}: must be between 1 and 30")
    if args.experiment is not None and not Path(args.experiment).is_file():
        raise CbxError(f"{args.experiment}: no such experiment file")
    device = torch.device("cpu")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_description(device).items()), flush=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        base = build_random("original", full_size=True, seed=0) if args.model == "full" else build_tiny("original", 0)
    base.eval()
    stack = copy.deepcopy(base)
    if args.experiment:
        label, synth = _experiment_stack(stack, args.experiment)
        steps = [None]
    else:
        label, synth = default_stack(stack), default_settings(device)
        steps = list(args.steps)
        if auto_dtype(device) != "bf16":
            print("note: this CPU has no native bf16 (AMX/AVX512-BF16): the stack's T3 decode runs bf16 (int4 "
                  "kernels), its prefill and S3Gen stages fp32 (measured faster here; stage dtypes below)", flush=True)
    gc.collect()
    label += "; " + dtype_label(_settings(synth, args.tokens, steps[0], args.seed).resolved(stack, device))
    print(f"model: {args.model} original, random weights, built and compressed in {time.perf_counter() - t0:.1f} s; "
          f"stack: {label}" + (f"; T3 compiled ({args.compile})" if args.compile else ""), flush=True)
    from cbx.engine import upstream as U

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        up = U.ChatterboxTTS(base.t3, base.s3gen, base.ve, base.tokenizer, str(device))
    # No disk cache for voices: a cold voice must pay conditioning (the in-process cache makes warm).
    syn = Synthesizer(stack, device=device, disk_cache=False)
    print("voice conditioning: disk cache off (cold voices pay conditioning; warm ones hit the in-process cache)",
          flush=True)
    paths: list[tuple[str, Any]] = []
    for n in steps:
        s = _settings(synth, args.tokens, n, args.seed, args.compile)
        name = "stack" if n is None else f"stack {n}-step"
        paths += [(f"{name} cold", (s, True)), (f"{name} warm", (s, False))]
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cbx-stack-") as tmp:
        import soundfile as sf

        voice = str(Path(tmp) / "ref.wav")
        sf.write(voice, synthetic_voice(args.ref_seconds), REF_SR)
        print(f"work: {args.tokens} speech tokens ({args.tokens / 25:.2f} s of audio), reference synthetic "
              f"{args.ref_seconds:g} s; repeats {args.repeats} (interleaved, medians)", flush=True)
        warm_voice = str(Path(tmp) / "warm.wav")
        sf.write(warm_voice, synthetic_voice(1.0, seed=1), REF_SR)
        # warm-up: lazy pieces (perth, kernels, fused projections, cast copies) paid outside timing
        for _, (s, _) in paths[:1]:
            _engine_once(syn, warm_voice, _settings(synth, 4, steps[0], args.seed, args.compile), cold=True)
        if not args.skip_upstream:
            from cbx.engine.bench import upstream_once

            with contextlib.redirect_stdout(io.StringIO()):
                upstream_once(base, up, warm_voice, 2, 2, args.seed, device)
        for r in range(args.repeats):
            if not args.skip_upstream:
                print(f"  repeat {r + 1}: upstream ...", flush=True)
                runs.setdefault("upstream fp32", []).append(
                    _upstream_row(base, up, voice, args.tokens, args.seed + r, device))
            for name, (s, cold) in paths:
                if not cold and r == 0:
                    _engine_once(syn, voice, s, cold=False)  # fills the voice cache
                runs.setdefault(name, []).append(_engine_once(syn, voice, s, cold=cold))
    med = {name: {k: statistics.median(run.get(k, float("nan")) for run in rs)
                  for k in (*COLUMNS, "audio_s", "work_mem", "first_audio")} for name, rs in runs.items()}
    print_table(med)
    ref = med.get("upstream fp32")
    best = med[paths[1][0]]
    rtf = best["total"] / best["audio_s"]
    up_rtf = ref["total"] / ref["audio_s"] if ref else float("nan")
    print(f"stack: RTF {rtf:.2f} vs upstream {up_rtf:.2f} ({up_rtf / rtf:.2f}x), first audio {best['first_audio']:.2f} s")
    return 0


def print_table(med: dict[str, dict[str, float]]) -> None:
    w = max(18, *(len(n) + 2 for n in med))
    heads = ("cond s", "prefill s", "decode s", "cfm s", "voc s", "wm s", "total s", "RTF", "1st audio s", "work MiB")
    print(f"{'path':<{w}}" + "".join(f"{h:>12}" for h in heads))
    for name, m in med.items():
        cells = [m[k] for k in COLUMNS] + [m["total"] / m["audio_s"], m["first_audio"], m["work_mem"] / 2**20]
        print(f"{name:<{w}}" + "".join(f"{'-':>12}" if v != v else f"{v:>12.3f}" for v in cells))
