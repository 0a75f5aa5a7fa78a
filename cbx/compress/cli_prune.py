"""``cbx prune-report MODEL``: what pruning would remove first, measured on calibration data.

Prints T3 layers ranked by block influence, the weakest attention heads and the spread of FFN
channel importance per layer, and CFM estimator transformer blocks by block influence (see
:mod:`cbx.compress.importance`). ``--json`` also writes every score.
"""

from __future__ import annotations

import argparse
import json

from cbx.compress.prune_methods import DEFAULT_CALIB_VOICES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model source: tiny, a Hub id, a local folder or random:original (full size)")
    p.add_argument("--texts", type=int, default=8, help="calibration sentences (default 8)")
    p.add_argument("--max-speech-tokens", type=int, default=150, help="speech tokens per sentence (default 150)")
    p.add_argument("--voices", default=",".join(DEFAULT_CALIB_VOICES),
                   help="comma-separated calibration voices: builtin, offline voice names or audio files "
                        f"(default {','.join(DEFAULT_CALIB_VOICES)})")
    p.add_argument("--parts", default="t3,cfm", help="which parts to score: t3, cfm or t3,cfm (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write all scores to FILE")


def _load(source: str):
    from cbx.engine.model import load_model

    if source.startswith("random:"):
        from cbx.engine.tiny import build_random

        return build_random(source.split(":", 1)[1], full_size=True)
    return load_model(source)


def run(args: argparse.Namespace) -> int:
    from cbx.compress.calibration import CALIBRATION_TEXTS
    from cbx.compress.importance import CalibSpec, importance, report, to_json
    from cbx.errors import CbxError

    if not 1 <= args.texts <= len(CALIBRATION_TEXTS):
        raise CbxError(f"--texts: must be 1..{len(CALIBRATION_TEXTS)}, got {args.texts}")
    if args.max_speech_tokens < 1:
        raise CbxError(f"--max-speech-tokens: must be >= 1, got {args.max_speech_tokens}")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts or set(parts) - {"t3", "cfm"}:
        raise CbxError(f"--parts: expected t3, cfm or t3,cfm, got {args.parts!r}")
    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip())
    model = _load(args.model)
    imp = importance(model, CalibSpec(args.texts, args.max_speech_tokens, args.seed, voices), parts)
    print(f"model {args.model} ({model.variant}); voices {', '.join(voices)}")
    print(report(imp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(imp), f, indent=1)
    return 0
