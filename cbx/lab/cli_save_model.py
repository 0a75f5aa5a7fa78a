"""``cbx save-model SOURCE --out DIR``: write any model source in the upstream file layout.

Why: the folder loader is the path real users take (a Hub snapshot, a copied checkpoint), but
without the Hub weights it would only ever see tiny folders. Saving ``random:original`` (or
``random:turbo``, ``random:multilingual``) gives a folder with the real file names, key sets and
tensor sizes, which ``load_model(DIR)``, ``model: DIR`` in an experiment, ``cbx synth --model DIR``
and upstream's ``from_local`` all read. The folder appears only when complete
(:func:`cbx.engine.model.save_upstream_layout`); an existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="model source: tiny | tiny-turbo | tiny-multilingual | random:original | random:turbo | "
                        "random:multilingual | HUB_ID | DIR (upstream layout, or a compressed checkpoint/export: "
                        "saved dequantized)")
    p.add_argument("--out", required=True, help="folder to write (must be absent or empty)")
    p.add_argument("--variant", default=None, choices=["original", "turbo", "multilingual"],
                   help="which model of a folder holding several models' files")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from cbx.compress.modules import dequantize_model
    from cbx.compress.source import load_source
    from cbx.engine.model import save_upstream_layout
    from cbx.errors import CbxError

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CbxError(f"--out {out}: exists and is not an empty folder")  # before a 3 GB model is built
    t0 = time.perf_counter()
    model = load_source(args.source, variant=args.variant)
    if getattr(model.s3gen, "meanflow", False) and model.variant != "turbo":
        raise CbxError(f"{args.source}: its S3Gen runs a distilled MeanFlow student, which the "
                       f"{model.variant} model's upstream file layout cannot hold; use the compressed format")
    save_upstream_layout(dequantize_model(model), out)  # a compressed source: float weights again
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved {args.source} ({model.variant}) -> {out}: {len(files)} files, {size / 1e9:.2f} GB, "
          f"{time.perf_counter() - t0:.1f} s ({', '.join(files)})")
    return 0
