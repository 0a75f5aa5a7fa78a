"""Run one experiment: load, compress, synthesize the eval set, score, write a run folder.

The order of work, and why:

1. The baseline first. A compressed experiment is only meaningful next to the same model,
   eval set, engine settings, seed and hardware without compression (llm-compressor's habit
   of always evaluating the base model beside the compressed one). Its run id is a hash of
   exactly those, so an existing finished baseline is reused and a missing one is run.
2. Synthesis one utterance row at a time into ``synth/<id>.json`` + ``audio/<id>.wav`` (wav
   first, row last, both renamed into place): an interrupted run resumes by skipping the ids
   that have a row, and a half-written file is never read as finished.
3. Outputs with NaN or silence mark the run ``failed`` with the reason; it is listed but not
   ranked, and its scores are not computed (a metric on NaN audio is noise, not a number).
4. Scoring through the eval suite's manifest interface, with the baseline's wav beside each
   utterance (``reference_audio``) so the scorer adds waveform/mel fidelity; T3 fidelity
   (teacher-forced top-1 agreement and KL on the baseline's speech tokens) is computed here
   because it needs both models, one after the other so that only one is in memory.
5. ``run.json`` last: its ``status`` says whether the folder is a finished row.

The engine and the eval suite are reached through :class:`Backend`, so tests can run the
runner's logic (resume, locking, pairing, failure marking, sharding) with small fakes and the
real pipeline with the built-in tiny model.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cbx.errors import CbxError
from cbx.lab import store
from cbx.lab.schema import Experiment, to_plain
from cbx.lab.shard import Shard, single_process
from cbx.lab.store import ResultsDir, atomic_write_json

# An output is "silent" below this peak amplitude (random-weight models still make noise
# far above it; a broken pipeline gives exact zeros).
SILENCE_PEAK = 1e-4
PACKAGES = (
    "chatterbox-workbench", "chatterbox-tts", "torch", "transformers", "diffusers", "numpy",
    "s3tokenizer", "resemble-perth", "safetensors", "accelerate", "wandb",
)


@dataclass
class EvalItemView:
    id: str
    text: str
    prompt: str | None
    prompt_text: str | None = None


@dataclass
class UttOutput:
    id: str
    wav: np.ndarray
    sr: int
    speech_tokens: list[int]
    audio_s: float
    timings: dict[str, float]
    n_chunks: int = 1


@dataclass
class BatchOutput:
    utterances: list[UttOutput]
    peak_mem_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    mem_start_bytes: int = 0  # in use when the batch started (weights, other models in the process)
    mem_kind: str = ""


class Backend:
    """The engine and eval suite as the runner uses them (the real ones; tests override)."""

    _threads: int | None = None

    def keep_threads(self) -> None:
        """Torch's thread count as it was at the first call. Scoring libraries change it
        (seen here: a run after the eval suite had run got 1 thread instead of 2), which
        would change speed, numerics and the hardware fingerprint of every later run."""
        import torch

        if Backend._threads is None:
            Backend._threads = torch.get_num_threads()
        elif torch.get_num_threads() != Backend._threads:
            torch.set_num_threads(Backend._threads)

    def device(self, requested: str) -> str:
        import torch

        if requested == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CbxError(f"device: {requested!r} asked for but CUDA is not available")
        return requested

    def model_source_kind(self, source: str) -> str:
        """``builtin`` | ``folder`` | ``hub`` (cached) | ``hub-download``, checked without
        loading; :class:`CbxError` for a source that cannot load (offline and not cached too)."""
        from cbx.compress.source import source_kind
        from cbx.engine.identity import hub_cached

        kind = source_kind(source)
        if kind == "hub" and not hub_cached(source):
            if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                raise CbxError(f"'{source}': not in the local Hub cache and HF_HUB_OFFLINE is set")
            return "hub-download"
        return kind

    def hardware(self, device: str) -> dict[str, Any]:
        from cbx.engine.timing import machine_description

        return dict(machine_description(device))

    def load_model(self, source: str, device: str):
        from cbx.compress.source import load_source

        return load_source(source, device=device)

    def apply_transforms(self, model, steps: list[tuple[str, Any]]):
        from cbx.compress.registry import apply_transforms

        return apply_transforms(model, steps)

    def save_checkpoint(self, model, out_dir: Path) -> None:
        from cbx.compress.checkpoint import save_compressed

        save_compressed(model, out_dir)

    def model_bytes(self, model) -> int:
        from cbx.compress.size import weight_bytes

        return weight_bytes(model)

    def eval_set(self, name: str) -> tuple[str, str, list[EvalItemView]]:
        from cbx.eval.sets import get_eval_set

        es = get_eval_set(name)
        items = [EvalItemView(it.id, it.text, str(it.prompt_path) if it.prompt_path else None, getattr(it, "prompt_text", None)) for it in es.items]
        return es.name, str(es.version), items

    def resolved_settings(self, model, settings) -> dict[str, Any]:
        return to_plain(settings.resolved(model))

    def check_prompt(self, model, prompt: str) -> str | None:
        """Why the engine refuses this voice prompt for this model (the CbxError's message:
        silent, unreadable, too short for the variant), or None when it takes it."""
        from cbx.engine.conditioning import prepare_voice

        try:
            prepare_voice(model, prompt)
        except CbxError as e:
            return str(e)
        return None

    def decode_tokens(self, model, item: EvalItemView, speech_tokens: list[int], settings) -> tuple[np.ndarray, int]:
        """The model's S3Gen on given speech tokens, seeded as the engine seeds the item."""
        from cbx.engine.synth import SAMPLE_RATE

        return self._synthesizer(model, settings).decode_tokens(item.prompt, speech_tokens, settings), SAMPLE_RATE

    def work_memory(self, device: str):
        """Context measuring the peak tensor memory of the code inside (``.work_bytes``, ``.kind``)."""
        from cbx.engine.timing import WorkMemory

        return WorkMemory(device)

    def conditioning_cache(self) -> str | None:
        """The voice-conditioning disk cache folder in use (``cbx.engine.cond_cache``), None if off."""
        from cbx.engine.cond_cache import default_dir

        folder = default_dir()
        return str(folder) if folder is not None else None

    def reset_caches(self, model) -> None:
        from cbx.engine.conditioning import clear_cache

        clear_cache(model)
        syn = getattr(self, "_synth", None)
        if syn is not None and syn.model is model:
            syn.clear_voices()  # the run's Synthesizer keeps voices too: conditioning is timed again

    def synthesize(self, model, items: Sequence[EvalItemView], settings) -> BatchOutput:
        from cbx.engine.synth import SynthRequest, Synthesizer

        reqs = [SynthRequest(text=it.text, voice=it.prompt, id=it.id) for it in items]
        # One Synthesizer per model and run: its cast copies (bf16 T3 and estimator) are built
        # once, by prepare(), outside every timed stage (it was one per batch, and the estimator's
        # copy was made inside the timed cfm stage).
        batch = self._synthesizer(model, settings).synthesize(reqs, settings)
        outs = [
            UttOutput(it.id, np.asarray(r.wav, np.float32), int(r.sample_rate), [int(t) for t in np.asarray(r.speech_tokens).reshape(-1)],
                      float(r.audio_s), dict(r.timings), len(r.chunks))
            for it, r in zip(items, batch.results)
        ]
        return BatchOutput(outs, int(batch.peak_mem_bytes), dict(batch.timings),
                           int(batch.run.extra.get("mem_start_bytes", 0)), str(batch.run.mem_kind))

    def first_audio(self, model, item: EvalItemView, settings) -> float | None:
        """Seconds from a streamed synthesis call (``Synthesizer.stream``) to its first audio,
        for one item with its voice already conditioned (what a user waits for per sentence)."""
        from cbx.engine.conditioning import prepare_voice
        from cbx.engine.synth import SynthRequest

        syn = self._synthesizer(model, settings)
        if item.prompt is not None:
            prepare_voice(model, item.prompt)
        for piece in syn.stream([SynthRequest(text=item.text, voice=item.prompt, id=item.id)], settings):
            if piece.wav.size:
                return float(piece.t)
        return None

    def _synthesizer(self, model, settings):
        from cbx.engine.synth import Synthesizer

        syn = getattr(self, "_synth", None)
        if syn is None or syn.model is not model:
            syn = self._synth = Synthesizer(model)
            syn.prepare(settings)
        return syn

    def release(self, model) -> None:
        """Drop what this backend holds for ``model`` (its Synthesizer and cast copies)."""
        if getattr(getattr(self, "_synth", None), "model", None) is model:
            self._synth = None

    def kernel_summary(self, model) -> dict[str, Any]:
        """Which kernel path the quantized modules took (``cbx.compress.kernels``)."""
        from cbx.compress.kernels import kernel_summary

        syn = getattr(self, "_synth", None)
        copies = syn.cast_copies() if syn is not None and syn.model is model else ()
        return kernel_summary(model, copies)

    def metric_versions(self, metrics: Sequence[str] | None, config=None) -> dict[str, str]:
        """Versions with the scorer's model choices in them (``cbx.eval.scorer.metric_versions``)."""
        from cbx.eval.scorer import metric_versions

        return metric_versions(list(metrics) if metrics is not None else None, config)

    def suite_version(self) -> str:
        from cbx.eval.schema import SUITE_VERSION

        return str(SUITE_VERSION)

    def score(self, manifest: Path, out_dir: Path, metrics: Sequence[str] | None, eval_set: dict, progress: bool, config=None) -> dict:
        from cbx.eval.scorer import score_manifest

        return score_manifest(manifest, out_dir, list(metrics) if metrics is not None else None, config=config,
                              eval_set=eval_set, progress=progress)

    def merge_scores(self, parts: Sequence[Path], out_dir: Path, order: Sequence[str], metrics: Sequence[str] | None, config=None) -> dict:
        from cbx.lab.shard import merge_scores

        return merge_scores(parts, out_dir, order, metrics, config)

    def t3_logits(self, model, item: EvalItemView, speech_tokens: list[int], settings):
        import torch

        from cbx.engine.conditioning import prepare_voice
        from cbx.engine.t3_decode import DecodeSettings, teacher_forced_logits

        s = settings.resolved(model)
        conds = prepare_voice(model, item.prompt, exaggeration=s.exaggeration) if item.prompt else model.builtin_conds
        # The same sampling-side processing the engine decodes with (engine.synth maps it so too).
        ds = DecodeSettings(temperature=s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k,
                            repetition_penalty=s.repetition_penalty, cfg_weight=s.cfg_weight,
                            exaggeration=s.exaggeration, max_new_tokens=s.max_speech_tokens)
        with torch.inference_mode():
            # Raw (CFG-combined, unfiltered) distributions: min_p/top_p filtering gives zero
            # probabilities, hence infinite KL for any change, and says more about the sampler
            # than about the model.
            return teacher_forced_logits(model, conds, item.text, speech_tokens, ds, language_id=s.language_id,
                                         processed=False).float().cpu()

    def t3_fidelity(self, base_logits, logits) -> dict[str, float]:
        from cbx.eval import fidelity

        return {
            "t3_top1_agreement": float(fidelity.top1_agreement(base_logits, logits)),
            "t3_kl": float(fidelity.mean_kl(base_logits, logits)),
        }


