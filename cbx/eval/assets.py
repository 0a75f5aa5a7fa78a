"""Real recorded speech with known transcripts, from packages that install offline.

Machines that build and test this project reach package registries and nothing else, so the
offline eval set, the metric tests and the demo take their real speech from packages:

- Debian ``asterisk-core-sounds-en-wav``: 568 prompts read by one real speaker (Allison Smith),
  8 kHz; transcripts in ``asterisk-core-sounds-en`` (``name: text`` lines). CC-BY-SA-3.0.
- the ``pyannote-audio`` 4.0.7 wheel: ``sample.wav``, a 30 s phone call between two real
  speakers (Diane and Sheila) with ``sample.rttm`` (who speaks when) and ``sample.stm``
  (what). MIT.
- the ``moonshine-voice`` 0.1.5 wheel: English read clips (Beckett, Dickens). MIT.

Each voice is cut into a prompt and held-out clips by fixed times chosen from the RTTM/STM
files (no overlap with the other speaker) and from word timestamps. Cuts are written once into
a cache folder (``$CBX_CACHE_DIR`` or ``~/.cache/cbx``) under a name that hashes the source
file's bytes and the cut, so a changed source or cut makes a new file and a deleted file is
rebuilt; audio is never committed. ``docs/EVAL_DATA.md`` lists every clip and its licence.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbx.errors import CbxError
from cbx.eval.audio import read_audio, write_wav

ALLISON_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ALLISON_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
CUT_VERSION = "1"  # bump when the cutting itself (fades, format) changes
FADE_S = 0.01  # raised-cosine fade at cut edges, so a cut never starts or ends with a click

_INSTALL_HINT = {
    "asterisk": "install the Debian packages asterisk-core-sounds-en-wav and asterisk-core-sounds-en "
    "(scripts/setup_system.sh does it)",
    "pyannote": "pip install --no-deps pyannote-audio==4.0.7 (the wheel ships the sample call)",
    "moonshine": "pip install --no-deps moonshine-voice==0.1.5 (the wheel ships the clips)",
}


@dataclass(frozen=True)
class Cut:
    """A span of a source recording: ``source`` is ``allison:<name>``, ``pyannote:sample`` or
    ``moonshine:<file>``; ``start``/``end`` in seconds (None: from the start / to the end)."""

    source: str
    text: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class Voice:
    name: str
    prompt: Cut
    held_out: tuple[Cut, ...]  # other clips of the same speaker (speaker-similarity checks)
    origin: str
    licence: str


# Times: pyannote cuts stay inside one speaker's RTTM turns and clear of the other speaker;
# moonshine cuts fall in pauses found by Whisper word timestamps.
VOICES: dict[str, Voice] = {
    v.name: v
    for v in [
        Voice(
            "allison",
            Cut("allison:queue-youarenext", "Your call is now first in line and will be answered by the next available representative."),
            (
                Cut("allison:vm-rec-name", "After the tone say your name and then press the pound key."),
                Cut("allison:privacy-unident", "The party you are trying to reach does not accept unidentified calls."),
                Cut("allison:vm-mismatch", "The passwords you entered and re-entered did not match. Please try again."),
            ),
            "Allison Smith, Asterisk core sounds (Debian asterisk-core-sounds-en-wav), 8 kHz",
            "CC-BY-SA-3.0",
        ),
        Voice(
            "diane",
            Cut("pyannote:sample", "I thought you know, I heard a beep. This is Diane in New Jersey.", 10.85, 14.30),
            (
                Cut("pyannote:sample", "Oh, hello. I didn't know you were there.", 8.40, 9.90),
                Cut("pyannote:sample", "originally from Chicago also. I'm in New Jersey now though.", 18.62, 21.45),
            ),
            "speaker 'Diane' of pyannote-audio 4.0.7 sample.wav (phone call), 16 kHz",
            "MIT",
        ),
        Voice(
            "sheila",
            Cut(
                "pyannote:sample",
                "Well, there isn't that much difference. At least you know, they all call me a Yankee down here,",
                21.85,
                27.55,
            ),
            (Cut("pyannote:sample", "I'm Sheila in Texas, originally from Chicago.", 14.70, 17.95),),
            "speaker 'Sheila' of pyannote-audio 4.0.7 sample.wav (phone call), 16 kHz",
            "MIT",
        ),
        Voice(
            "beckett",
            Cut("moonshine:beckett.wav", "Ever tried. Ever failed. No matter. Try again.", 0.0, 6.40),
            (Cut("moonshine:beckett.wav", "Fail again. Fail better.", 6.40, None),),
            "moonshine-voice 0.1.5 assets/beckett.wav (reader not named), 16 kHz",
            "MIT",
        ),
        Voice(
            "dickens",
            Cut(
                "moonshine:two_cities.wav",
                "It was the best of times, it was the worst of times, it was the age of wisdom, "
                "it was the age of foolishness,",
                0.50,
                8.62,
            ),
            (
                Cut("moonshine:two_cities.wav", "it was the epoch of belief, it was the epoch of incredulity,", 8.62, 13.20),
                Cut("moonshine:two_cities.wav", "it was the season of Light, it was the season of Darkness,", 13.20, 16.95),
                Cut(
                    "moonshine:two_cities.wav",
                    "it was the spring of hope, it was the winter of despair, we had everything before us, "
                    "we had nothing before us,",
                    16.95,
                    24.90,
                ),
            ),
            "moonshine-voice 0.1.5 assets/two_cities.wav (reader not named), 48 kHz",
            "MIT",
        ),
    ]
}


def cache_dir() -> Path:
    """Where cut clips live: ``$CBX_CACHE_DIR`` or ``~/.cache/cbx``."""
    root = os.environ.get("CBX_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "cbx"


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise CbxError(f"real speech from Python package {module!r} is missing: {_INSTALL_HINT[hint]}")
    return Path(next(iter(spec.submodule_search_locations)))


def source_path(source: str) -> Path:
    """Path of a source recording named ``allison:<name>``, ``pyannote:sample`` or ``moonshine:<file>``."""
    kind, _, name = source.partition(":")
    if kind == "allison":
        p = ALLISON_DIR / f"{name}.wav"
        hint = "asterisk"
    elif kind == "pyannote" and name == "sample":
        p = _package_dir("pyannote.audio", "pyannote") / "sample" / "sample.wav"
        hint = "pyannote"
    elif kind == "moonshine":
        p = _package_dir("moonshine_voice", "moonshine") / "assets" / name
        hint = "moonshine"
    else:
        raise CbxError(f"unknown speech source {source!r} (allison:<name>, pyannote:sample or moonshine:<file>)")
    if not p.is_file():
        raise CbxError(f"{p}: real speech file missing: {_INSTALL_HINT[hint]}")
    return p


@functools.lru_cache(maxsize=1)
def allison_transcripts() -> dict[str, str]:
    """Prompt name (e.g. ``vm-rec-name``, ``digits/5``) -> transcript, from the Debian docs file."""
    if not ALLISON_TRANSCRIPTS.is_file():
        raise CbxError(f"{ALLISON_TRANSCRIPTS}: transcripts missing: {_INSTALL_HINT['asterisk']}")
    out: dict[str, str] = {}
    with gzip.open(ALLISON_TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, _, text = line.partition(":")
            out[name.strip()] = re.sub(r"\s+", " ", text.strip())
    return out


@functools.lru_cache(maxsize=64)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize(cut: Cut, label: str) -> Path:
    """Path of a wav holding ``cut``: the source itself for a whole file, else a cached cut."""
    src = source_path(cut.source)
    if cut.start is None and cut.end is None:
        return src
    st = src.stat()
    key = f"{_file_sha(str(src), st.st_size, st.st_mtime_ns)}|{cut.start}|{cut.end}|{CUT_VERSION}"
    out = cache_dir() / "clips" / f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.wav"
    if out.is_file():
        return out
    wav, sr = read_audio(src)
    a = 0 if cut.start is None else int(round(cut.start * sr))
    b = len(wav) if cut.end is None else min(len(wav), int(round(cut.end * sr)))
    if not 0 <= a < b:
        raise CbxError(f"cut {cut.start}-{cut.end} s lies outside {src} ({len(wav) / sr:.2f} s)")
    seg = wav[a:b].copy()
    n = min(int(FADE_S * sr), len(seg) // 2)
    if n > 0:
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))).astype(np.float32)
        seg[:n] *= ramp
        seg[-n:] *= ramp[::-1]
    write_wav(out, seg, sr)
    return out


def voice_prompt(voice: str) -> tuple[Path, str]:
    """``(prompt wav, prompt transcript)`` of one of :data:`VOICES`."""
    if voice not in VOICES:
        raise CbxError(f"unknown offline voice {voice!r}; valid choices: {', '.join(VOICES)}")
    v = VOICES[voice]
    return materialize(v.prompt, f"{voice}-prompt"), v.prompt.text


def voice_audio_path(name: str, key: str, also: str = "") -> Path:
    """The audio file a voice name stands for: an offline voice's prompt (a name without a file
    suffix) or an existing audio file path. ``key`` names the setting in the one-line error;
    ``also`` lists the caller's other accepted names (``"'builtin', "``)."""
    path = Path(name)
    if not path.suffix:
        if name not in VOICES:
            raise CbxError(f"{key}: {name!r} is neither {also}an offline voice "
                           f"({', '.join(VOICES)}), nor an audio file path")
        return voice_prompt(name)[0]
    if not path.is_file():
        raise CbxError(f"{key}: audio file {name} does not exist")
    return path


