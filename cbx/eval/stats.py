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


def paired_delta_ci(base, test, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
    """Interval of ``mean(test) - mean(base)`` with utterances resampled in pairs (the same
    utterance drawn for both), so between-utterance spread, which both share, cancels."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    return _interval((a, b), lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis), n_resamples, seed, confidence)


def paired_ratio_ci(base, test, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
    """Interval of ``mean(test) / mean(base)``, utterances resampled in pairs."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)

    def stat(x, y, axis):
        return np.mean(y, axis=axis) / np.where(np.mean(x, axis=axis) == 0, np.nan, np.mean(x, axis=axis))

    return _interval((a, b), stat, n_resamples, seed, confidence)


def ratio_of_means_ci(base, test, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
    """Interval of ``mean(base) / mean(test)`` for two independent samples (repeated timings of
    two runs: speed-up = baseline RTF / RTF), each resampled on its own; None unless both have
    two or more values. Percentile bootstrap written out (scipy's pairs samples of equal size)."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1)
    mb = b[rng.integers(0, b.size, size=(n_resamples, b.size))].mean(axis=1)
    r = ma / np.maximum(mb, 1e-300)
    alpha = (1.0 - confidence) / 2.0
    return (float(np.quantile(r, alpha)), float(np.quantile(r, 1.0 - alpha)))


def excludes(interval, value: float) -> bool | None:
    """Whether ``value`` lies outside ``interval`` (a significant difference); None without one."""
    if interval is None:
        return None
    lo, hi = interval
    return not (lo <= value <= hi)