class BaselineFailed(CbxError):
    """A compressed experiment whose baseline run failed: nothing to compare it against."""


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    record: dict[str, Any]
    reused: bool


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_info() -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def hardware_id(hw: dict[str, Any]) -> str:
    # Versions are recorded but are not hardware: a torch upgrade does not split the board.
    return store.stable_hash({k: hw.get(k) for k in ("cpu", "gpu", "device", "torch_threads")}, 8)


def hardware_label(hw: dict[str, Any]) -> str:
    if hw.get("gpu"):
        return f"{hw['gpu']} ({hw.get('device')})"
    return f"{hw.get('cpu')}, {hw.get('torch_threads')} threads"


def failure_reason(exc: BaseException) -> str:
    """One line for a run record: what stopped the run."""
    import signal as _signal

    if isinstance(exc, KeyboardInterrupt):
        sig = getattr(exc, "signal", None)
        return f"interrupted ({_signal.Signals(sig).name})" if sig else "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return f"exited ({exc.code})"
    if isinstance(exc, OSError) and exc.errno is not None:
        from cbx.errors import os_error_message

        return os_error_message(exc)
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if not isinstance(exc, CbxError) else msg


def check_output(wav: np.ndarray, sr: int) -> str | None:
    """Why an output is unusable (``"output empty"`` / ``"output nan"`` / ``"output too short"`` /
    ``"output silent"``), or None when it is fine. Too short is the engine's own bound (the
    shortest clip its watermark takes), so an output the engine left unmarked never counts."""
    from cbx.engine.watermark import MIN_WATERMARK_S

    if wav.size == 0:
        return "output empty: no samples"
    if not np.all(np.isfinite(wav)):
        return f"output nan: {int(np.sum(~np.isfinite(wav)))} non-finite samples"
    if wav.size < MIN_WATERMARK_S * sr:
        return f"output too short: {wav.size / sr:.3f} s < {MIN_WATERMARK_S} s"
    if float(np.max(np.abs(wav))) < SILENCE_PEAK:
        return f"output silent: peak {float(np.max(np.abs(wav))):.1e}"
    return None


