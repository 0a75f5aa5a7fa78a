"""Predicted speech quality (MOS, 1-5) from models whose weights ship in their wheels.

Default: DistillMOS v7 (``distillmos``, MIT), a small conv-transformer distilled from an
XLS-R quality model; on real read speech it gives about 4, and 2 once white noise at 5 dB
SNR is added. Option: DNSMOS P.835 overall score (``speechmos``' ONNX models, onnxruntime).
The backend is the group's ``variant``: the two scales are not interchangeable.

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
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cbx.errors import CbxError
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.types import Utterance

VERSION = "1"
MOS_SR = 16000

SPECS = [
    register_metric(MetricSpec("mos", True, VERSION, "MOS", "mean", "predicted mean opinion score, 1 (bad) to 5 (excellent)")),
]


@dataclass(frozen=True)
class MosConfig:
    backend: str = "distillmos"  # "distillmos" | "dnsmos"

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


class MosGroup:
    specs: ClassVar[list[MetricSpec]] = SPECS

    def __init__(self, config: MosConfig | None = None):
        self.config = config or MosConfig()
        if self.config.backend not in ("distillmos", "dnsmos"):
            raise CbxError(f"MOS backend {self.config.backend!r}: valid choices are distillmos, dnsmos")
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
            try:
                from pathlib import Path

                from speechmos import dnsmos
            except ImportError as e:
                raise CbxError(f"DNSMOS needs speechmos and onnxruntime (pip install speechmos onnxruntime): {e}") from None
            d = Path(dnsmos.__file__).parent / "dnsmos_models"
            self._model = dnsmos.DNSMOS(str(d / "sig_bak_ovr.onnx"), str(d / "model_v8.onnx"))

    def predict(self, wav16k: np.ndarray) -> float:
        self.load()
        x = np.asarray(wav16k, dtype=np.float32)
        if self.config.backend == "distillmos":
            import torch

            with torch.inference_mode():
                return float(self._model(torch.from_numpy(x)[None]).item())
        return float(self._model(np.clip(x, -1.0, 1.0), MOS_SR, False)["ovrl_mos"])

    def score(self, utt: Utterance) -> dict[str, float]:
        x = utt.audio_at(MOS_SR)
        if not np.all(np.isfinite(x)) or not np.any(x):  # NaN or digital silence has no quality to predict
            return {}
        return {"mos": self.predict(x)}
