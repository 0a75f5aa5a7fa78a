"""Fidelity metric group: how close an output is to the uncompressed model's output.

Scores a test waveform against ``utt.reference_audio`` with the pure functions of
:mod:`cbx.eval.fidelity`; without a reference the group returns nothing. The test waveform is
``utt.fidelity_audio`` when the manifest gives one (``fidelity_audio``), else ``utt.audio``.
The runner gives both: the compressed model's decoder and the baseline's, each run on the
baseline's speech tokens with the same CFM noise ("aligned" fidelity). Comparing the two
models' *sampled* outputs instead would measure sampling noise after the first token that
differs, not what compression did to the decoder. The T3 metrics need two models under teacher forcing, which only
the runner has: it computes them with :func:`cbx.eval.fidelity.top1_agreement` and
:func:`cbx.eval.fidelity.mean_kl` and passes them in ``utt.extra`` under the metric names
(``t3_top1_agreement``, ``t3_kl``), so they are recorded under a registered direction and
version like every other metric.

Result rows are JSON, which has no infinity: an SNR of identical outputs is reported as
``SNR_CAP_DB`` (no real difference between float32 outputs comes near it), and an infinite
KL as ``KL_CAP`` (far above any finite KL between the models' softmaxes in practice).
"""

from __future__ import annotations

import math
from typing import ClassVar

from cbx.eval import dsp, fidelity
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.types import Utterance

VERSION = "1"
SNR_CAP_DB = 200.0
KL_CAP = 1e6
MIN_MEL_S = 0.08  # one S3Gen mel window (1920 samples at 24 kHz); shorter outputs get no mel_l1


def _spec(name, higher, unit, desc):
    return register_metric(MetricSpec(name, higher, VERSION, unit, "mean", desc))


SPECS = [
    _spec("mel_l1", False, "nats", "mean |log-mel difference| to the baseline output (S3Gen mel settings)"),
    _spec("mcd_db", False, "dB", "mel cepstral distortion to the baseline output (c1..c13 of the S3Gen log-mel, aligned frames)"),
    _spec("wave_snr_db", True, "dB", "SNR of the output against the baseline waveform (cropped to the shorter)"),
    _spec("wave_max_abs_err", False, "FS", "largest absolute sample difference to the baseline waveform"),
    _spec("t3_top1_agreement", True, "fraction", "T3 next-token top-1 agreement with the baseline (teacher forced)"),
    _spec("t3_kl", False, "nats", "mean KL(baseline || compressed) of T3 next-token distributions"),
]


def _clamp(v: float, cap: float) -> float:
    if math.isnan(v):
        return v
    return max(-cap, min(cap, v))


class FidelityGroup:
    specs: ClassVar[list[MetricSpec]] = SPECS

    def load(self) -> None:
        """Nothing to load."""

    def score(self, utt: Utterance) -> dict[str, float]:
        with dsp.one_blas_thread():
            return self._score(utt)

    def _score(self, utt: Utterance) -> dict[str, float]:
        out: dict[str, float] = {}
        extra = utt.extra or {}
        if "t3_top1_agreement" in extra:
            out["t3_top1_agreement"] = float(extra["t3_top1_agreement"])
        if "t3_kl" in extra:
            out["t3_kl"] = _clamp(float(extra["t3_kl"]), KL_CAP)
        if utt.reference_audio is None:
            return out
        ref_sr = utt.reference_sr or utt.sr
        ref = dsp.finite(utt.reference_audio)
        if utt.fidelity_audio is not None:
            test, test_sr = dsp.finite(utt.fidelity_audio), int(utt.fidelity_sr or utt.sr)
        else:
            test, test_sr = dsp.finite(utt.audio), utt.sr
        if min(ref.size / ref_sr, test.size / test_sr) >= MIN_MEL_S:
            out["mel_l1"] = fidelity.mel_l1(ref, test, ref_sr, test_sr)
            out["mcd_db"] = fidelity.mel_cepstral_distortion(ref, test, ref_sr, test_sr)
        if min(ref.size, test.size) == 0:
            return out
        wd = fidelity.waveform_distance(dsp.resample(ref, ref_sr, test_sr), test)
        out["wave_snr_db"] = _clamp(wd["snr_db"], SNR_CAP_DB)
        out["wave_max_abs_err"] = wd["max_abs_err"]
        return out
