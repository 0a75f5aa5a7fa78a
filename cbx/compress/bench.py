"""``cbx bench quant``: what weight-only INT8/INT4 buys T3 and FP8 buys the CFM estimator.

What it measures, on the full-size original architecture with random weights (no download:
real sizes and costs, meaningless outputs), built once:

* T3 decode step (batch 2 = one utterance with its CFG pair, a KV cache of ``--prompt``
  positions plus the tokens decoded so far), through the engine's decoder
  (:func:`cbx.engine.t3_decode.generate`) for fp32 (upstream's weights as they are), bf16,
  int8 and int4 (RTN; embeddings and heads quantized as the transforms' defaults say, the rest
  of T3 in bf16). A step's time is the mean over steps ``N1 .. N2-1`` of ONE forced ``N2``-token
  decode, timed between two of its streaming yields (:func:`_decode_window_fn`), so the
  prefill and its noise never enter the figure; median over ``--repeats`` interleaved runs.
  (It used to be the slope ``(t(N2) - t(N1)) / (N2 - N1)`` of two whole decodes, which
  carried the prefill's run-to-run noise: seconds on a CPU that emulates bf16.)
* T3 resident weight bytes: every parameter and buffer of T3 (unique storages), after the
  float weights of quantized layers were dropped.
* CFM estimator: ``--cfm-steps`` Euler steps with CFG (batch 2) over ``--cfm-frames`` mel
  frames, via :func:`cbx.engine.s3gen_batch.solve_cfm`, for fp32, bf16 and fp8 (emulated on
  CPU; ``torch._scaled_mm`` on sm89+ GPUs).

Every candidate runs in this one process beside its fp32 baseline and is printed with its
ratio to it; the timed runs of all candidates are interleaved round-robin, so a drift in the
load of a shared machine hits them alike. All four T3 variants are held at once (about 4 GB
for the full-size model).

* The memory floor of a T3 step: the bytes a step must read (:func:`step_bytes`: weights it
  multiplies by plus the KV cache) over the machine's read bandwidth measured in the same run
  (:func:`cbx.engine.timing.read_bandwidth`). A memory-bound decode cannot beat it; the ratio
  says how much is left to win. ``--compile BACKEND`` adds the int4 step compiled.

* The field's libraries (``--no-libraries`` leaves them out; :mod:`cbx.compress.bench_libraries`):
  T3's linear layers of one decode step for bf16, ours and every torchao / bitsandbytes /
  optimum-quanto transform (one layer per shape, weighted by count: a full decode per library
  would take minutes, their CPU paths dequantize per call), with T3's resident weight bytes and
  the output SQNR of :mod:`cbx.compress.accuracy`'s sweep (printed whole, beside RTN/GPTQ); the
  library fp8 / W8A8 transforms on the CFM estimator join the CFM table. What cannot run here
  is listed as skipped with its reason.

The last line is exactly
``t3 int4 decode speed-up vs fp32: N.NNx, weights N.NN GB``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from cbx.compress.size import weight_bytes
from cbx.errors import CbxError

BENCH_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest "
              "while the birds sing and the river flows gently past the old stone mill by the hill.")


def add_timing_arguments(parser: argparse.ArgumentParser, model_help: str, cfm_frames_help: str) -> None:
    """The options ``cbx bench quant`` and ``cbx bench prune`` share (the model, the T3 decode
    window and the CFM solve they time, int4's group size), their defaults written once; each
    bench words the help of ``--model`` and ``--cfm-frames``. Checked by
    :func:`check_timing_numbers` (``--tokens`` by each bench, in its own words)."""
    parser.add_argument("--model", default="full", help=model_help)
    parser.add_argument("--prompt", type=int, default=150, help="prompt positions in the KV cache (default 150)")
    parser.add_argument("--tokens", type=int, nargs=2, default=(8, 40), metavar=("N1", "N2"),
                        help="decode N2 forced tokens and time steps N1 .. N2-1 of it (default 8 40)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are printed")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--cfm-frames", type=int, default=600, help=cfm_frames_help)
    parser.add_argument("--cfm-steps", type=int, default=2, help="Euler steps timed per CFM figure (default 2)")


def check_timing_numbers(args: argparse.Namespace) -> None:
    """Refuse ``--tokens``, ``--repeats``, ``--cfm-steps``, ``--cfm-frames`` and ``--prompt``
    values that cannot be timed (:func:`add_timing_arguments`)."""
    if args.tokens[1] - 1 <= args.tokens[0] or args.tokens[0] < 1:
        raise CbxError(f"--tokens: need 1 <= N1 < N2 - 1 (steps N1 .. N2-1 are timed), got {args.tokens[0]} "
                       f"{args.tokens[1]}")
    if args.repeats < 1 or args.cfm_frames < 10 or args.cfm_steps < 1 or args.prompt < 8:
        raise CbxError("--repeats, --cfm-steps must be >= 1, --cfm-frames >= 10, --prompt >= 8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_timing_arguments(parser,
                         model_help="full (= random:original: full-size, random weights; default) | "
                                    "tiny (smoke test) | any model source (random:turbo, a folder, a Hub id)",
                         cfm_frames_help="mel frames per CFM call (default 600: 10 s prompt + 2 s speech)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto (default cpu)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["t3", "cfm"], help="parts to leave out")
    parser.add_argument("--no-libraries", dest="libraries", action="store_false",
                        help="leave out the torchao / bitsandbytes / optimum-quanto rows and the SQNR sweep")
    parser.add_argument("--quick", action="store_true",
                        help="SQNR sweep on one shape (1024x4096) without GPTQ (GPTQ's Hessians take a minute)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time the int4 step with T3's decode step torch.compile'd by BACKEND "
                             "(inductor; compiled before timing, the compile time printed apart)")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _interleaved_medians(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin by :func:`interleaved_runs` (one
    warm-up call each first) so that every candidate sees the same drift in machine load."""
    def timed(fn):
        def run() -> float:
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            return time.perf_counter() - t0
        return run

    runs = interleaved_runs({k: timed(fn) for k, fn in fns.items()}, repeats)
    return {k: statistics.median(v) for k, v in runs.items()}


def _decode_window_fn(model, t3, prompt_ids, n1, n2, compile_backend=None):
    """A function that decodes ``n2`` forced tokens once and returns the seconds from the start
    of decode step ``n1`` to the start of step ``n2 - 1`` (``generate_stream`` yields at both):
    ``n2 - 1 - n1`` whole steps (pick, feed, forward, head) of ONE run. Unlike the slope between
    two runs of different lengths, the prefill and its run-to-run noise (seconds of emulated bf16
    matmuls here, against a window of about one second) never enter the figure. ``compile_backend``
    compiles the decode step (the first call compiles: call once before timing)."""
    from cbx.engine.t3_decode import DecodeSettings, T3Row, generate_stream

    if n2 - 1 <= n1 or n1 < 1:
        raise CbxError(f"--tokens: need 1 <= N1 < N2 - 1 for a timing window, got {n1} {n2}")
    # The engine copies the T3Cond to the model's device but not to its dtype: cast it here so
    # a bf16 T3 gets bf16 conditioning (integer fields stay integer).
    dtype = next(t3.cond_enc.parameters()).dtype
    rows = [T3Row(prompt_ids, _fresh(model.builtin_conds.t3).to(dtype=dtype), seed=0)]
    settings = DecodeSettings(force_tokens=n2, cfg_weight=0.5, compile_backend=compile_backend,
                              prefill_dtype=_prefill_dtype(t3, dtype))

    def run() -> float:
        marks = []
        for _ in generate_stream(t3, rows, settings, chunk_steps=(n1, n2 - 1)):
            _sync()
            marks.append(time.perf_counter())
        if len(marks) != 3:  # two chunk yields and the final one
            raise CbxError(f"decode timing: expected yields at steps {n1} and {n2 - 1}, got {len(marks) - 1}")
        return (marks[1] - marks[0]) / (n2 - 1 - n1)

    return run


def _prefill_dtype(t3, dtype: torch.dtype) -> torch.dtype:
    """The prefill dtype the synthesizer's ``prefill_dtype: auto`` gives this T3 (float32 on a CPU
    that emulates bf16): outside the timed window, but a bf16 prefill there costs each run
    seconds (:func:`cbx.engine.synth.auto_prefill_dtype`)."""
    from types import SimpleNamespace

    from cbx.engine.synth import DTYPES, auto_prefill_dtype

    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    if name is None:
        return dtype
    return DTYPES[auto_prefill_dtype(name, t3.speech_emb.weight.device, SimpleNamespace(t3=t3))]


def interleaved_runs(fns: dict, repeats: int) -> dict:
    """The values ``repeats`` calls of each function return (each measures itself, e.g.
    :func:`_decode_window_fn`), called round-robin after one warm-up call each, so that every
    candidate sees the same drift in machine load."""
    for fn in fns.values():
        fn()
    out: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            out[key].append(fn())
    return out


def step_bytes(t3, rows: int, kv_len: int) -> int:
    """Bytes one decode step must read from memory: the weights it multiplies by (transformer
    layers and the speech head; embeddings are row lookups) and the KV cache of ``rows`` rows
    at ``kv_len`` positions, in the dtype the decoder keeps it in (:func:`kv_cache_dtype`: float32
    on CPU). Divided by the memory bandwidth this is the step's floor."""
    from cbx.engine.t3_decode import _backbone_dims, kv_cache_dtype

    _, kv_heads, head_dim = _backbone_dims(t3)  # KV heads per layer (a pruned T3 differs per layer)
    w = t3.speech_emb.weight
    kv_item = torch.empty((), dtype=kv_cache_dtype(w.dtype, w.device)).element_size()
    kv = 2 * rows * sum(kv_heads) * kv_len * head_dim * kv_item
    return weight_bytes(t3.tfmr) + weight_bytes(t3.speech_head) + kv


def _cond_positions(model) -> int:
    with torch.inference_mode():
        return int(model.t3.prepare_conditioning(_fresh(model.builtin_conds.t3)).shape[1])


def _prompt_ids(model, n_positions: int) -> list[int]:
    """Text ids so that conditioning + text fill about ``n_positions`` cache slots."""
    from cbx.engine.text import t3_text_tokens

    ids = t3_text_tokens(model, BENCH_TEXT)
    t3 = model.t3
    with torch.inference_mode():
        n_cond = t3.prepare_conditioning(_fresh(model.builtin_conds.t3)).shape[1]
    want = max(n_positions - n_cond, 4)
    body = ids[1:-1]
    while len(body) < want - 2:
        body = body + body
    return [ids[0], *body[: want - 2], ids[-1]]


def _fresh(t3_cond):
    import dataclasses

    return dataclasses.replace(t3_cond, cond_prompt_speech_emb=None)


class _Holder(torch.nn.Module):
    """Just enough of a ChatterboxModel for the transforms: ``t3``/``s3gen``, variant, meta."""

    def __init__(self, variant: str, **parts):
        super().__init__()
        for k, v in parts.items():
            setattr(self, k, v)
        self.variant, self.meta = variant, {}


def _t3_rows(model, args) -> tuple[list[tuple[str, float, int]], dict[str, int]]:
    from cbx.compress.registry import apply_transforms, build_config

    prompt = _prompt_ids(model, args.prompt)
    fp32 = model.t3
    t3s = {"fp32": fp32}
    steps = {
        "bf16": [],
        "int8": [("int8_weight_only", build_config("int8_weight_only", {}))],
        "int4": [("int4_weight_only", build_config("int4_weight_only", {"group_size": args.group_size}))],
    }
    for label, st in steps.items():
        print(f"  preparing t3 {label} ...", flush=True)
        holder = _Holder(model.variant, t3=copy.deepcopy(fp32))
        apply_transforms(holder, st)
        t3s[label] = holder.t3.to(torch.bfloat16)
        gc.collect()
    n1, n2 = args.tokens
    fns = {label: _decode_window_fn(model, t3, prompt, n1, n2) for label, t3 in t3s.items()}
    if args.compile:
        label = f"int4+{args.compile}"
        t3s[label] = t3s["int4"]
        fns[label] = _decode_window_fn(model, t3s["int4"], prompt, n1, n2, args.compile)
        t0 = time.perf_counter()
        fns[label]()
        print(f"  compiling the int4 decode step ({args.compile}) + one run: {time.perf_counter() - t0:.1f} s",
              flush=True)
    print(f"  timing {len(fns)} decodes x {args.repeats} (interleaved; steps {n1}..{n2 - 1} of each) ...", flush=True)
    runs = interleaved_runs(fns, args.repeats)
    rows = [(label, statistics.median(runs[label]), weight_bytes(t3)) for label, t3 in t3s.items()]
    _last_t3s.clear()
    _last_t3s.update(t3s)
    n_prompt = len(prompt) + _cond_positions(model)
    per_step = {label: step_bytes(t3, rows=2, kv_len=n_prompt + (n1 + n2) // 2) for label, t3 in t3s.items()}
    return rows, per_step


# the T3 variants of the last _t3_rows call (their kernel paths are printed under the table)
_last_t3s: dict = {}


def _cfm_inputs_for_bench(T: int):
    """Seeded random CFM inputs of ``T`` frames (5/6 prompt, 1/6 new speech) and noise."""
    from cbx.engine.s3gen_batch import CFMInputs

    g = torch.Generator().manual_seed(0)
    prompt = T * 5 // 6
    inputs = CFMInputs(mu=torch.randn(1, 80, T, generator=g), mask=torch.ones(1, 1, T),
                       spks=torch.randn(1, 80, generator=g),
                       cond=torch.cat([torch.randn(1, 80, prompt, generator=g), torch.zeros(1, 80, T - prompt)], -1),
                       prompt_lens=[prompt], out_lens=[T - prompt], token_lens=[(T - prompt) // 2])
    return inputs, torch.randn(1, 80, T, generator=g)


def _cfm_rows(model, args) -> list[tuple[str, float, int]]:
    from cbx.compress.registry import apply_transforms, build_config
    from cbx.engine.s3gen_batch import CFMInputs

    est32 = model.s3gen.flow.decoder.estimator
    inputs, noise = _cfm_inputs_for_bench(args.cfm_frames)
    dev = next(est32.parameters()).device
    inputs = CFMInputs(mu=inputs.mu.to(dev), mask=inputs.mask.to(dev), spks=inputs.spks.to(dev),
                       cond=inputs.cond.to(dev), prompt_lens=inputs.prompt_lens, out_lens=inputs.out_lens,
                       token_lens=inputs.token_lens)
    noise = noise.to(dev)
    ests = {"fp32": est32, "bf16": copy.deepcopy(est32).to(torch.bfloat16)}
    holder = _Holder(model.variant, s3gen=_Holder(model.variant, flow=_Holder(
        model.variant, decoder=_Holder(model.variant, estimator=copy.deepcopy(est32)))))
    apply_transforms(holder, [("fp8_cfm", build_config("fp8_cfm", {}))])
    ests["fp8"] = holder.s3gen.flow.decoder.estimator
    args.cfm_skipped = []
    if args.libraries:
        from cbx.compress.bench_libraries import cfm_library_estimators

        lib, args.cfm_skipped = cfm_library_estimators(est32, model.variant)
        ests.update(lib)

    med = time_cfm_solves(ests, inputs, noise, args.cfm_steps, args.repeats)
    return [(k, med[k], weight_bytes(e)) for k, e in ests.items()]


def time_cfm_solves(ests: dict, inputs, noise, n_steps: int, repeats: int) -> dict:
    """Median seconds of one CFM solve (``n_steps`` Euler steps, CFG) per estimator, on the same
    inputs and noise, runs interleaved (``cbx bench quant`` and ``cbx bench prune``)."""
    from cbx.engine.s3gen_batch import solve_cfm

    def fn(e):
        def run():
            with torch.inference_mode():
                solve_cfm(e, inputs, noise, n_steps, 0.7, False)
        return run

    print(f"  timing CFM x {repeats} (interleaved) ...", flush=True)
    return _interleaved_medians({k: fn(e) for k, e in ests.items()}, repeats)


def _table(title: str, unit: str, rows: list[tuple[str, float, int]], scale: float, baseline: str = "fp32",
           label_width: int = 26, value_width: int = 14) -> None:
    """Rows ``(label, seconds, weight bytes)`` with speed-up and size against the first row."""
    base_t, base_b = rows[0][1], rows[0][2]
    vs = f"vs {baseline}"
    print(f"\n{title}")
    print(f"{'variant':<{label_width}} {unit:>{value_width}} {'speed-up':>9} {'weights GB':>11} {vs:>{len(vs) + 1}}")
    for label, t, b in rows:
        print(f"{label:<{label_width}} {t * scale:>{value_width}.2f} {base_t / t:>8.2f}x {b / 1e9:>11.3f} "
              f"{b / base_b:>{len(vs)}.2f}x")


def run(args: argparse.Namespace) -> int:
    from cbx.engine.timing import machine_description

    check_timing_numbers(args)
    from cbx.engine.cli_synth import resolve_device
    from cbx.engine.model import BENCH_ALIASES, load_model

    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"machine: {machine_description(device)}", flush=True)
    source = BENCH_ALIASES.get(args.model, args.model)
    print(f"loading {source} on {device} ...", flush=True)
    model = load_model(source, device=device)
    print(f"model: {model.source} ({model.variant})", flush=True)
    model.eval()
    t3_rows = cfm_rows = None
    if "cfm" not in args.skip:
        cfm_rows = _cfm_rows(model, args)
    if "t3" not in args.skip:
        t3_rows, per_step = _t3_rows(model, args)
    if "t3" not in args.skip and args.libraries:
        from cbx.compress import bench_libraries as BL

        lin_rows, lin_skipped = BL.t3_linear_rows(model, args.repeats, log=lambda m: print(m, flush=True))
        from cbx.compress.accuracy import SWEEP_METHODS, render, run_sweep

        shapes = ((1024, 4096),) if args.quick else ((1024, 1024), (4096, 1024), (1024, 4096))
        methods = [m for m in SWEEP_METHODS if not (args.quick and m.gptq)]
        print(f"  SQNR sweep: {len(methods)} methods x {len(shapes)} T3 shapes with planted outliers ...", flush=True)
        sweep = run_sweep(shapes=shapes, methods=methods, device=device)
        print("\nOutput SQNR (dB; higher is better) on T3-shaped layers with 1% outlier input channels "
              "(x8 weights, x20 activations), 64 rows")
        print(render(sweep))
        BL.print_linear_table(lin_rows, lin_skipped, {r.method.label: r.sqnr_db.get("1024x4096")
                                                      for r in sweep if not r.skipped})
    if cfm_rows:
        _table(f"CFM estimator, {args.cfm_steps} Euler steps with CFG (batch 2), {args.cfm_frames} frames",
               "seconds", cfm_rows, 1.0)
        for label, why in getattr(args, "cfm_skipped", []):
            print(f"{label:<14} skipped: {why}")
    if t3_rows:
        _table(f"T3 decode step, batch 2 (CFG), KV cache {args.prompt} + {args.tokens[0]}..{args.tokens[1] - 1}",
               "ms/step", t3_rows, 1e3)
        from cbx.compress.kernels import kernel_summary

        print("kernel paths: " + "; ".join(f"{label} {kernel_summary(t3)['paths']}" for label, t3 in _last_t3s.items()
                                            if kernel_summary(t3)["paths"]))
    if t3_rows and device.type == "cpu":
        from cbx.engine.timing import read_bandwidth

        bw = read_bandwidth()
        print(f"\nT3 decode step against the memory floor (bytes read per step: weights multiplied + KV cache; "
              f"measured read bandwidth {bw / 1e9:.1f} GB/s)")
        print(f"{'variant':<14} {'ms/step':>8} {'floor ms':>9} {'x floor':>8} {'MB/step':>8}")
        for label, t, _ in t3_rows:
            b = per_step[label]
            print(f"{label:<14} {t * 1e3:>8.2f} {b / bw * 1e3:>9.3f} {t / (b / bw):>7.2f}x {b / 1e6:>8.1f}")
        int4 = dict((r[0], r) for r in t3_rows)["int4"]
        floor = per_step["int4"] / bw
        print(f"t3 int4 step {int4[1] * 1e3:.2f} ms, memory floor {floor * 1e3:.3f} ms ({int4[1] / floor:.2f}x floor)")
    if t3_rows:
        int4 = dict((r[0], r) for r in t3_rows)["int4"]
        print(f"t3 int4 decode speed-up vs fp32: {t3_rows[0][1] / int4[1]:.2f}x, weights {int4[2] / 1e9:.2f} GB")
    return 0
