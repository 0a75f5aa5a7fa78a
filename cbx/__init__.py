"""Chatterbox compression workbench.

Layers (see README): ``cbx.engine`` loads and runs Chatterbox, ``cbx.compress`` holds the
model -> model transforms, ``cbx.distill`` trains few-step students, ``cbx.eval`` scores audio,
``cbx.lab`` holds experiment files, the runner, leaderboard, export and tracking.
Nothing is imported or downloaded at import time.
"""

__version__ = "0.1.0"
