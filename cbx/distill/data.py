"""Teacher data: what the 10-step CFG teacher makes from given inputs and noise, stored on disk.

For each example (speech tokens in a voice) we record the CFM decoder's inputs (encoder output
``mu``, speaker embedding ``spks``, prompt condition ``cond``, prompt and total lengths), the
noise, the teacher's endpoint and, when asked, its intermediate Euler states (the average-
velocity objective reads its targets from them). Training then never runs the teacher or the
encoder: it reads these rows.

Storage: shards saved with ``datasets`` (Arrow files, ``Dataset.save_to_disk``) under
``<dir>/<split>/shard-NNNNN``, mel-like tensors as ``(T, 80)`` arrays with a dynamic first
axis; :func:`load_split` (or plain ``datasets.load_from_disk`` on a shard) reads them back.
Each shard is written to a temporary folder and renamed, so an interrupted recording leaves
only whole shards and a rerun skips them (resume). ``manifest.json`` records a fingerprint of
the data settings and of the teacher's weights; a rerun against a different teacher or
settings is refused instead of mixing two teachers' data.

Every example is a pure function of (settings, index): token lengths and ids come from a numpy
generator seeded with ``(seed, index)``, the noise from a torch generator seeded likewise, so a
resumed recording writes exactly what an uninterrupted one would, whatever the batching.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cbx.distill.config import DistillConfig
from cbx.distill.flow import CFMBatch, teacher_solve, teacher_times
from cbx.distill.objectives import TrainBatch
from cbx.errors import CbxError
from cbx.files import atomic_write_text

FORMAT = "cbx-distill-data"
VERSION = 1
MEL = 80
SPLITS = ("train", "heldout")
SPEECH_VOCAB = 6561  # upstream S3 tokenizer vocabulary (tokens >= this are special)


# --------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(model) -> str:
    """Hash of the S3Gen weights that shape the recorded data (the vocoder excluded)."""
    h = hashlib.sha256()
    for k, v in sorted(model.s3gen.state_dict().items()):
        if k.startswith("mel2wav."):
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(cfg: DistillConfig, teacher_fp: str) -> str:
    d = cfg.resolved()
    data = dict(d["data"])
    data.pop("dir")
    data.pop("batch_size")  # recording batch size does not change any example
    data.pop("shard_size")  # nor does how examples are grouped into files
    payload = {"data": data, "teacher": d["teacher"], "teacher_weights": teacher_fp, "version": VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- voices and tokens


def synthetic_voice(sr: int = 24000, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A deterministic voice-like test signal: a gliding harmonic tone with syllable-rate
    amplitude modulation and a little noise (enough for the speaker encoder and tokenizer)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 10 * seed
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    wav = 0.25 * wav * env / np.max(np.abs(wav)) + 0.003 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def _voice_audio(voice: str, sr: int, seed: int) -> np.ndarray:
    from cbx.engine.audio import load_audio

    if voice == "synthetic":
        return synthetic_voice(sr, seed=seed)
    from cbx.eval import assets

    return load_audio(assets.voice_audio_path(voice, "data.voices", also="'synthetic', "), sr)


@torch.inference_mode()
def voice_conditions(model, voices: tuple[str, ...], prompt_seconds: float) -> list[dict]:
    """S3Gen's reference dict (prompt tokens, prompt mel, speaker embedding) per voice."""
    sr = 24000
    out = []
    for i, v in enumerate(voices):
        wav = _voice_audio(v, sr, seed=i)[: int(prompt_seconds * sr)]
        out.append(model.s3gen.embed_ref(torch.from_numpy(wav)[None], sr))
    return out


def _audio_token_source(model, n_clips: int) -> list[torch.Tensor]:
    """Speech tokens of real recorded speech (offline clips) through the model's tokenizer."""
    from cbx.engine.audio import load_audio
    from cbx.eval import assets

    toks = []
    with torch.inference_mode():
        for path, _text in assets.real_speech_clips(n_clips):
            wav = torch.from_numpy(load_audio(path, 16000))[None]
            t, n = model.s3gen.tokenizer(wav)
            toks.append(t[0, : int(n[0])].cpu())
    return toks


def example_plan(cfg: DistillConfig, index: int, audio_tokens: list[torch.Tensor] | None) -> tuple[torch.Tensor, int]:
    """(speech tokens, voice index) of example ``index``: a pure function of the settings."""
    d = cfg.data
    rng = np.random.default_rng([d.seed, index])
    n = int(rng.integers(d.min_tokens, d.max_tokens + 1))
    if audio_tokens is None:
        tokens = torch.from_numpy(rng.integers(0, SPEECH_VOCAB, n)).long()
    else:
        src = audio_tokens[index % len(audio_tokens)]
        start = int(rng.integers(0, max(1, src.numel() - n + 1)))
        tokens = src[start : start + n].long()
        if tokens.numel() == 0:
            tokens = torch.from_numpy(rng.integers(0, SPEECH_VOCAB, n)).long()
    return tokens, index % len(d.voices)


