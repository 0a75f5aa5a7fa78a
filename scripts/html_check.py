#!/usr/bin/env python3
"""Check a leaderboard page in headless Chromium the way a reader sees it.

    python scripts/html_check.py RESULTS/leaderboard/leaderboard.html [--out DIR] [--chromium PATH]

Why a script and not a unit test: it needs a browser (Chromium is not a dependency of the
workbench), so it is run by hand or by `scripts/readme_figures.sh`, and its printed report is
quoted. It is deterministic: no timing, no remote-debugging socket. A copy of the page gets a
probe script appended; Chromium runs it at load (`--dump-dom`) and the probe writes what it
measured into the DOM, which this script reads back. The probe checks, in a 1400x900 window:

1. the main table of every group fits the window (no sideways scrolling) with its default columns;
2. clicking a numeric header ("speed", higher is better) puts the fastest first, sorted by that
   column's values, and a second click reverses them;
3. the "show every column" toggle reveals the hidden columns;
4. every "-" cell carries a reason (tooltip), every header a legend.

It also saves a 1400x900 screenshot of the page (``--out``, default: next to the page).
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH, HEIGHT = 1400, 900

PROBE = r"""
<script>
(function(){
 var out={viewport:window.innerWidth, tables:[]};
 document.querySelectorAll('table.lb').forEach(function(t){
  var box=t.getBoundingClientRect();
  var r={id:t.id, width:Math.ceil(box.width), wrap:t.parentElement.clientWidth,
         right:Math.ceil(box.right+window.scrollX), bottom:Math.ceil(box.bottom+window.scrollY),
         scrolls:t.parentElement.scrollWidth>t.parentElement.clientWidth+1, visible_cols:0, hidden_cols:0};
  var heads=Array.from(t.tHead.rows[0].cells);
  heads.forEach(function(h){ if(getComputedStyle(h).display==='none') r.hidden_cols++; else r.visible_cols++; });
  r.headers_without_legend=heads.filter(function(h){return !h.title}).length;
  r.dashes_without_reason=Array.from(t.querySelectorAll('td')).filter(function(c){
    return c.textContent.trim()==='-' && !c.querySelector('[title]')}).length;
  var ids=function(){return Array.from(t.tBodies[0].rows).map(function(x){return x.cells[1].textContent})};
  var si=heads.findIndex(function(h){return h.textContent.trim()==='speed'});
  r.before=ids();
  if(si>=0){
   heads[si].click(); r.after_one=ids();
   r.values_one=Array.from(t.tBodies[0].rows).map(function(x){return x.cells[si].dataset.v});
   heads[si].click(); r.after_two=ids();
   r.values_two=Array.from(t.tBodies[0].rows).map(function(x){return x.cells[si].dataset.v});
  }
  var cb=document.querySelector("input[data-t='"+t.id+"']");
  if(cb){ cb.click(); r.toggle_visible_cols=heads.filter(function(h){return getComputedStyle(h).display!=='none'}).length;
          r.toggle_width=Math.ceil(t.getBoundingClientRect().width); cb.click(); }
  out.tables.push(r);
 });
 var pre=document.createElement('pre'); pre.id='cbx-html-check'; pre.textContent=JSON.stringify(out);
 document.body.appendChild(pre);
})();
</script>
"""


def chromium(explicit: str | None) -> str:
    for c in [explicit, "chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"]:
        if c and shutil.which(c):
            return shutil.which(c)
    sys.exit("html_check: no Chromium found (--chromium PATH)")


def run(browser: str, *args: str, width: int = WIDTH, height: int = HEIGHT) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _sorted(vals: list[str], descending: bool) -> bool:
    nums = [float(v) for v in vals if v != ""]
    return nums == sorted(nums, reverse=descending) and all(v != "" for v in vals[: len(nums)])


def probe(page: Path, browser: str, width: int = WIDTH) -> dict | None:
    """What the probe measured in a ``width`` px window (None: it did not run)."""
    html = page.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(page.parent, f".html_check_{Path(tmp).name}.html")  # beside the page: relative links resolve
        copy.write_text(html.replace("</body>", PROBE + "</body>"))
        try:
            dom = run(browser, "--dump-dom", copy.resolve().as_uri(), width=width).stdout
        finally:
            copy.unlink()
    m = re.search(r"<pre id=\"cbx-html-check\">(.*?)</pre>", dom, re.S)
    if not m:
        return None
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def check(page: Path, out_dir: Path, browser: str) -> tuple[list[str], dict]:
    res = probe(page, browser)
    if res is None:
        return ["the probe did not run (no result in the dumped DOM)"], {}
    problems = []
    if res["viewport"] != WIDTH:
        problems.append(f"viewport is {res['viewport']} px, not {WIDTH}")
    for t in res["tables"]:
        name = t["id"]
        if t["scrolls"]:
            problems.append(f"{name}: table is {t['width']} px wide and scrolls sideways in a {t['wrap']} px column")
        if "after_one" not in t:
            problems.append(f"{name}: no 'speed' header to click")
        else:
            if t["after_one"] == t["before"] and len(set(t["before"])) > 1 and len(set(t["values_one"])) > 1:
                problems.append(f"{name}: clicking 'speed' did not reorder the rows")
            if not _sorted(t["values_one"], descending=True) or not _sorted(t["values_two"], descending=False):
                problems.append(f"{name}: rows after clicking 'speed' are not in its order: {t['values_one']} / {t['values_two']}")
        if t["hidden_cols"] and t.get("toggle_visible_cols", 0) != t["visible_cols"] + t["hidden_cols"]:
            problems.append(f"{name}: the 'show every column' toggle did not reveal the {t['hidden_cols']} hidden columns")
        if t["headers_without_legend"]:
            problems.append(f"{name}: {t['headers_without_legend']} header(s) without a legend tooltip")
        if t["dashes_without_reason"]:
            problems.append(f"{name}: {t['dashes_without_reason']} '-' cell(s) without a reason")
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / f"{page.stem}_{WIDTH}x{HEIGHT}.png"
    run(browser, f"--screenshot={shot.resolve()}", page.resolve().as_uri())
    res["screenshot"] = str(shot) if shot.is_file() else None
    if not shot.is_file():
        problems.append("Chromium wrote no screenshot")
    return problems, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the screenshot (default: the page's folder)")
    ap.add_argument("--chromium", default=None)
    a = ap.parse_args(argv)
    problems, res = check(a.page, a.out or a.page.parent, chromium(a.chromium))
    for t in res.get("tables", []):
        print(f"{t['id']}: {t['width']} px wide in a {res['viewport']} px window "
              f"({t['visible_cols']} columns shown, {t['hidden_cols']} behind the toggle; with it: {t.get('toggle_width')} px); "
              f"click 'speed': first row {t['before'][0]} -> {t.get('after_one', ['?'])[0]}, again -> {t.get('after_two', ['?'])[0]}")
    if res.get("screenshot"):
        print(f"screenshot: {res['screenshot']}")
    for p in problems:
        print(f"FAIL: {p}")
    print("html_check: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
