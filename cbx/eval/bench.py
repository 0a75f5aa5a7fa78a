"""``cbx bench scorer``: what scoring costs per utterance, per metric group and in total.

Builds utterances of about 5 s from real recorded speech (consecutive Allison prompts joined,
with their transcripts, each paired with a prompt of the offline set), then in one process:

1. times each metric group's ``score`` per utterance (wall and process CPU seconds), after a
   warm-up utterance, so model loading is not counted (models load once per process), under
   the scoring run's process settings (:mod:`cbx.eval.runtime`);
2. times the whole scorer end to end (``score_manifest``: reading, resampling, all groups in
   two lanes, bootstrap, writing), prints its real-time factor (wall seconds per second of
   audio) and the process memory before and after;
3. compares, as ratios to the default: the scorer without the runtime settings, ASR with beam 1
   instead of 5, and Resemblyzer on the process's thread count instead of one, to show where
   time goes.

CPU seconds are printed beside wall seconds and the load average is shown: on a shared machine
wall time measures the neighbours too. Goal: scorer RTF <= 0.1 on an idle 2-core machine
(0.5 s of wall time per 5-second utterance).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_RTF = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=8, help="utterances to time (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="approximate utterance length (default 5)")
    parser.add_argument("--no-compare", action="store_true", help="skip the settings comparison")


def _utterances(n: int, seconds: float, folder: Path) -> list[dict]:
    from cbx.eval import assets
    from cbx.eval.audio import read_audio, resample, write_wav

    voices = list(assets.VOICES)
    clips = assets.real_speech_clips(min(196, max(40, n * 6)))
    out, i = [], 0
    for k in range(n):
        parts, texts, total = [], [], 0.0
        while total < seconds * 0.95:
            p, t = clips[i % len(clips)]
            i += 1
            w, sr = read_audio(p)
            w = resample(w, sr, 24000)  # what the engine writes
            parts.append(w)
            texts.append(t)
            total += len(w) / 24000
        wav = np.concatenate(parts)[: int(seconds * 1.2 * 24000)]
        path = folder / f"u{k}.wav"
        write_wav(path, wav, 24000)
        prompt, _ = assets.voice_prompt(voices[k % len(voices)])
        out.append({"id": f"u{k}", "audio": str(path), "text": " ".join(texts), "prompt": str(prompt),
                    "timings": {"t3": 1.0, "total": 2.0}, "speech_tokens": 125})
    return out


def _time_group(group, utts) -> tuple[float, float]:
    group.score(utts[0])  # warm-up: first-call allocations, lazy imports
    wall = cpu = 0.0
    for u in utts:
        u._resampled.clear()  # each utterance pays its own resampling once, as in a real run
        t0, c0 = time.perf_counter(), time.process_time()
        group.score(u)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return wall / len(utts), cpu / len(utts)


def _time_e2e(manifest: Path, out: Path, groups: list[str], cfg, n: int) -> tuple[float, float]:
    from cbx.eval.scorer import score_manifest

    t0, c0 = time.perf_counter(), time.process_time()
    score_manifest(manifest, out, metrics=groups + ["cost"], config=cfg, log=lambda m: None)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run(args: argparse.Namespace) -> int:
    from cbx.eval.runtime import scoring_runtime
    from cbx.eval.scorer import Scorer, ScorerConfig, _utterance, ManifestEntry, _AudioCache, get_group

    groups = ["asr", "speaker", "mos", "artifacts"]
    with tempfile.TemporaryDirectory(prefix="cbx-bench-scorer-") as tmp:
        tmp = Path(tmp)
        lines = _utterances(args.n, args.seconds, tmp)
        manifest = tmp / "m.jsonl"
        manifest.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        cache = _AudioCache()
        utts = [_utterance(ManifestEntry(k + 1, x), tmp, cache) for k, x in enumerate(lines)]
        audio_s = float(np.mean([len(u.audio) / u.sr for u in utts]))
        cfg = ScorerConfig()
        scorer = Scorer(groups + ["cost"], cfg)
        t0 = time.perf_counter()
        scorer.load()
        load_s = time.perf_counter() - t0

        print(f"cbx bench scorer: {len(utts)} utterances of {audio_s:.2f} s (real speech, 24 kHz), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"model loading (once per process): {load_s:.2f} s")
        print(f"{'group':<10} {'wall s/utt':>10} {'cpu s/utt':>10} {'RTF':>7}")
        total_w = total_c = 0.0
        with scoring_runtime():  # the settings score_manifest runs under
            for g in groups:
                w, c = _time_group(scorer.groups[g], utts)
                total_w += w
                total_c += c
                print(f"{g:<10} {w:>10.3f} {c:>10.3f} {w / audio_s:>7.3f}")
        print(f"{'sum':<10} {total_w:>10.3f} {total_c:>10.3f} {total_w / audio_s:>7.3f}")

        rss0 = _rss_mb()
        e2e_w, e2e_c = _time_e2e(manifest, tmp / "out", groups, cfg, len(utts))
        rtf = e2e_w / audio_s
        verdict = "meets" if rtf <= GOAL_RTF else "misses"
        print(f"scorer end to end: {e2e_w:.3f} s wall ({e2e_c:.3f} s CPU) per utterance; "
              f"RTF {rtf:.3f} ({verdict} the {GOAL_RTF} goal; CPU RTF {e2e_c / audio_s:.3f}); "
              f"process memory {rss0:.0f} -> {_rss_mb():.0f} MB")

        if not args.no_compare:
            print("settings vs the default (ratio of wall s/utt; < 1 is faster):")
            from cbx.eval import scorer as scorer_mod

            scorer_mod.scoring_runtime = contextlib.nullcontext  # what the runtime settings buy
            try:
                w, c = _time_e2e(manifest, tmp / "out", groups, cfg, len(utts))
            finally:
                scorer_mod.scoring_runtime = scoring_runtime
            print(f"  {'end to end, no runtime settings':<28} {w:.3f} s ({w / e2e_w:.2f}x), cpu {c:.3f} s ({c / e2e_c:.2f}x)")
            with scoring_runtime():
                base_w, base_c = _time_group(scorer.groups["asr"], utts)
                for name, acfg in [("asr beam 1", dataclasses.replace(cfg.asr, beam_size=1))]:
                    w, c = _time_group(get_group("asr", acfg), utts)
                print(f"  {name:<28} {w:.3f} s ({w / base_w:.2f}x), cpu {c:.3f} s ({c / base_c:.2f}x)")
            import torch

            from cbx.eval.metrics import speaker as spk

            sg = scorer.groups["speaker"]
            b_w, b_c = _time_group(sg, utts)
            n_thr = torch.get_num_threads()
            orig = spk.torch_threads
            spk.torch_threads = lambda n: orig(n_thr)  # what the encoder costs without the one-thread guard
            try:
                sg._prompt_cache.clear()
                w, c = _time_group(sg, utts)
            finally:
                spk.torch_threads = orig
            print(f"  {'speaker with ' + str(n_thr) + ' torch threads':<28} {w:.3f} s ({w / b_w:.2f}x), cpu {c:.3f} s ({c / b_c:.2f}x)")
    sys.stdout.flush()
    return 0