class Runner:
    """Runs experiments into one results folder. ``shard`` splits the work across processes."""

    def __init__(
        self,
        results: str | Path = store.DEFAULT_RESULTS,
        backend: Backend | None = None,
        shard: Shard | None = None,
        progress: bool = True,
        tracker_factory: Callable[..., Any] | None = None,
    ):
        self.results = ResultsDir(results)
        self.backend = backend or Backend()
        self.shard = shard or single_process()
        self.progress = progress
        self.tracker_factory = tracker_factory

    # ------------------------------------------------------------------ identity

    def identify(self, exp: Experiment) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
        self.backend.keep_threads()
        device = self.backend.device(exp.device)
        hw = self.backend.hardware(device)
        resolved = exp.resolved()
        key = store.config_key(resolved, hardware_id(hw))
        return store.run_id_for(exp.name, key), key, resolved, hw, device

    # ------------------------------------------------------------------ entry

    def prepare(self, exp: Experiment) -> Experiment:
        """``exp`` with every ``train:`` step's checkpoint trained (on first use) and named."""
        from cbx.lab import recipes

        if recipes.is_prepared(exp):
            return exp
        todo = recipes.trainings(exp, self.results.root)
        device = self.backend.device(exp.device)
        for t in todo:
            recipes.ensure_trained(t, self.results, progress=self.progress, device=device, log=self._log,
                                   shard=self.shard)
        self.shard.wait()
        return recipes.with_checkpoints(exp, todo)

    def run(self, exp: Experiment, force: bool = False) -> RunOutcome:
        exp = self.prepare(exp)
        baseline = None
        if not exp.is_baseline and exp.baseline:
            baseline = self.run(exp.baseline_experiment())
            if baseline.record.get("status") != store.STATUS_DONE:
                raise BaselineFailed(
                    f"experiment {exp.name!r}: its baseline run {baseline.run_id} failed "
                    f"({baseline.record.get('failure')}); nothing to compare against"
                )
        run_id, key, resolved, hw, device = self.identify(exp)
        run_dir = self.results.run_dir(run_id)
        # Locked by what is measured (not by name): two names for one measurement never run twice.
        with self._lock(key):
            # Decided once (by the main process, under the lock) so every shard agrees.
            found = self._finished(run_id, key) if (self.shard.is_main and not force) else None
            found = self.shard.broadcast(found)
            if found is not None:
                d, prev = Path(found[0]), found[1]
                self._log(f"reusing {d.name} for {exp.name} ({prev['status']})")
                return RunOutcome(d.name, d, prev, True)
            prev = self.results.record(run_id) if self.shard.is_main else None
            if prev is not None and prev.get("status") in (store.STATUS_RUNNING, store.STATUS_FAILED):
                # Under the lock nobody else works on this run: "running" means its process
                # died without a word (SIGKILL, power); "failed" here means it can be resumed.
                what = ("left running by a process that is gone (stale)" if prev["status"] == store.STATUS_RUNNING
                        else f"failed: {prev.get('failure')}")
                self._log(f"resuming {run_id}: previous attempt {what}")
            try:
                record = self._execute(exp, run_id, run_dir, key, resolved, hw, device, baseline, force,
                                       previous=prev)
            except BaseException as e:
                self._mark_failed(run_dir, e)
                raise
        self._track(exp, run_dir, record)
        return RunOutcome(run_id, run_dir, record, False)

    def _mark_failed(self, run_dir: Path, exc: BaseException) -> None:
        """The record of a run that raised says so (status failed, the reason, resumable): on
        exceptions, Ctrl-C and SIGTERM. Best effort: on a full disk even this may not write;
        the next start then finds the record "running" and treats it as stale."""
        if not self.shard.is_main:
            return
        try:
            rec = self.results.record(run_dir.name)
        except CbxError:
            rec = None
        if rec is None or rec.get("status") != store.STATUS_RUNNING:
            return
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        rec.update(status=store.STATUS_FAILED, resumable=True, finished_at=_now(),
                   failure_kind="interrupted" if interrupted else "error",
                   failure=failure_reason(exc))
        try:
            atomic_write_json(run_dir / store.RUN_RECORD, rec)
        except OSError:
            pass

    def _finished(self, run_id: str, key: str) -> tuple[str, dict] | None:
        """A finished run of this experiment: its own folder, or one measuring the same thing
        under another name (a sweep's explicit baseline and the baseline a compressed run asks for).
        A run that failed by an exception or an interruption (``resumable``) is not finished: the
        next start resumes it; one whose outputs failed their checks is (rerunning repeats it)."""
        prev = self.results.record(run_id)
        if prev is not None and (prev.get("status") == store.STATUS_DONE
                                 or (prev.get("status") == store.STATUS_FAILED and not prev.get("resumable"))):
            return str(self.results.run_dir(run_id)), prev
        other = self.results.find_finished(key)
        return (str(other[0]), other[1]) if other else None

    def _lock(self, key: str):
        # Under a shard group only the main process takes the cross-process lock; its peers
        # are coordinated by barriers (they would otherwise wait on each other's lock).
        return self.shard.group_lock(self.results, key)

    # ------------------------------------------------------------------ work

    def _execute(self, exp, run_id, run_dir: Path, key, resolved, hw, device, baseline: RunOutcome | None, force,
                 previous: dict | None = None) -> dict:
        b = self.backend
        set_name, set_version, items = b.eval_set(exp.eval.set)
        if exp.eval.limit is not None:
            items = items[: exp.eval.limit]
        if not items:
            raise CbxError(f"eval.set {exp.eval.set!r}: no items to synthesize")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise CbxError(f"eval set {set_name!r}: duplicate item ids")
        record: dict[str, Any] = {
            "record_version": store.RECORD_VERSION,
            "run_id": run_id,
            "name": exp.name,
            "config_key": key,
            "config": resolved,
            "is_baseline": exp.is_baseline,
            "baseline_run": baseline.run_id if baseline else None,
            "seed": exp.seed,
            "git": git_info(),
            "packages": package_versions(),
            "hardware": hw,
            "hardware_id": hardware_id(hw),
            "hardware_label": hardware_label(hw),
            "eval_set": {"name": set_name, "version": set_version, "n_items": len(items)},
            "metric_versions": b.metric_versions(exp.eval.metrics, exp.eval.scorer_config()),
            "eval_suite_version": b.suite_version(),
            "status": store.STATUS_RUNNING,
            "started_at": _now(),
            "pid": os.getpid(),
            "host": platform.node(),
            "attempts": int((previous or {}).get("attempts", 1)) + 1 if previous else 1,
            "trained": _trained_provenance(exp, self.results.root),
            "command": " ".join(sys.argv),
        }
        if self.shard.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / store.RUN_RECORD, record)
        self.shard.wait()

        model = b.load_model(exp.model, device)
        steps = exp.transform_configs()
        record["model_variant"] = getattr(model, "variant", None)
        meta = getattr(model, "meta", None) or {}
        record["random_weights"] = bool(getattr(model, "is_tiny", False) or meta.get("random_weights") or meta.get("random_full_size"))
        if steps:
            model = b.apply_transforms(model, steps)
        settings = exp.synth_settings()
        record["synth_resolved"] = b.resolved_settings(model, settings)
        record["model_bytes"] = int(b.model_bytes(model))
        ckpt = run_dir / "checkpoint"
        if steps and self.shard.is_main and not (ckpt / "manifest.json").is_file():
            tmp = run_dir / ".checkpoint.tmp"
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            b.save_checkpoint(model, tmp)
            tmp.replace(ckpt)

        # ---- prompts the engine refuses (silent, unreadable, too short for the variant) are
        # per-utterance failures with their reason, found before any timed work
        refused = self._refused_prompts(model, items, run_dir)

        # ---- synthesis (resumable per utterance, sharded by item index)
        mine = self.shard.take(items)
        todo = [it for it in mine if it.id not in refused
                and (force or not (run_dir / "synth" / f"{_safe(it.id)}.json").is_file())]
        batch_size = int(record["synth_resolved"].get("batch_size") or 1)
        if todo and exp.eval.warmup:
            # First calls pay one-time costs (allocator, kernel selection for each new shape,
            # lazy init) that would otherwise land on whichever run comes first. The warm-up
            # repeats the first timed batch(es), so the shapes match; the output is discarded
            # and cached voice conditioning is dropped so that its cost is still measured.
            for start in range(0, min(len(todo), exp.eval.warmup * batch_size), batch_size):
                self.backend.synthesize(model, todo[start : start + batch_size], settings)
            self.backend.reset_caches(model)
            wm = self.backend.work_memory(device)
            if not wm.kind.startswith("cuda"):
                # CPU working memory: one more untimed pass of the first batch, after the
                # one-time costs, under the profiler's allocation events (cbx.engine.timing.
                # WorkMemory); on CUDA the timed batches' own max_memory_allocated is exact.
                with wm:
                    self.backend.synthesize(model, todo[:batch_size], settings)
                if self.shard.is_main:
                    atomic_write_json(run_dir / "memory.json",
                                      {"work_bytes": int(wm.work_bytes), "kind": wm.kind, "batch_size": len(todo[:batch_size])})
        self.backend.reset_caches(model)  # the prompt check above conditioned every voice too
        self._synthesize(model, todo, settings, run_dir, batch_size, exp.name)
        self.shard.wait()

        rows = [self._read_row(run_dir, it.id) for it in items]
        failed = {r["id"]: r["check"] for r in rows if r.get("check")}
        # Utterances the baseline lost are left out here too, so both means cover the same ones.
        base_failed = set((baseline.record.get("failures") or {}).get("ids") or []) if baseline else set()
        excluded = sorted(base_failed - set(failed))
        keep = [it for it in items if it.id not in failed and it.id not in base_failed]
        record["failures"] = _failure_record(failed, len(items), exp.eval.max_failed, excluded)
        record["memory"] = _memory_record(run_dir, [r for r in rows if not r.get("check")] or rows, record["model_bytes"])

        # Extra timed passes (eval.timing_repeats) give the speed-up an interval.
        rtfs = self._timing_repeats(exp, model, [it for it in mine if it.id not in failed], settings, run_dir, batch_size)
        # Time to first audio of a streamed synthesis of the first good item (warm voice).
        first_audio = None
        streamable = [it for it in mine if it.id not in failed]
        if getattr(b, "first_audio", None) is not None and streamable and self.shard.is_main:
            first_audio = b.first_audio(model, streamable[0], settings)
        # What the quantized modules really ran (a fallback is also logged when it happens),
        # after every pass of this attempt (synthesis, timing repeats, first audio).
        record["kernels"] = _kernels_of_attempt(b.kernel_summary(model), previous)

        too_many = len(failed) > exp.eval.max_failed * len(items)
        # ---- fidelity needs this model now and the baseline model after it
        fid_rows: dict[str, dict[str, Any]] = {}
        if baseline is not None and keep and not too_many and (exp.eval.t3_fidelity or exp.eval.aligned_fidelity):
            fid_rows = self._fidelity(exp, model, device, settings, keep, baseline, run_dir)
        b.release(model)
        del model
        gc.collect()

        if too_many or not keep:
            record["status"] = store.STATUS_FAILED
            record["failure"] = _failure_message(failed, len(items), exp.eval.max_failed) if failed else \
                "no utterance left to score (every one failed in the baseline)"
        else:
            good_rows = [r for r in rows if r["id"] in {it.id for it in keep}]
            self._score(exp, run_dir, keep, good_rows, baseline, fid_rows, record["model_bytes"], {"name": set_name, "version": set_version},
                        record["memory"]["total_bytes"])
            if self.shard.is_main:
                record["aggregate"] = _read_aggregate(run_dir / "score")
                if baseline is not None:
                    record["paired"] = self._paired(exp, run_dir, baseline)
                record["status"] = store.STATUS_DONE

        ok_rows = [r for r in rows if not r.get("check")] or rows
        total_s = sum(float(r["timings"].get("total", 0.0)) for r in ok_rows)
        audio_s = sum(float(r["audio_s"]) for r in ok_rows)
        rtf = total_s / audio_s if audio_s > 0 else None
        record["speed"] = {
            "synth_s": total_s,
            "audio_s": audio_s,
            "rtf": rtf,
            # RTF of each timed pass over the set (the first is the one that made the audio)
            "rtf_repeats": ([rtf] if rtf is not None else []) + rtfs,
            "stage_s": _sum_stages(ok_rows),
            # The process's peak (CPU: whole-process RSS, earlier runs' and scorers' models
            # included): recorded for reference, never shown as the run's memory.
            "peak_mem_bytes": max(int(r.get("peak_mem_bytes", 0)) for r in ok_rows),
            "mem_kind": ok_rows[0].get("mem_kind", ""),
            # the run's own working memory (record["memory"])
            "work_mem_bytes": record["memory"]["work_bytes"],
            "work_mem_kind": record["memory"]["kind"],
            "speech_tokens": sum(len(r.get("speech_tokens", [])) for r in ok_rows),
            "first_audio_s": first_audio,
            # Where voice conditioning came from in the timed passes: the prompt check conditions
            # every voice first, so with a disk cache every run (baseline too) times a disk load.
            "conditioning_cache": b.conditioning_cache() if hasattr(b, "conditioning_cache") else None,
        }
        if baseline is not None:
            record["speed"]["speedup"] = sp = _speedup(baseline.record.get("speed") or {}, record["speed"])
            if sp is not None and "paired" in record:
                record["paired"]["speedup"] = {"value": sp["value"], "ci95": sp["ci95"], "within_noise": sp["within_noise"]}
        record["checkpoint_bytes"] = store.dir_size(ckpt) if ckpt.is_dir() else None
        record["samples"] = [r["audio"] for r in rows if not r.get("check")][: exp.eval.samples]
        record["finished_at"] = _now()
        if self.shard.is_main:
            atomic_write_json(run_dir / store.RUN_RECORD, record)
        record = self.shard.broadcast(record)  # the main process's view (status, aggregate) for all
        self._log(f"{run_id}: {record['status']}" + (f" ({record.get('failure')})" if record.get("failure") else "")
                  + (f"; {len(failed)} of {len(items)} utterance(s) failed" if failed and not record.get("failure") else ""))
        return record

    def _refused_prompts(self, model, items, run_dir: Path) -> dict[str, str]:
        """``{id: reason}`` for items whose voice prompt the engine refuses; each gets a synth
        row saying why (so a resumed run and the record agree). Every process checks every
        item (cheap, deterministic), so all shards agree without a message."""
        out: dict[str, str] = {}
        checked: dict[str, str | None] = {}
        for it in items:
            if not it.prompt:
                continue
            if it.prompt not in checked:
                checked[it.prompt] = self.backend.check_prompt(model, it.prompt)
            why = checked[it.prompt]
            if why is None:
                continue
            out[it.id] = f"prompt refused: {why}"
            if self.shard.is_main:
                atomic_write_json(run_dir / "synth" / f"{_safe(it.id)}.json", {
                    "id": it.id, "text": it.text, "prompt": it.prompt, "audio": None, "sr": None, "audio_s": 0.0,
                    "speech_tokens": [], "timings": {}, "peak_mem_bytes": 0, "mem_start_bytes": 0, "mem_kind": "",
                    "batch_size": 0, "n_chunks": 0, "check": out[it.id],
                })
        if out:
            self._log(f"{len(out)} prompt(s) refused, e.g. {next(iter(out.values()))}")
        self.shard.wait()
        return out

    def _timing_repeats(self, exp, model, mine, settings, run_dir: Path, batch_size: int) -> list[float]:
        """RTF of each extra timed pass over the set (eval.timing_repeats - 1 of them). Outputs
        are discarded; conditioning caches are dropped before each pass, as before the first.
        Stored per pass and process under ``timing/`` so a resumed run does not time again."""
        extra = exp.eval.timing_repeats - 1
        if extra <= 0:
            return []
        out = []
        for k in range(1, extra + 1):
            f = run_dir / "timing" / f"pass{k}-rank{self.shard.rank}.json"
            if not f.is_file():
                total = audio = 0.0
                self.backend.reset_caches(model)
                for start in range(0, len(mine), batch_size):
                    got = self.backend.synthesize(model, mine[start : start + batch_size], settings)
                    for u in got.utterances:
                        total += float(u.timings.get("total", 0.0))
                        audio += float(u.audio_s)
                atomic_write_json(f, {"total_s": total, "audio_s": audio})
            self.shard.wait()
            parts = [store.read_json(run_dir / "timing" / f"pass{k}-rank{r}.json") for r in range(self.shard.world)]
            total = sum(p["total_s"] for p in parts)
            audio = sum(p["audio_s"] for p in parts)
            if audio > 0:
                out.append(total / audio)
        return out

    def _paired(self, exp, run_dir: Path, baseline: RunOutcome) -> dict:
        """Per-utterance paired comparison with the baseline (``cbx.eval.paired``)."""
        from cbx.eval.paired import compare

        base = _read_rows(baseline.run_dir / "score")
        mine = _read_rows(run_dir / "score")
        out = compare(base, mine)
        # Leaderboard columns read record["paired"][column] = {"value", "ci95", "significant"}.
        m = out["metrics"]
        for col, name, kind in (("wer_delta", "wer", "delta"), ("sim_ratio", "speaker_sim", "ratio"), ("mos_delta", "mos", "delta")):
            if name in m and m[name].get(kind) is not None:
                ci = m[name].get(f"{kind}_ci95")
                null = 0.0 if kind == "delta" else 1.0
                out[col] = {"value": m[name][kind], "ci95": ci, "n": m[name]["n"],
                            "significant": (not (ci[0] <= null <= ci[1])) if ci else None}
        return out

    def _synthesize(self, model, todo, settings, run_dir: Path, batch_size: int, name: str) -> None:
        bar = None
        if self.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"{name} [{self.shard.rank}]" if self.shard.world > 1 else name, unit="utt", file=sys.stderr, leave=False)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            out = self.backend.synthesize(model, chunk, settings)
            if len(out.utterances) != len(chunk):
                raise RuntimeError(f"engine returned {len(out.utterances)} results for {len(chunk)} requests")
            for it, u in zip(chunk, out.utterances):
                wav = np.asarray(u.wav, np.float32).reshape(-1)
                rel = f"audio/{_safe(it.id)}.wav"
                check = check_output(wav, u.sr)
                # NaN cannot be stored faithfully as PCM; the wav is written with zeros there
                # and the row says why it is unusable.
                store.write_wav_atomic(run_dir / rel, np.nan_to_num(wav), u.sr)
                row = {
                    "id": it.id,
                    "text": it.text,
                    "prompt": it.prompt,
                    "audio": rel,
                    "sr": u.sr,
                    "audio_s": float(u.audio_s),
                    "speech_tokens": list(u.speech_tokens),
                    "timings": {k: float(v) for k, v in u.timings.items()},
                    "peak_mem_bytes": int(out.peak_mem_bytes),
                    "mem_start_bytes": int(out.mem_start_bytes),
                    "mem_kind": out.mem_kind,
                    "batch_size": len(chunk),
                    "n_chunks": int(u.n_chunks),
                    "check": check,
                }
                atomic_write_json(run_dir / "synth" / f"{_safe(it.id)}.json", row)
            if bar:
                bar.update(len(chunk))
        if bar:
            bar.close()

    def _read_row(self, run_dir: Path, uid: str) -> dict:
        p = run_dir / "synth" / f"{_safe(uid)}.json"
        try:
            return store.read_json(p)
        except FileNotFoundError:
            raise RuntimeError(f"{p}: missing after synthesis (a shard did not finish)") from None

    def _score(self, exp: Experiment, run_dir: Path, items, rows, baseline: RunOutcome | None, fid_rows, model_bytes, eval_set: dict,
               mem_bytes: int | None = None) -> None:
        # Fidelity inputs (T3 numbers, aligned decoder outputs) come from _fidelity per item;
        # an item without them (a long, multi-chunk text) simply has no fidelity metrics.
        # Paths relative to the manifest (the run folder), so results folders can move.
        manifest = []
        for it, r in zip(items, rows):
            line = {
                "id": it.id,
                "audio": r["audio"],
                "text": it.text,
                "prompt": str(Path(it.prompt).resolve()) if it.prompt else None,
                "timings": r["timings"],
                "speech_tokens": r["speech_tokens"],
                # counters and the runner's T3 fidelity, scored by the eval suite's groups
                # the run's own memory (weights + working memory), not the process's peak
                "peak_mem_bytes": mem_bytes if mem_bytes is not None else r.get("peak_mem_bytes"),
                "model_bytes": model_bytes,
                **fid_rows.get(it.id, {}),
            }
            if it.prompt_text is not None:
                line["prompt_text"] = it.prompt_text
            manifest.append({k: v for k, v in line.items() if v is not None})
        show = self.progress and self.shard.is_main
        if self.shard.world == 1:
            path = run_dir / "manifest.jsonl"
            store.atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in manifest))
            self.backend.score(path, run_dir / "score", exp.eval.metrics, eval_set, show, config=exp.eval.scorer_config())
            return
        # Each process scores its share; the main process merges the rows and aggregates once.
        path = run_dir / f"manifest-shard{self.shard.rank}.jsonl"
        store.atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in self.shard.take(manifest)))
        self.backend.score(path, run_dir / "score" / f"shard-{self.shard.rank}", exp.eval.metrics, eval_set, show,
                           config=exp.eval.scorer_config())
        self.shard.wait()
        if self.shard.is_main:
            store.atomic_write_text(run_dir / "manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
            self.backend.merge_scores([run_dir / "score" / f"shard-{r}" for r in range(self.shard.world)], run_dir / "score",
                                      [m["id"] for m in manifest], exp.eval.metrics, config=exp.eval.scorer_config())
        self.shard.wait()

    def _fidelity(self, exp, model, device, settings, items, baseline: RunOutcome, run_dir: Path) -> dict[str, dict[str, Any]]:
        """Per item: T3 teacher-forced top-1/KL on the baseline's tokens, and the aligned
        decoder outputs (this model's and the baseline's S3Gen on the baseline's tokens with
        the same CFM noise) written to ``aligned/`` and ``aligned_ref/``, whose paths the
        manifest gives the scorer (``fidelity_audio``, ``reference_audio``). This model first,
        then the baseline model, so only one is in memory at a time."""
        b = self.backend
        # Teacher forcing and token decoding take one text chunk's tokens: utterances the engine
        # split into several chunks (long texts) are left out rather than scored on a wrong pairing.
        base_rows = {it.id: self._read_row(baseline.run_dir, it.id) for it in self.shard.take(items)}
        mine = [it for it in self.shard.take(items) if base_rows[it.id].get("n_chunks", 1) == 1 and base_rows[it.id]["speech_tokens"]]
        t3, aligned = exp.eval.t3_fidelity, exp.eval.aligned_fidelity
        ours = {it.id: b.t3_logits(model, it, base_rows[it.id]["speech_tokens"], settings) for it in mine} if t3 else {}
        out: dict[str, dict[str, Any]] = {it.id: {} for it in mine}
        if aligned:
            for it in mine:
                wav, sr = b.decode_tokens(model, it, base_rows[it.id]["speech_tokens"], settings)
                store.write_wav_atomic(run_dir / "aligned" / f"{_safe(it.id)}.wav", np.nan_to_num(wav), sr)
        base_model = b.load_model(exp.model, device)
        try:
            for it in mine:
                if t3:
                    ref = b.t3_logits(base_model, it, base_rows[it.id]["speech_tokens"], settings)
                    out[it.id].update(b.t3_fidelity(ref, ours[it.id]))
                if aligned:
                    wav, sr = b.decode_tokens(base_model, it, base_rows[it.id]["speech_tokens"], settings)
                    store.write_wav_atomic(run_dir / "aligned_ref" / f"{_safe(it.id)}.wav", np.nan_to_num(wav), sr)
                    out[it.id]["fidelity_audio"] = f"aligned/{_safe(it.id)}.wav"
                    out[it.id]["reference_audio"] = f"aligned_ref/{_safe(it.id)}.wav"
        finally:
            b.release(base_model)
            del base_model
            gc.collect()
        return self.shard.gather_dict(out)

    # ------------------------------------------------------------------ tracking

    def _track(self, exp: Experiment, run_dir: Path, record: dict) -> None:
        if not self.shard.is_main or exp.tracking.backend == "none":
            return
        from cbx.lab.tracking import log_run

        log_run(exp.tracking, run_dir, record, self.results.root, factory=self.tracker_factory)

    def _log(self, msg: str) -> None:
        if self.shard.is_main and self.progress:
            print(f"cbx run: {msg}", file=sys.stderr)


def _trained_provenance(exp: Experiment, results: Path) -> dict[str, Any]:
    """Provenance of the checkpoints this run's steps trained on demand (empty for none)."""
    if not any(s.train is not None for s in exp.steps):
        return {}
    from cbx.lab.recipes import provenance

    return provenance(exp, results)


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)


