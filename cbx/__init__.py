"""Chatterbox compression workbench.

Layers (see README): ``cbx.engine`` loads and runs Chatterbox, ``cbx.compress`` holds the
model -> model transforms, ``cbx.distill`` trains few-step students, ``cbx.eval`` scores audio,
``cbx.lab`` holds experiment files, the runner, leaderboard, export and tracking.
Nothing is imported or downloaded at import time.
"""

import os as _os

__version__ = "0.1.0"

# The torch profiler (cbx.engine.timing.WorkMemory measures CPU working memory with it) has
# kineto print two lines per use unless told otherwise before it starts; a user's setting wins.
_os.environ.setdefault("KINETO_LOG_LEVEL", "5")
