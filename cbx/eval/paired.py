"""Baseline-relative numbers paired per utterance, with bootstrap intervals.

A compressed run and its baseline synthesize the same utterances with the same seeds, so their
difference is best measured utterance by utterance: the spread between easy and hard sentences,
which both runs share, cancels in the pairs and the interval of the difference is much tighter
than the two separate intervals suggest (the usual paired bootstrap of ASR and MT evaluation).
Only utterances scored in BOTH runs enter: a metric missing for an utterance in either run (a
failed output, a clip too short for the speaker model) drops that pair, and ``n`` says how many
pairs were left, so the two means are always over the same utterances.

For each metric aggregated as a mean: ``base`` and ``value`` (means over the pairs), ``delta``
(value - base) with ``delta_ci95``, ``ratio`` (value / base) with ``ratio_ci95``, and
``significant``: whether the interval of the delta excludes 0 (None when no interval exists,
for fewer than two pairs).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from cbx.eval import stats


def compare(base_rows: Iterable[dict], rows: Iterable[dict], metrics: Iterable[str] | None = None,
            n_resamples: int = stats.N_RESAMPLES, seed: int = stats.SEED, confidence: float = stats.CONFIDENCE) -> dict:
    """``{"n_common", "bootstrap", "metrics": {name: {...}}}`` over utterances in both row sets
    (rows of the scorer's ``utterances.jsonl``: ``{"id", "metrics": {name: value}}``)."""
    from cbx.eval.registry import metric_specs

    specs = metric_specs()
    base = {str(r["id"]): r.get("metrics") or {} for r in base_rows}
    test = {str(r["id"]): r.get("metrics") or {} for r in rows}
    common = sorted(set(base) & set(test))  # sorted: the bootstrap resamples by position
    names = list(metrics) if metrics is not None else sorted({k for i in common for k in test[i]} & {k for i in common for k in base[i]})
    out: dict = {}
    kw = dict(n_resamples=n_resamples, seed=seed, confidence=confidence)
    for name in names:
        spec = specs.get(name)
        if spec is not None and spec.aggregation != "mean":
            continue
        ids = [i for i in common if base[i].get(name) is not None and test[i].get(name) is not None]
        if not ids:
            continue
        a = np.array([base[i][name] for i in ids], dtype=np.float64)
        b = np.array([test[i][name] for i in ids], dtype=np.float64)
        delta_ci = stats.paired_delta_ci(a, b, **kw)
        bm = float(a.mean())
        out[name] = {
            "n": len(ids),
            "base": bm,
            "value": float(b.mean()),
            "delta": float(b.mean() - bm),
            "delta_ci95": list(delta_ci) if delta_ci else None,
            "ratio": float(b.mean() / bm) if bm != 0 else None,
            "ratio_ci95": (list(r) if (r := stats.paired_ratio_ci(a, b, **kw)) and all(np.isfinite(r)) else None) if bm != 0 else None,
            "significant": stats.excludes(delta_ci, 0.0),
            "higher_is_better": spec.higher_is_better if spec else None,
        }
    return {"n_common": len(common), "bootstrap": {"n_resamples": n_resamples, "confidence": confidence, "seed": seed},
            "metrics": out}
