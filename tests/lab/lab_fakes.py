"""Small stand-ins for the engine and eval suite, so the runner's own logic (pairing, resume,
locking, failure marking, sharding) is tested in milliseconds. The real pipeline is tested
with the built-in tiny model in test_lab_pipeline.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from cbx.compress.registry import register_transform
from cbx.lab.runner import Backend, BatchOutput, EvalItemView, UttOutput
from cbx.lab.schema import to_plain

SR = 8000


@dataclass(frozen=True)
class LabGainConfig:
    """Test transform: scales the fake model's output (gain 0 makes it silent)."""

    gain: float = 0.5
    nan: bool = False

    def __post_init__(self):
        if self.gain < 0:
            raise ValueError(f"gain must be >= 0, got {self.gain}")


@register_transform("lab_test_gain", LabGainConfig)
def _gain(model, cfg):
    model.gain *= cfg.gain
    model.nan = model.nan or cfg.nan
    return model




class _FakeWorkMemory:
    kind = "fake"
    work_bytes = 2000

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeModel(torch.nn.Module):
    variant = "original"
    meta = {"random_weights": True}  # as the built-in tiny model: the leaderboard says so

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(256))
        self.gain = 1.0
        self.nan = False


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")


class FakeBackend(Backend):
    def __init__(self, n_items=4, fail_after=None, prompts=None, bad_outputs=()):
        self.n_items = n_items
        self.prompts = dict(prompts or {})  # item index -> prompt path ("silent" in it: refused)
        # item id -> "compressed" | "baseline": that run's output for it is silent
        self.bad_outputs = dict(bad_outputs) if isinstance(bad_outputs, dict) else {i: "compressed" for i in bad_outputs}
        self.synthesized: list[str] = []
        self.fail_after = fail_after  # raise after this many utterances (simulated crash)
        self.scored: list[list[dict]] = []

    def device(self, requested):
        return "cpu"

    def hardware(self, device):
        return {"cpu": "fake cpu", "torch_threads": 1, "device": "cpu", "torch": "x"}

    def load_model(self, source, device):
        return FakeModel()

    def save_checkpoint(self, model, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "manifest.json").write_text(json.dumps({"gain": model.gain}))

    def check_prompt(self, model, prompt):
        return "audio is silent (fake)" if "silent" in str(prompt) else None

    def decode_tokens(self, model, item, speech_tokens, settings):
        """A deterministic 'decoder': the tokens and the item set the waveform, the model's gain scales it."""
        t = np.repeat(np.asarray(speech_tokens, np.float32), 80)
        wav = 0.2 * np.sin(t * 0.01 + np.arange(t.size) * 0.03 * (1 + _h(item.id) % 5)) * getattr(model, "gain", 1.0)
        return wav.astype(np.float32), SR
    def work_memory(self, device):
        return _FakeWorkMemory()

    def reset_caches(self, model):
        self.resets = getattr(self, "resets", 0) + 1

    def first_audio(self, model, item, settings):
        """A deterministic 'time to first audio': the first item's id and the model's gain set it."""
        self.first_audio_items = getattr(self, "first_audio_items", []) + [item.id]
        return 0.25 * getattr(model, "gain", 1.0)

    def eval_set(self, name):
        items = [EvalItemView(f"utt{i}", f"sentence number {i}", self.prompts.get(i)) for i in range(self.n_items)]
        return "fake", "1", items

    def resolved_settings(self, model, settings):
        return to_plain(settings)

    def synthesize(self, model, items, settings):
        outs = []
        for it in items:
            if self.fail_after is not None and len(self.synthesized) >= self.fail_after:
                raise RuntimeError("simulated crash")
            rng = np.random.default_rng(_h(it.id) + settings.seed)
            n = SR // 4 + _h(it.id) % 500
            gain = getattr(model, "gain", 1.0)
            wav = (0.3 * np.sin(np.arange(n) * 0.05 * (1 + _h(it.id) % 7)) + 0.01 * rng.standard_normal(n)) * gain
            wav = wav.astype(np.float32)
            if getattr(model, "nan", False):
                wav[10] = np.nan
            if self.bad_outputs.get(it.id) == ("compressed" if gain != 1.0 else "baseline"):
                wav[:] = 0.0
            self.synthesized.append(it.id)
            tokens = [int(t) for t in rng.integers(0, 100, size=5)]
            outs.append(UttOutput(it.id, wav, SR, tokens, n / SR, {"t3": 0.01, "total": 0.02 / max(gain, 0.1)}))
        return BatchOutput(outs, peak_mem_bytes=3000, timings={}, mem_start_bytes=1000, mem_kind="fake")

    def suite_version(self):
        return "fake"

    def metric_versions(self, metrics, config=None):
        return {"wer": "fake", "speaker_sim": "fake"}

    def score(self, manifest, out_dir, metrics, eval_set, progress, config=None):
        """Writes the eval suite's result schema (rows with a metrics dict; aggregate entries)."""
        manifest = Path(manifest)
        lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
        self.scored.append(lines)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, m in enumerate(lines, 1):
            wav, _ = sf.read(manifest.parent / m["audio"], dtype="float32")
            met = {"wer": float(np.abs(wav).mean()), "speaker_sim": float(np.tanh(10 * np.abs(wav).mean()))}
            det = {}
            if m.get("reference_audio"):
                ref, _ = sf.read(manifest.parent / m["reference_audio"], dtype="float32")
                test = sf.read(manifest.parent / m["fidelity_audio"], dtype="float32")[0] if m.get("fidelity_audio") else wav
                met["wave_max_abs_err"] = float(np.abs(test - ref).max())
                det["ref_corr"] = float(np.dot(test, ref) / (np.linalg.norm(test) * np.linalg.norm(ref)))
            if "t3_top1_agreement" in m:
                met["t3_top1_agreement"] = m["t3_top1_agreement"]
            rows.append({"line": n, "id": m["id"], "metrics": met, "details": det})
        with open(out_dir / "utterances.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        keys = sorted({k for r in rows for k in r["metrics"]})
        agg = {"suite_version": "fake", "metrics": {k: {"value": float(np.mean([r["metrics"][k] for r in rows if k in r["metrics"]]))} for k in keys}}
        (out_dir / "aggregate.json").write_text(json.dumps(agg))
        return agg

    def t3_logits(self, model, item, speech_tokens, settings):
        g = torch.Generator().manual_seed(_h(item.id))
        base = torch.randn(len(speech_tokens), 16, generator=g)
        return base + (1.0 - model.gain) * torch.randn(len(speech_tokens), 16, generator=g)

    def t3_fidelity(self, base_logits, logits):
        agree = (base_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
        return {"t3_top1_agreement": agree}


class RealModelBackend(FakeBackend):
    """The real engine model, transforms and checkpoint; fake synthesis and scores."""

    load_model = Backend.load_model
    apply_transforms = Backend.apply_transforms
    save_checkpoint = Backend.save_checkpoint
    model_bytes = Backend.model_bytes
