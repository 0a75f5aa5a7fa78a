"""Speaker similarity: cosine similarity of speaker embeddings of the output and the voice prompt.

Offline default: Resemblyzer's GE2E encoder (256-d, weights shipped in the wheel). It runs with
one torch thread, set only around its own calls: with two threads it was about 20x slower on the
2-core machine (1.0 s vs 0.04 s per 5 s clip), and restoring the count afterwards leaves the rest
of the process (the engine, in a runner) untouched. Users with a network can choose a WavLM
speaker-verification model from the Hub (``backend="wavlm"``), or Seed-TTS-eval's own SIM model
(``backend="wavlm-ecapa"``: WavLM-Large + ECAPA-TDNN from its checkpoint file, see
:mod:`cbx.eval.metrics.wavlm_ecapa`). The backend and model are the group's ``variant``:
similarities of different encoders have different scales and are never compared as equals.

Prompt embeddings are cached by the prompt's samples (many utterances share a prompt); the cache
only saves time, it cannot change a score.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cbx.errors import CbxError
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.types import Utterance

VERSION = "1"
SPK_SR = 16000
MIN_SPEECH_S = 0.3  # below this (after the encoder's own silence trimming) no embedding is made

SPECS = [
    register_metric(
        MetricSpec("speaker_sim", True, VERSION, "cos", "mean", "cosine similarity of speaker embeddings, output vs voice prompt")
    ),
]


BACKENDS = ("resemblyzer", "wavlm", "wavlm-ecapa")


@dataclass(frozen=True)
class SpeakerConfig:
    backend: str = "resemblyzer"  # one of BACKENDS; resemblyzer is the only offline one
    wavlm_model: str = "microsoft/wavlm-base-plus-sv"  # backend "wavlm": a Hub x-vector model
    # backend "wavlm-ecapa" (Seed-TTS-eval's SIM): its wavlm_large_finetune.pth; None: $CBX_WAVLM_ECAPA_CKPT
    ecapa_checkpoint: str | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise CbxError(f"speaker backend {self.backend!r}: valid choices are {', '.join(BACKENDS)}")

    @property
    def variant(self) -> str:
        if self.backend == "resemblyzer":
            return "resemblyzer-ge2e"
        if self.backend == "wavlm-ecapa":
            return "wavlm-large-ecapa-tdnn"  # Seed-TTS-eval's SIM model
        return f"wavlm:{self.wavlm_model}"


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class SpeakerGroup:
    specs: ClassVar[list[MetricSpec]] = SPECS

    def __init__(self, config: SpeakerConfig | None = None):
        self.config = config or SpeakerConfig()
        self.variant = self.config.variant
        self._enc = None
        self._prompt_cache: dict[str, np.ndarray | None] = {}

    def load(self) -> None:
        if self._enc is not None:
            return
        if self.config.backend == "resemblyzer":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # webrtcvad's pkg_resources deprecation notice
                    import resemblyzer
            except ImportError as e:
                raise CbxError(f"speaker similarity needs resemblyzer (pip install --no-deps resemblyzer==0.1.4 webrtcvad): {e}") from None
            with torch_threads(1):
                self._enc = resemblyzer.VoiceEncoder(self.config.device, verbose=False)
        elif self.config.backend == "wavlm-ecapa":
            from cbx.eval.metrics import wavlm_ecapa

            self._enc = wavlm_ecapa.load(self.config.ecapa_checkpoint, self.config.device)
        else:
            try:
                from transformers import AutoFeatureExtractor, WavLMForXVector

                fe = AutoFeatureExtractor.from_pretrained(self.config.wavlm_model)
                model = WavLMForXVector.from_pretrained(self.config.wavlm_model).eval().to(self.config.device)
            except Exception as e:
                raise CbxError(f"cannot load speaker model {self.config.wavlm_model!r} ({type(e).__name__}: {e})") from None
            self._enc = (fe, model)

    def embed(self, wav16k: np.ndarray) -> np.ndarray | None:
        """Speaker embedding of 16 kHz audio, or None when it holds too little speech."""
        self.load()
        if self.config.backend == "resemblyzer":
            from resemblyzer import preprocess_wav

            x = preprocess_wav(np.asarray(wav16k, dtype=np.float32), source_sr=SPK_SR)
            if len(x) < MIN_SPEECH_S * SPK_SR:
                return None
            with torch_threads(1):
                return np.asarray(self._enc.embed_utterance(x), dtype=np.float64)
        import torch

        if len(wav16k) < MIN_SPEECH_S * SPK_SR:
            return None
        if self.config.backend == "wavlm-ecapa":
            return self._enc.embed(wav16k)
        fe, model = self._enc
        inputs = fe(np.asarray(wav16k, dtype=np.float32), sampling_rate=SPK_SR, return_tensors="pt")
        with torch.inference_mode():
            emb = model(**{k: v.to(self.config.device) for k, v in inputs.items()}).embeddings
        return emb[0].float().cpu().numpy().astype(np.float64)

    def _prompt_embedding(self, wav16k: np.ndarray) -> np.ndarray | None:
        key = hashlib.sha1(np.ascontiguousarray(wav16k).tobytes()).hexdigest()
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.embed(wav16k)
        return self._prompt_cache[key]

    def similarity(self, a16k: np.ndarray, b16k: np.ndarray) -> float | None:
        ea, eb = self.embed(a16k), self.embed(b16k)
        return None if ea is None or eb is None else cosine(ea, eb)

    def score(self, utt: Utterance) -> dict[str, float]:
        prompt = utt.prompt_at(SPK_SR)
        if prompt is None:
            return {}
        ep = self._prompt_embedding(prompt)
        eo = self.embed(utt.audio_at(SPK_SR))
        if ep is None or eo is None:
            return {}
        return {"speaker_sim": cosine(eo, ep)}
