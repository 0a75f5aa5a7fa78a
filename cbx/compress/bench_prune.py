"""``cbx bench prune``: what structured pruning buys T3's decode step and the CFM estimator.

On the full-size original architecture with random weights (no download), built once:

* T3 decode step (batch 2 = one utterance and its CFG pair), measured as ``cbx bench quant``
  does (slope between two forced decode lengths, interleaved medians), all rows in bf16 (the
  same dtype, so the ratio is what pruning buys): unpruned, 25% and 33% of the layers dropped,
  25% of every layer's FFN channels removed, and 33% depth + INT4 weight-only.
* T3 resident weight bytes of each.
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

import torch

from cbx.compress import prune as P
from cbx.compress.bench import _decode_fn, _Holder, _interleaved_medians, _prompt_ids, _table as _quant_table
from cbx.compress.size import weight_bytes
from cbx.errors import CbxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="full",
                        help="full (= random:original, full size, random weights; default) | tiny (smoke test) | "
                             "a model source with a Llama T3")
    parser.add_argument("--prompt", type=int, default=150, help="prompt positions in the KV cache (default 150)")
    parser.add_argument("--tokens", type=int, nargs=2, default=(8, 40), metavar=("N1", "N2"),
                        help="the two forced decode lengths whose time difference gives the step time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are printed")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--cfm-frames", type=int, default=600, help="mel frames per CFM call (default 600)")
    parser.add_argument("--cfm-steps", type=int, default=2, help="Euler steps timed per CFM figure (default 2)")
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
        apply_transforms(_Holder(model.variant, t3=t3),
                         [("int4_weight_only", build_config("int4_weight_only", {"group_size": args.group_size}))])

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
    fns = {}
    for label, t3 in t3s.items():
        fns[(label, n1)] = _decode_fn(model, t3, prompt, n1)
        fns[(label, n2)] = _decode_fn(model, t3, prompt, n2)
    print(f"  timing {len(fns)} decode runs x {args.repeats} (interleaved) ...", flush=True)
    med = _interleaved_medians(fns, args.repeats)
    rows = []
    for label, t3 in t3s.items():
        step = max(med[(label, n2)] - med[(label, n1)], 1e-9) / (n2 - n1)
        rows.append((f"{label} ({len(t3.tfmr.layers)}L)", step, weight_bytes(t3)))
    return rows


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

    if args.tokens[1] <= args.tokens[0] or args.tokens[0] < 1:
        raise CbxError(f"--tokens: need 1 <= N1 < N2, got {args.tokens[0]} {args.tokens[1]}")
    if args.repeats < 1 or args.cfm_frames < 10 or args.cfm_steps < 1 or args.prompt < 8:
        raise CbxError("--repeats, --cfm-steps must be >= 1, --cfm-frames >= 10, --prompt >= 8")
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
        _table(f"T3 decode step (bf16; int4 row: int4 weights, bf16 activations), batch 2 (CFG), "
               f"KV cache {args.prompt} + {args.tokens[0]}..{args.tokens[1]}", "ms/step", t3_rows, 1e3)
        d33 = t3_rows[2]
        print(f"t3 pruned 33% depth: decode speed-up {t3_rows[0][1] / d33[1]:.2f}x, weights {d33[2] / 1e9:.2f} GB")
    return 0
