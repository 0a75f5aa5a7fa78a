"""``cbx score``: score a manifest of wavs with the eval suite and print the table.

Flags only choose among the scorer's settings; their defaults come from
:class:`cbx.eval.scorer.ScorerConfig` and the metric configs, never from here. Exit status 0
when anything was scored (skipped lines are listed on stderr and in ``aggregate.json``), 2 when
nothing could be (a bad manifest, unknown metric or no usable line).
"""

from __future__ import annotations

import argparse
import dataclasses

from cbx.eval.metrics import mos as _mos
from cbx.eval.metrics import speaker as _speaker
from cbx.eval.metrics.asr import NORMALIZERS, AsrConfig
from cbx.eval.metrics.mos import MosConfig
from cbx.eval.metrics.speaker import SpeakerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a, s, m = AsrConfig(), SpeakerConfig(), MosConfig()
    parser.add_argument("--manifest", required=True, help="JSONL: one {audio, text, prompt} per line, paths relative to it")
    parser.add_argument("--out", required=True, help="folder for utterances.jsonl and aggregate.json; an interrupted run into the same folder resumes")
    parser.add_argument("--metrics", default=None, help="comma-separated metric or group names (default: all)")
    parser.add_argument("--eval-set", default=None, help="record this eval set name (and --eval-set-version) in the results")
    parser.add_argument("--eval-set-version", default=None)
    parser.add_argument("--asr-model", default=a.model, help=f"tiny.en (shipped), large-v3, distil-large-v3 (download) or a CTranslate2 folder (default {a.model})")
    parser.add_argument("--normalizer", choices=NORMALIZERS, default=a.normalizer,
                        help=f"WER text normalizer: whisper-en (numbers, spellings), seed-tts / f5-tts (punctuation and case only, as those papers) (default {a.normalizer})")
    parser.add_argument("--asr-beam", type=int, default=a.beam_size, help=f"beam size (default {a.beam_size})")
    parser.add_argument("--asr-compute-type", default=a.compute_type, help=f"CTranslate2 compute type (default {a.compute_type})")
    parser.add_argument("--device", default=a.device, help="cpu or cuda for the ASR and speaker models")
    parser.add_argument("--speaker-backend", choices=_speaker.BACKENDS, default=s.backend)
    parser.add_argument("--wavlm-model", default=s.wavlm_model, help="Hub id of a WavLM x-vector model (with --speaker-backend wavlm)")
    parser.add_argument("--ecapa-checkpoint", default=s.ecapa_checkpoint,
                        help="Seed-TTS-eval's SIM checkpoint wavlm_large_finetune.pth (with --speaker-backend wavlm-ecapa; default $CBX_WAVLM_ECAPA_CKPT)")
    parser.add_argument("--mos-backend", choices=_mos.BACKENDS, default=m.backend)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cbx.eval.scorer import ScorerConfig, format_table, score_manifest

    cfg = ScorerConfig(
        asr=dataclasses.replace(
            AsrConfig(), model=args.asr_model, beam_size=args.asr_beam, compute_type=args.asr_compute_type, device=args.device,
            normalizer=args.normalizer,
        ),
        speaker=SpeakerConfig(backend=args.speaker_backend, wavlm_model=args.wavlm_model, device=args.device,
                              ecapa_checkpoint=args.ecapa_checkpoint),
        mos=MosConfig(backend=args.mos_backend),
    )
    metrics = args.metrics.split(",") if args.metrics else None
    eval_set = {"name": args.eval_set, "version": args.eval_set_version} if args.eval_set else None
    agg = score_manifest(args.manifest, args.out, metrics=metrics, config=cfg, eval_set=eval_set, progress=not args.no_progress)
    print(format_table(agg))
    print(f"wrote {args.out}/utterances.jsonl and {args.out}/aggregate.json")
    return 0
