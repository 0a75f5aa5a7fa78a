"""Registry of metrics, in the manner of lm-evaluation-harness.

Every metric declares its name (the key it has in result rows), whether higher is better,
its version (bumped whenever its numbers can change), its unit and how per-utterance values
aggregate. Leaderboards and comparisons read the direction from here, never from a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cbx.errors import CbxError


@dataclass(frozen=True)
class MetricSpec:
    name: str
    higher_is_better: bool | None  # None: informational (e.g. loudness), never ranked
    version: str
    unit: str = ""
    aggregation: str = "mean"  # "mean" | "sum" | "max" | "corpus" (computed by the scorer)
    description: str = ""
    # For aggregation "corpus": the two ``details`` keys whose sums divide (errors, reference
    # words), so corpus WER = sum(errors) / sum(words) over the utterances scored.
    corpus_counts: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"metric {self.name!r}: aggregation {self.aggregation!r} not in {AGGREGATIONS}")
        if (self.aggregation == "corpus") != (self.corpus_counts is not None):
            raise ValueError(f"metric {self.name!r}: corpus aggregation needs corpus_counts (and only it)")


AGGREGATIONS = ("mean", "sum", "max", "corpus")


_METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    old = _METRICS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"metric {spec.name!r} registered twice with different specs")
    _METRICS[spec.name] = spec
    return spec


def metric_specs() -> dict[str, MetricSpec]:
    import importlib

    importlib.import_module("cbx.eval.metrics")  # registers the built-in metrics
    return dict(_METRICS)


def get_metric(name: str) -> MetricSpec:
    specs = metric_specs()
    if name not in specs:
        raise CbxError(f"unknown metric {name!r}; valid choices: {', '.join(sorted(specs))}")
    return specs[name]


MetricFn = Callable[..., dict]
