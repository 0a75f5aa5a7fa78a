"""Chatterbox compression workbench.

Layers (see README): ``cbx.engine`` loads and runs Chatterbox, ``cbx.compress`` holds the
model -> model transforms, ``cbx.distill`` trains few-step students, ``cbx.eval`` scores audio,
``cbx.lab`` holds experiment files, the runner, leaderboard, export and tracking.
Nothing is imported or downloaded at import time. The notebook API (:mod:`cbx.api`:
``load_model``, ``transform``, ``synthesize``, ``score``, ``run``, ``leaderboard``, ``write_wav``)
is reachable as ``cbx.NAME`` and imported on first use.
"""

import os as _os

__version__ = "0.1.0"

# The torch profiler (cbx.engine.timing.WorkMemory measures CPU working memory with it) has
# kineto print two lines per use unless told otherwise before it starts; a user's setting wins.
_os.environ.setdefault("KINETO_LOG_LEVEL", "5")


_API = ("load_model", "transform", "synthesize", "score", "run", "leaderboard", "write_wav")


def __getattr__(name: str):
    if name in _API:
        from cbx import api

        return getattr(api, name)
    raise AttributeError(f"module 'cbx' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
