"""Predicted speech quality (MOS, 1-5) from models whose weights ship in their wheels.

Default: DNSMOS P.835 overall quality (OVRL), with the ONNX model shipped in ``speechmos``
(MIT) run by onnxruntime. On the offline set's real voices it gives 2.6-3.4 for clean speech
and 1.5-2.2 once white noise at 5 dB SNR is added, including the two narrow-band phone-call
voices. Option: DistillMOS v7 (``distillmos``), closer to naturalness MOS, but it rated one
clean phone-call voice 1.8 (below the same voice with noise): it is not the default. The
backend is the group's ``variant``: the two scales are not interchangeable.

DNSMOS is run here rather than through ``speechmos.dnsmos.run``: that helper builds two ONNX
sessions per call and also runs the P.808 model, which OVRL does not need. The procedure is
the DNSMOS reference one (the window slides in 1 s hops over clips of 9.01 s or more, each raw
score goes through the published calibration polynomial, the hops are averaged), except that a
clip shorter than the window is scored on one window of its doubled copies rather than on every
1 s hop over them (same sound, up to 9x less work; within 0.1 of the reference on the offline
voices).

``distillmos`` imports torchaudio at module level for its file-reading helper only, and no
torchaudio loads on torch 2.13 here. So that the eval layer needs neither torchaudio nor the
engine's shim, the import runs with a placeholder ``torchaudio`` module in ``sys.modules``
that is removed right after (an already-imported torchaudio or shim is left as it was); we
never call the helper that would use it.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from pathlib import Path
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cbx.errors import CbxError
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.runtime import lane_threads
from cbx.eval.types import Utterance

VERSION = "1"
MOS_SR = 16000

SPECS = [
    register_metric(MetricSpec("mos", True, VERSION, "MOS", "mean", "predicted mean opinion score, 1 (bad) to 5 (excellent)")),
]


BACKENDS = ("dnsmos", "distillmos")


@dataclass(frozen=True)
class MosConfig:
    backend: str = "dnsmos"  # one of BACKENDS

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise CbxError(f"MOS backend {self.backend!r}: valid choices are {', '.join(BACKENDS)}")

    @property
    def variant(self) -> str:
        return {"distillmos": "distillmos-v7", "dnsmos": "dnsmos-p835-ovrl"}.get(self.backend, self.backend)


def _import_distillmos():
    placeholder = None
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401  (a working torchaudio is used as it is)
        except Exception:
            placeholder = types.ModuleType("torchaudio")
            sys.modules["torchaudio"] = placeholder
    try:
        import distillmos
    except ImportError as e:
        raise CbxError(f"MOS needs distillmos (pip install --no-deps distillmos==0.9.1 xls-r-sqa==0.1.0): {e}") from None
    finally:
        if placeholder is not None and sys.modules.get("torchaudio") is placeholder:
            del sys.modules["torchaudio"]
    return distillmos


DNSMOS_WINDOW_S = 9.01
DNSMOS_OVRL_POLY = (-0.06766283, 1.11546468, 0.04602535)  # raw OVRL -> calibrated (DNSMOS P.835)


class _Dnsmos:
    def __init__(self):
        import importlib.util

        spec = importlib.util.find_spec("speechmos")
        if spec is None or not spec.submodule_search_locations:
            raise CbxError("DNSMOS needs the speechmos package (pip install speechmos==0.0.1.1), which ships its ONNX model")
        path = Path(next(iter(spec.submodule_search_locations))) / "dnsmos_models" / "sig_bak_ovr.onnx"
        try:
            import onnxruntime as ort
        except ImportError:
            raise CbxError("DNSMOS needs onnxruntime (pip install onnxruntime)") from None
        so = ort.SessionOptions()
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = lane_threads()  # the scorer runs ASR beside it
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on a shared CPU
        so.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._input = self._sess.get_inputs()[0].name

    def ovrl(self, x16k: np.ndarray) -> float:
        x = np.clip(np.asarray(x16k, dtype=np.float32), -1.0, 1.0)
        win = int(DNSMOS_WINDOW_S * MOS_SR)
        if len(x) < win:
            # The reference doubles a short clip until it fills the window, then slides over the
            # copies (up to 9 windows of the same sound for an 8.9 s clip); one window of it is
            # the same measurement at a fraction of the cost.
            while len(x) < win:
                x = np.concatenate([x, x])
            return float(np.polyval(DNSMOS_OVRL_POLY, self._raw_ovrl(x[:win])))
        hops = int(np.floor(len(x) / MOS_SR) - DNSMOS_WINDOW_S) + 1  # the reference's count
        raw = [self._raw_ovrl(x[h * MOS_SR : h * MOS_SR + win]) for h in range(hops) if h * MOS_SR + win <= len(x)]
        return float(np.mean(np.polyval(DNSMOS_OVRL_POLY, np.array(raw))))

    def _raw_ovrl(self, seg: np.ndarray) -> float:
        return float(self._sess.run(None, {self._input: seg[None]})[0][0][2])


class MosGroup:
    specs: ClassVar[list[MetricSpec]] = SPECS

    def __init__(self, config: MosConfig | None = None):
        self.config = config or MosConfig()
        self.variant = self.config.variant
        self._model = None

    def load(self) -> None:
        if self._model is not None:
            return
        if self.config.backend == "distillmos":
            distillmos = _import_distillmos()
            with contextlib.redirect_stdout(io.StringIO()):  # it prints where it loaded weights from
                self._model = distillmos.ConvTransformerSQAModel().eval()
        else:
            self._model = _Dnsmos()

    def predict(self, wav16k: np.ndarray) -> float:
        self.load()
        x = np.asarray(wav16k, dtype=np.float32)
        if self.config.backend == "distillmos":
            import torch

            with torch.inference_mode():
                return float(self._model(torch.from_numpy(x)[None]).item())
        return self._model.ovrl(x)

    def score(self, utt: Utterance) -> dict[str, float]:
        x = utt.audio_at(MOS_SR)
        if not np.all(np.isfinite(x)) or not np.any(x):  # NaN or digital silence has no quality to predict
            return {}
        return {"mos": self.predict(x)}
