#!/usr/bin/env python3
"""Make the README's pictures from a real results folder (`make demo` writes `runs/`).

    .venv/bin/python scripts/readme_figures.py RESULTS [--out docs]

Writes ``docs/leaderboard.png`` (the HTML leaderboard page in a 1400 px headless-Chromium
window, cropped to the first group's table) and ``docs/pareto.png`` (the Pareto plot a reader
of that group should look at: speed-up against mel L1 for random-weight models, whose WER means
nothing; speed-up against ΔWER otherwise), each a palette PNG under 200 KB. The page is first
checked with ``scripts/html_check.py`` (fits the window, sorting works): a picture of a broken
page is never taken. Nothing here is hand-edited, so the pictures can be remade after any
change to the leaderboard.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import html_check  # noqa: E402  (the sibling script)

MAX_BYTES = 200 * 1024


def _palette_png(img, out: Path) -> int:
    """Save as an adaptive-palette PNG (text and flat plots lose nothing visible)."""
    data = b""
    for colors in (256, 128, 64):
        buf = io.BytesIO()
        img.convert("RGB").quantize(colors=colors, dither=0).save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        if len(data) <= MAX_BYTES:
            break
    if len(data) > MAX_BYTES:
        sys.exit(f"readme_figures: {out.name} would be {len(data) // 1024} KB (limit {MAX_BYTES // 1024} KB)")
    out.write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    ap.add_argument("--chromium", default=None)
    a = ap.parse_args(argv)
    browser = html_check.chromium(a.chromium)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        board = Path(tmp) / "board"
        subprocess.run([sys.executable, "-m", "cbx.cli", "leaderboard", "--results", str(a.results), "--out", str(board)],
                       check=True, stdout=subprocess.DEVNULL)
        page = board / "leaderboard.html"
        problems, res = html_check.check(page, Path(tmp) / "check", browser)
        if problems:
            print("\n".join(f"FAIL: {p}" for p in problems))
            return 1
        # A window as wide as the first table (text wraps inside the picture), as tall as its end.
        width = max(res["tables"][0]["right"] + 32, 900)
        t = html_check.probe(page, browser, width=width)["tables"][0]
        height = min(t["bottom"] + 12, 1600)
        shot = Path(tmp) / "shot.png"
        html_check.run(browser, f"--screenshot={shot}", page.resolve().as_uri(), width=width, height=height)
        img = Image.open(shot)
        n = _palette_png(img, a.out / "leaderboard.png")
        print(f"{a.out / 'leaderboard.png'}: {img.width}x{img.height}, {n // 1024} KB")
        import json

        rows = json.loads((board / "leaderboard.json").read_text())
        first = [r for r in rows if r["group"] == rows[0]["group"]]
        stem = "pareto_speedup_vs_mel_l1" if all(r.get("random_weights") for r in first) else "pareto_speedup_vs_wer_delta"
        src = board / f"{stem}.png"
        if not src.is_file():
            print(f"FAIL: {src.name} was not drawn (see the page's 'skipped' notes)")
            return 1
        img = Image.open(src)
        n = _palette_png(img, a.out / "pareto.png")
        print(f"{a.out / 'pareto.png'}: {src.name}, {img.width}x{img.height}, {n // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
