#!/usr/bin/env python3
"""Rewrite the README's leaderboard-column table from the registered columns.

    .venv/bin/python scripts/readme_columns.py [README.md]

The table between the ``leaderboard-columns`` markers is ``cbx.lab.leaderboard.columns_markdown()``;
tests/lab/test_lab_readme.py fails when the README's copy differs, so a new or changed column
is documented for users by running this script.
"""

from __future__ import annotations

import sys
from pathlib import Path


def updated(text: str) -> str:
    import cbx.cli  # noqa: F401  (imports every module that may register a column)
    from cbx.lab.leaderboard import COLUMNS_DOC_BEGIN, COLUMNS_DOC_END, columns_markdown

    head, sep, rest = text.partition(COLUMNS_DOC_BEGIN)
    if not sep or COLUMNS_DOC_END not in rest:
        sys.exit(f"readme_columns: the README has no '{COLUMNS_DOC_BEGIN}' ... '{COLUMNS_DOC_END}' block")
    tail = rest.split(COLUMNS_DOC_END, 1)[1]
    return f"{head}{COLUMNS_DOC_BEGIN}\n{columns_markdown()}{COLUMNS_DOC_END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md")
    text = path.read_text()
    new = updated(text)
    path.write_text(new)
    print(f"{path}: column table {'updated' if new != text else 'already current'}")
