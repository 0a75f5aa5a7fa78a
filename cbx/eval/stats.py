"""Bootstrap confidence intervals for per-utterance metrics.

Thin wrappers over :func:`scipy.stats.bootstrap` (percentile method: BCa needs jackknife
resamples and breaks on constant data such as a WER of 0 everywhere) with a fixed seed, so the
same rows always give the same interval. Corpus-level ratios (corpus WER = errors / words) are
bootstrapped as paired resamples of utterances, so long and short utterances stay together
with their own counts. Fewer than two values have no interval (``None``).
"""

from __future__ import annotations

import warnings

import numpy as np

N_RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0


def _interval(data: tuple[np.ndarray, ...], statistic, n_resamples: int, seed: int, confidence: float) -> tuple[float, float] | None:
    from scipy.stats import bootstrap

    n = len(data[0])
    if n < 2:
        return None
    if all(np.all(d == d[0]) for d in data):  # constant data: the interval is the point
        v = float(statistic(*data, axis=-1))
        return (v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-distribution warnings on tiny samples
        res = bootstrap(
            data,
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            paired=len(data) > 1,
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    lo, hi = res.confidence_interval
    return (float(lo), float(hi))


def mean_ci(values, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
    """Percentile-bootstrap interval of the mean, or None for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    return _interval((x,), lambda a, axis: np.mean(a, axis=axis), n_resamples, seed, confidence)


def ratio_ci(num, den, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
    """Interval of ``sum(num) / sum(den)`` with utterances resampled in pairs."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)

    def stat(x, y, axis):
        return np.sum(x, axis=axis) / np.maximum(np.sum(y, axis=axis), 1e-12)

    return _interval((a, b), stat, n_resamples, seed, confidence)