def noise_seed(cfg: DistillConfig, index: int) -> int:
    return (cfg.data.seed * 1_000_003 + index) % (2**63 - 1)


# --------------------------------------------------------------------------- recording


def _features(n_states: int):
    import datasets as hfd

    f = {
        "index": hfd.Value("int64"),
        "voice": hfd.Value("int32"),
        "prompt_len": hfd.Value("int32"),
        "length": hfd.Value("int32"),
        "tokens": hfd.Sequence(hfd.Value("int32")),
        "spks": hfd.Sequence(hfd.Value("float32"), length=MEL),
        "mu": hfd.Array2D(shape=(None, MEL), dtype="float32"),
        "cond": hfd.Array2D(shape=(None, MEL), dtype="float32"),
        "noise": hfd.Array2D(shape=(None, MEL), dtype="float32"),
        "target": hfd.Array2D(shape=(None, MEL), dtype="float32"),
    }
    if n_states:
        f["states"] = hfd.Array3D(shape=(None, n_states, MEL), dtype="float32")
    return hfd.Features(f)


@torch.inference_mode()
def _record_batch(model, cfg: DistillConfig, indices: list[int], conds: list[dict],
                  audio_tokens) -> list[dict[str, Any]]:
    from cbx.engine.s3gen_batch import cfm_inputs, cfm_noise

    plans = [example_plan(cfg, i, audio_tokens) for i in indices]
    inp = cfm_inputs(model, [p[0] for p in plans], [conds[p[1]] for p in plans])
    gens = [torch.Generator().manual_seed(noise_seed(cfg, i)) for i in indices]
    noise = cfm_noise(inp, gens, meanflow=False, dtype=inp.mu.dtype)
    lens = torch.tensor(inp.total_lens)
    b = CFMBatch(inp.mu, inp.mask, inp.spks, inp.cond, torch.tensor(inp.prompt_lens), lens)
    est = model.s3gen.flow.decoder.estimator
    states, _ = teacher_solve(est, b, noise, cfg.teacher.steps, cfg.teacher.cfg_rate, trajectory=True)
    rows = []
    for j, i in enumerate(indices):
        T = int(lens[j])
        row = {
            "index": i,
            "voice": plans[j][1],
            "prompt_len": int(inp.prompt_lens[j]),
            "length": T,
            "tokens": plans[j][0].int().tolist(),
            "spks": b.spks[j].float().cpu().numpy(),
            "mu": b.mu[j, :, :T].T.float().cpu().numpy(),
            "cond": b.cond[j, :, :T].T.float().cpu().numpy(),
            "noise": states[0, j, :, :T].T.float().cpu().numpy(),
            "target": states[-1, j, :, :T].T.float().cpu().numpy(),
        }
        if cfg.data.trajectory:
            row["states"] = states[1:-1, j, :, :T].permute(2, 0, 1).float().cpu().numpy()
        rows.append(row)
    return rows


def _split_ranges(cfg: DistillConfig) -> dict[str, range]:
    d = cfg.data
    return {"train": range(0, d.n_train), "heldout": range(d.n_train, d.n_train + d.n_heldout)}


def _shard_dirs(cfg: DistillConfig, root: Path) -> dict[str, list[tuple[Path, range]]]:
    out = {}
    for split, rng in _split_ranges(cfg).items():
        n = math.ceil(len(rng) / cfg.data.shard_size)
        out[split] = [
            (root / split / f"shard-{s:05d}",
             range(rng.start + s * cfg.data.shard_size, min(rng.stop, rng.start + (s + 1) * cfg.data.shard_size)))
            for s in range(n)
        ]
    return out