def _sum_stages(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r["timings"].items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _memory_record(run_dir: Path, rows: list[dict], model_bytes: int) -> dict[str, Any]:
    """The run's memory: its weights plus the peak working memory of its own synthesis.

    On CPU from the profiled pass after the warm-up (``memory.json``; kept when a run resumes);
    on CUDA (and on CPU without a warm-up) the timed batches' peak over their start: exact on
    CUDA, dependent on what ran before in the process on CPU (the record's ``kind`` says so)."""
    try:
        m = store.read_json(run_dir / "memory.json")
        work, kind = int(m["work_bytes"]), str(m["kind"])
    except (FileNotFoundError, KeyError, ValueError):
        work = max(max(0, int(r.get("peak_mem_bytes", 0)) - int(r.get("mem_start_bytes", 0))) for r in rows)
        kind = rows[0].get("mem_kind", "")
        if not kind.startswith("cuda"):
            kind += "_delta (no warm-up batch: depends on what ran before in the process)"
    return {"weights_bytes": int(model_bytes), "work_bytes": work, "total_bytes": int(model_bytes) + work, "kind": kind}


def _kernels_of_attempt(summary: dict[str, Any], previous: dict | None) -> dict[str, Any]:
    """The kernel record of this attempt; when nothing quantized ran in it (a resumed run whose
    utterances were all done, no timing repeats, no first-audio pass), the previous attempt's
    record, marked as such, instead of counting every module ``not-run``."""
    from cbx.compress.kernels import NOT_RUN

    paths = summary.get("paths") or {}
    before = (previous or {}).get("kernels") or {}
    if paths and set(paths) == {NOT_RUN} and set(before.get("paths") or {}) - {NOT_RUN}:
        return {**before, "recorded_in": "previous attempt (this attempt ran no quantized module)"}
    return summary


def _failure_record(failed: dict[str, str], n_items: int, max_failed: float, excluded: list[str]) -> dict[str, Any]:
    """What ``run.json`` says about per-utterance failures: how many, why, which."""
    reasons: dict[str, int] = {}
    for why in failed.values():
        kind = why.split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "n": len(failed),
        "n_items": n_items,
        "share": len(failed) / n_items if n_items else 0.0,
        "max_failed": max_failed,
        "reasons": dict(sorted(reasons.items())),
        "ids": sorted(failed),
        "utterances": [{"id": i, "reason": failed[i]} for i in sorted(failed)],
        # left out because the baseline failed them (so both runs' means cover the same utterances)
        "excluded_for_baseline": excluded,
    }


