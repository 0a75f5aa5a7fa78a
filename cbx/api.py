"""The workbench from Python: the handful of calls a notebook needs.

``import cbx`` exposes these names lazily (nothing heavy is imported until one is called), in the
manner of torchao's ``quantize_(model, config)``: a model is loaded from any source, transformed
by registered names with their parameters, synthesized, scored and ranked with the same code the
CLI runs, so a notebook's numbers are the CLI's numbers.

    import cbx
    model = cbx.load_model("tiny")                        # or "ResembleAI/chatterbox", a folder, an export
    model = cbx.transform(model, "int4_weight_only", group_size=32)
    out = cbx.synthesize(model, ["Hello there."], voice=None, temperature=0.0)
    cbx.write_wav("hello.wav", out.results[0].wav, out.results[0].sample_rate)
    outcomes = cbx.run("experiments/demo.yaml", results="runs")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def load_model(source: str | Path = "tiny", device: Any = "cpu", dtype: Any = None, variant: str | None = None):
    """Any model source: ``tiny*``, ``random:*``, a Hub id, an upstream-layout folder, a compressed
    checkpoint or an export (hashes verified). See ``cbx list models``."""
    from cbx.compress.source import load_source

    return load_source(source, device=device, dtype=dtype, variant=variant)


def transform(model, name: str, **params):
    """Apply one registered transform (``cbx list transforms``) with its parameters; returns the
    model. Unknown parameters are refused with the valid ones, as in an experiment file. (Not
    ``cbx.compress``: that name is the ``cbx.compress`` package.)"""
    from cbx.compress.registry import apply_transforms, build_config

    return apply_transforms(model, [(name, build_config(name, params, where=name))])


def synthesize(model, texts: str | Sequence[str], voice=None, progress: bool = False, **settings):
    """Synthesize ``texts`` (one string or several) in ``voice`` (an audio file, ``(wav, sr)`` or
    None for the model's built-in voice); ``settings`` are :class:`cbx.engine.synth.SynthSettings`
    fields (``temperature``, ``seed``, ``dtype``, ``cfm_steps`` ...). Returns the engine's
    ``SynthBatch`` (``.results[i].wav`` at 24 kHz, ``.timings``)."""
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer

    texts = [texts] if isinstance(texts, str) else list(texts)
    reqs = [SynthRequest(text=t, voice=voice) for t in texts]
    return Synthesizer(model).synthesize(reqs, SynthSettings(**settings), progress=progress)


def score(manifest: str | Path, out_dir: str | Path, metrics: Sequence[str] | None = None, **kw) -> dict:
    """Score a manifest of audio files (see ``cbx score``); returns the aggregate."""
    from cbx.eval.scorer import score_manifest

    return score_manifest(manifest, out_dir, metrics=list(metrics) if metrics else None, **kw)


def run(experiment: str | Path, results: str | Path = "runs", overrides: Sequence[tuple[str, Any]] = (), **kw) -> list:
    """Run (or reuse) every experiment of a YAML file and its baseline, as ``cbx run`` does;
    returns one ``RunOutcome`` per experiment."""
    from cbx.lab.runner import run_experiment
    from cbx.lab.schema import load_experiments

    return [run_experiment(exp, results, **kw) for exp in load_experiments(experiment, overrides)]


def leaderboard(results: str | Path = "runs", sort: str | None = None) -> list:
    """The leaderboard rows of a results folder (``cbx leaderboard`` renders the same rows)."""
    from cbx.lab.leaderboard import leaderboard as _rows

    return _rows(results, sort) if sort else _rows(results)


def write_wav(path: str | Path, wav, sr: int) -> Path:
    """Write float audio as a wav file (written beside the target, then renamed)."""
    from cbx.files import atomic_write_audio

    atomic_write_audio(Path(path), wav, sr)
    return Path(path)


__all__ = ["load_model", "transform", "synthesize", "score", "run", "leaderboard", "write_wav"]