def _shard_complete(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _quiet_save(ds, path: Path) -> None:
    # datasets draws its own bar per save; ours already counts examples.
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if not was_off:
            enable_progress_bars()


def _write_manifest(cfg: DistillConfig, root: Path, fp: str) -> None:
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fp,
        "times": [float(t) for t in teacher_times(cfg.teacher.steps)],
        "trajectory": cfg.data.trajectory, "teacher": {"model": cfg.teacher.model, "steps": cfg.teacher.steps,
                                                       "cfg_rate": cfg.teacher.cfg_rate},
        "splits": {k: len(v) for k, v in _split_ranges(cfg).items()},
    }
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def record_teacher_data(cfg: DistillConfig, model, progress: bool = True, rank: int = 0, world: int = 1) -> Path:
    """Make sure ``cfg.data_dir`` holds every shard; record the missing ones. Returns the dir.

    With several processes (``rank`` of ``world``) each records every ``world``-th missing
    shard; only rank 0 writes the manifest. Callers wait for all ranks before reading.
    """
    import datasets as hfd
    from tqdm.auto import tqdm

    root = cfg.data_dir
    fp = data_fingerprint(cfg, teacher_fingerprint(model))
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CbxError(f"{manifest_path}: not valid JSON ({e})") from e
        if old.get("fingerprint") != fp:
            raise CbxError(
                f"{root}: holds teacher data made with other settings or another teacher "
                f"(fingerprint {old.get('fingerprint')} != {fp}); delete it or set data.dir elsewhere"
            )
    root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _write_manifest(cfg, root, fp)
    todo = [(split, p, r) for split, shards in _shard_dirs(cfg, root).items() for p, r in shards
            if not _shard_complete(p)][rank::world]
    if not todo:
        return root
    conds = voice_conditions(model, cfg.data.voices, cfg.data.prompt_seconds)
    audio_tokens = _audio_token_source(model, cfg.data.audio_clips) if cfg.data.tokens == "audio" else None
    n_states = cfg.teacher.steps - 1 if cfg.data.trajectory else 0
    features = _features(n_states)
    bar = tqdm(total=sum(len(r) for _, _, r in todo), desc="teacher data", unit="ex",
               disable=not progress, file=sys.stderr)
    for split, path, rng in todo:
        rows: list[dict] = []
        idx = list(rng)
        for s in range(0, len(idx), cfg.data.batch_size):
            rows += _record_batch(model, cfg, idx[s : s + cfg.data.batch_size], conds, audio_tokens)
            bar.update(len(idx[s : s + cfg.data.batch_size]))
        cols = {k: [r[k] for r in rows] for k in features}
        ds = hfd.Dataset.from_dict(cols, features=features)
        part = path.with_name(path.name + ".partial")
        if part.exists():
            shutil.rmtree(part)
        _quiet_save(ds, part)
        os.replace(part, path)
    bar.close()
    return root


# --------------------------------------------------------------------------- reading


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise CbxError(f"{root}: no teacher data here (manifest.json missing)")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CbxError(f"{path}: not {FORMAT} version {VERSION}")
    return m


def load_split(root: str | Path, split: str):
    """One split as a ``datasets.Dataset`` in torch format (shards concatenated in order)."""
    import datasets as hfd

    root = Path(root)
    shards = sorted(p for p in (root / split).glob("shard-*") if _shard_complete(p))
    if not shards:
        raise CbxError(f"{root}/{split}: no complete shards")
    ds = hfd.concatenate_datasets([hfd.load_from_disk(str(p)) for p in shards])
    return ds.with_format("torch")


class TeacherExamples:
    """Random access to one split's rows, collated into padded :class:`TrainBatch` es."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.ds = load_split(self.root, split)
        self.times = torch.tensor(self.manifest["times"], dtype=torch.float32)
        self.has_states = "states" in self.ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, indices: list[int], device=None, with_states: bool = True) -> TrainBatch:
        rows = self.ds[list(indices)]
        B = len(indices)
        lens = torch.as_tensor(rows["length"]).long()
        T = int(lens.max())

        def pad(key):
            out = torch.zeros(B, MEL, T)
            for j, a in enumerate(rows[key]):
                out[j, :, : a.shape[0]] = a.T
            return out

        mask = (torch.arange(T)[None] < lens[:, None]).float()[:, None, :]
        spks = rows["spks"] if torch.is_tensor(rows["spks"]) else torch.stack(list(rows["spks"]))
        inputs = CFMBatch(pad("mu"), mask, spks.float(), pad("cond"),
                          torch.as_tensor(rows["prompt_len"]).long(), lens)
        noise, target = pad("noise"), pad("target")
        states = None
        if with_states and self.has_states:
            K1 = self.times.numel()
            states = torch.zeros(K1, B, MEL, T)
            states[0], states[-1] = noise, target
            for j, a in enumerate(rows["states"]):  # (T_j, K-1, 80)
                states[1:-1, j, :, : a.shape[0]] = a.permute(1, 2, 0)
        tb = TrainBatch(inputs, noise, target, states, self.times.clone())
        if device is not None:
            tb = TrainBatch(inputs.to(device), noise.to(device), target.to(device),
                            None if states is None else states.to(device), tb.times.to(device))
        return tb

    def batches(self, batch_size: int, device=None, with_states: bool = False) -> Iterator[TrainBatch]:
        for s in range(0, len(self), batch_size):
            yield self.batch(list(range(s, min(len(self), s + batch_size))), device, with_states)
