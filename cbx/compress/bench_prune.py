"""``cbx bench prune``: what structured pruning buys T3's decode step and the CFM estimator.

On the full-size original architecture with random weights (no download), built once:

* T3 decode step (batch 2 = one utterance and its CFG pair), all rows in bf16 (the same dtype,
  so the ratio is what pruning buys): unpruned, 25% and 33% of the layers dropped, 25% of every
  layer's FFN channels removed, and 33% depth + INT4 weight-only. A step's time is measured
  inside one forced decode of N2 tokens, from the start of step N1 to the start of step N2 - 1
  (:func:`cbx.compress.bench._decode_window_fn`), median over ``--repeats`` runs interleaved
  round-robin across the models (as ``cbx bench quant`` now times its steps). The slope between
  two decode lengths used before cancels the prefill only in expectation: its noise (seconds of
  emulated bf16 matmuls for a 150-position prompt) stayed in each run: the 33%-depth ratio read
  1.29x, 1.43x and 1.59x in three runs of that measurement on the AVX2 CPU.
* T3 resident weight bytes of each. The int4 row quantizes, besides the default targets, the
  learned position tables and the perceiver (``methods.T3_EXTRA_TARGETS``): the 21 MB of bf16
  they hold otherwise are a tenth of that model.
* CFM estimator time (``--cfm-steps`` Euler steps with CFG over ``--cfm-frames`` frames, fp32
  as upstream runs it) unpruned and with 25% / 33% of its transformer blocks dropped.

Which layers/channels go does not change the cost, and importance on random weights means
nothing, so the bench cuts with the surgery functions directly (evenly spaced layers, the
first channels) instead of running calibration; the transforms that choose by importance are
tested on the tiny model. The last line is exactly
``t3 pruned 33% depth: decode speed-up N.NNx, weights N.NN GB``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics

import torch

from cbx.compress import prune as P
from cbx.compress.bench import (_decode_window_fn, _Holder, _prompt_ids, add_timing_arguments, check_timing_numbers,
                                interleaved_runs)
from cbx.compress.bench import _table as _quant_table
from cbx.compress.methods import T3_EXTRA_TARGETS, T3_TARGETS
from cbx.compress.size import weight_bytes
from cbx.errors import CbxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_timing_arguments(parser,
                         model_help="full (= random:original, full size, random weights; default) | "
                                    "tiny (smoke test) | a model source with a Llama T3",
                         cfm_frames_help="mel frames per CFM call (default 600)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["t3", "cfm"], help="parts to leave out")


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` indices spread over the range (never the first: it reads the embeddings)."""
    if k <= 0:
        return []
    return sorted({min(n - 1, 1 + round(i * (n - 1) / k)) for i in range(k)})


def _depth(t3, fraction: float) -> None:
    n = len(t3.tfmr.layers)
    drop = evenly_spaced(n, round(n * fraction))
    P.drop_t3_layers(t3, [i for i in range(n) if i not in drop])


def _t3_rows(model, args) -> list[tuple[str, float, int]]:
    from cbx.compress.registry import apply_transforms, build_config

    prompt = _prompt_ids(model, args.prompt)
    base = model.t3

    def make(label, fn):
        print(f"  preparing t3 {label} ...", flush=True)
        t3 = copy.deepcopy(base)
        fn(t3)
        gc.collect()
        return t3.to(torch.bfloat16)

    def int4(t3):
        _depth(t3, 1 / 3)
        targets = [*T3_TARGETS[model.variant], *T3_EXTRA_TARGETS[model.variant]]
        params = {"group_size": args.group_size, "targets": targets}
        apply_transforms(_Holder(model.variant, t3=t3),
                         [("int4_weight_only", build_config("int4_weight_only", params))])

    def ffn(t3):
        for layer in t3.tfmr.layers:
            width = layer.mlp.down_proj.in_features
            P.narrow_ffn(layer.mlp, range(P.n_to_keep(width, 0.25, 128)))

    t3s = {
        "unpruned": make("unpruned", lambda t3: None),
        "depth 25%": make("depth 25%", lambda t3: _depth(t3, 0.25)),
        "depth 33%": make("depth 33%", lambda t3: _depth(t3, 1 / 3)),
        "ffn 25%": make("ffn 25%", ffn),
        "d33%+int4": make("d33%+int4", int4),
    }
    n1, n2 = args.tokens
    fns = {label: _decode_window_fn(model, t3, prompt, n1, n2) for label, t3 in t3s.items()}
    print(f"  timing steps {n1}..{n2 - 1} of a {n2}-token decode, {len(fns)} models x {args.repeats} "
          "(interleaved) ...", flush=True)
    runs = interleaved_runs(fns, args.repeats)
    for label, times in runs.items():
        print(f"    {label}: " + " ".join(f"{t * 1e3:.1f}" for t in times) + " ms/step", flush=True)
    return [(f"{label} ({len(t3.tfmr.layers)}L)", statistics.median(runs[label]), weight_bytes(t3))
            for label, t3 in t3s.items()]


def _cfm_rows(model, args) -> list[tuple[str, float, int]]:
    from cbx.compress.bench import _cfm_inputs_for_bench, time_cfm_solves

    est = model.s3gen.flow.decoder.estimator
    inputs, noise = _cfm_inputs_for_bench(args.cfm_frames)
    names = P.cfm_blocks(est)
    ests = {"unpruned": est}
    for label, frac in (("depth 25%", 0.25), ("depth 33%", 1 / 3)):
        e = copy.deepcopy(est)
        P.drop_cfm_blocks(e, [names[i] for i in evenly_spaced(len(names), round(len(names) * frac))])
        ests[label] = e

    med = time_cfm_solves(ests, inputs, noise, args.cfm_steps, args.repeats)
    return [(f"{k} ({len(P.cfm_blocks(e))} blk)", med[k], weight_bytes(e)) for k, e in ests.items()]


def _table(title: str, unit: str, rows, scale: float) -> None:
    _quant_table(title, unit, rows, scale, baseline="unpruned", label_width=18, value_width=10)


def run(args: argparse.Namespace) -> int:
    from cbx.engine.model import BENCH_ALIASES, load_model
    from cbx.engine.timing import machine_description

    check_timing_numbers(args)
    torch.manual_seed(0)
    print(f"machine: {machine_description()}", flush=True)
    source = BENCH_ALIASES.get(args.model, args.model)
    print(f"loading {source} ...", flush=True)
    model = load_model(source)
    if model.t3.is_gpt:
        raise CbxError(f"--model {args.model}: pruning bench needs a Llama T3 (original or multilingual)")
    model.eval()
    print(f"model: {model.source} ({model.variant})", flush=True)
    cfm_rows = _cfm_rows(model, args) if "cfm" not in args.skip else None
    t3_rows = _t3_rows(model, args) if "t3" not in args.skip else None
    if cfm_rows:
        _table(f"CFM estimator (fp32), {args.cfm_steps} Euler steps with CFG (batch 2), {args.cfm_frames} frames",
               "seconds", cfm_rows, 1.0)
    if t3_rows:
        _table(f"T3 decode step (bf16; int4 row: int4 weights incl. position tables and perceiver, bf16 "
               f"activations), batch 2 (CFG), KV cache {args.prompt} + {args.tokens[0]}..{args.tokens[1] - 1}",
               "ms/step", t3_rows, 1e3)
        d33 = t3_rows[2]
        print(f"t3 pruned 33% depth: decode speed-up {t3_rows[0][1] / d33[1]:.2f}x, weights {d33[2] / 1e9:.2f} GB")
    return 0