def voice_clips(voice: str) -> list[tuple[Path, str]]:
    """Held-out clips of one voice (never its prompt), each with its transcript."""
    if voice not in VOICES:
        raise CbxError(f"unknown offline voice {voice!r}; valid choices: {', '.join(VOICES)}")
    return [(materialize(c, f"{voice}-clip{i}"), c.text) for i, c in enumerate(VOICES[voice].held_out)]


_PLAIN = re.compile(r"^[A-Za-z0-9 ,.?!'-]+$")


def allison_candidates(min_s: float = 1.5, max_s: float = 8.0) -> list[tuple[Path, str]]:
    """Allison prompts whose transcript is plain read text (no tone descriptions, keypad symbols
    or trailing ellipses) and whose length lies in ``[min_s, max_s]``, sorted by name."""
    import soundfile as sf

    out = []
    for name, text in sorted(allison_transcripts().items()):
        if not _PLAIN.match(text) or text.startswith("...") or text.endswith("..."):
            continue
        p = ALLISON_DIR / f"{name}.wav"
        if not p.is_file():
            continue
        if min_s <= sf.info(str(p)).duration <= max_s:
            out.append((p, text))
    return out


def real_speech_clips(n: int = 24, min_s: float = 1.5, max_s: float = 8.0) -> list[tuple[Path, str]]:
    """``n`` real recorded clips with their transcripts (Allison prompts, 8 kHz), spread evenly
    over the sorted candidates so they cover many prompt families; the same list every call."""
    cands = allison_candidates(min_s, max_s)
    if n <= 0:
        return []
    if n > len(cands):
        raise CbxError(f"asked for {n} real speech clips of {min_s}-{max_s} s; only {len(cands)} exist")
    idx = np.unique(np.linspace(0, len(cands) - 1, n).round().astype(int))
    return [cands[i] for i in idx]