def _failure_message(failed: dict[str, str], n_items: int, max_failed: float) -> str:
    kinds = sorted({w.split(":")[0] for w in failed.values()})
    return (f"{len(failed)} of {n_items} utterances failed (more than eval.max_failed {max_failed:g}): "
            f"{'/'.join(kinds)}: " + ", ".join(sorted(failed)[:5]))


def _speedup(base_speed: dict, speed: dict) -> dict[str, Any] | None:
    """Baseline RTF / RTF with an interval from the repeated timings of both runs (None with a
    single timing each); ``within_noise`` where the interval holds 1.0."""
    from cbx.eval import stats

    b, r = base_speed.get("rtf"), speed.get("rtf")
    if not b or not r:
        return None
    b_rep, r_rep = base_speed.get("rtf_repeats") or [b], speed.get("rtf_repeats") or [r]
    ci = stats.ratio_of_means_ci(b_rep, r_rep)
    # The value is the ratio of the mean RTFs over every timed pass, the statistic the interval is of.
    return {"value": float(np.mean(b_rep) / np.mean(r_rep)), "ci95": list(ci) if ci else None,
            "within_noise": (not stats.excludes(ci, 1.0)) if ci else None, "repeats": [len(b_rep), len(r_rep)]}


def _read_rows(score_dir: Path) -> list[dict]:
    p = score_dir / "utterances.jsonl"
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def _read_aggregate(score_dir: Path) -> dict[str, Any]:
    p = score_dir / "aggregate.json"
    try:
        agg = store.read_json(p)
    except FileNotFoundError:
        raise RuntimeError(f"{p}: the scorer wrote no aggregate") from None
    return agg


def run_experiment(exp: Experiment, results: str | Path = store.DEFAULT_RESULTS, **kw) -> RunOutcome:
    """Run (or reuse) one experiment and its baseline; see :class:`Runner`."""
    force = kw.pop("force", False)
    return Runner(results, **kw).run(exp, force=force)
