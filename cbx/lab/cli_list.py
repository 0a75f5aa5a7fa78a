"""``cbx list transforms|metrics|sets|models``: what the registries hold, one line each.

Read from the registries themselves (transforms with each config's parameters and defaults,
metrics with direction and unit, eval sets, model sources), so the list can never disagree
with what an experiment file accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

SET_INFO = {
    "offline": "real recorded voices from installed packages, 30 sentences; no network (docs/EVAL_DATA.md)",
    "librispeech-pc": "LibriSpeech-PC test-clean pairs (pair_list= or $CBX_LIBRISPEECH_PC_LIST; audio via `datasets`)",
    "seed-tts-en": "Seed-TTS-eval English (root= or $CBX_SEED_TTS_DIR)",
}
WHAT = ("transforms", "metrics", "sets", "models")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="which registry to list")


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()


def _params(cls: type) -> str:
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
        else:
            d = "(required)"
        out.append(f"{f.name}={d!r}" if d != "(required)" else f"{f.name} (required)")
    return ", ".join(out)


def lines(what: str) -> list[str]:
    if what == "transforms":
        from cbx.compress.registry import registered

        out = []
        for name, spec in sorted(registered().items()):
            out.append(f"{name}: {_first_line(spec.doc) or _first_line(spec.config_cls.__doc__)}")
            out += textwrap.wrap(f"params: {_params(spec.config_cls)}", 110, initial_indent="    ", subsequent_indent="      ")
        return out
    if what == "metrics":
        import cbx.eval.metrics  # noqa: F401 (registers the metrics)
        from cbx.eval.registry import metric_specs

        return [f"{s.name}: {'higher' if s.higher_is_better else 'lower'} is better, {s.unit or 'no unit'}, "
                f"{s.aggregation}, v{s.version}: {s.description}" for _, s in sorted(metric_specs().items())]
    if what == "sets":
        from cbx.eval.sets import EVAL_SETS

        return [f"{n}: {_first_line(fn.__doc__) or SET_INFO.get(n, '')}" for n, fn in EVAL_SETS.items()] + [
            "PATH.jsonl: your own set, one {\"id\", \"text\", \"prompt\"} object per line"]
    from cbx.engine.hub import HUB_MODELS
    from cbx.engine.model import TINY_SOURCES

    out = [f"{n}: built-in {v} architecture at small sizes, random weights (offline; noise, not speech)" for n, v in TINY_SOURCES.items()]
    out += [f"{n}: {m.variant} weights from the Hugging Face Hub ({m.repo_id})" for n, m in HUB_MODELS.items()]
    out.append("DIR: a local folder in the upstream file layout (t3_cfg.safetensors, s3gen.safetensors, ...)")
    return out


def run(args: argparse.Namespace) -> int:
    print("\n".join(lines(args.what)))
    return 0
