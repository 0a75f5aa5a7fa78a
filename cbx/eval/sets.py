"""Eval sets: named, versioned lists of (voice prompt, target text) pairs.

- ``offline`` (works with no network): five real voices from installable packages (see
  :mod:`cbx.eval.assets`) and 30 target sentences of varied length and kind (short, long,
  numbers and dates, abbreviations, questions, quotes); sentence ``i`` is spoken with voice
  ``i mod 5``, so every voice meets every kind of sentence.
- ``librispeech-pc``: LibriSpeech test-clean with LibriSpeech-PC transcripts, cross-sentence
  pairs of 4-10 s (the 1,127-pair list of F5-TTS): prompt = one utterance of a speaker, target =
  the text of another utterance of the same speaker. Audio comes through ``datasets``; the pair
  list is a local file (``$CBX_LIBRISPEECH_PC_LIST``) since it is not on a hub.
- ``seed-tts-en``: Seed-TTS-eval ``test-en`` from a folder the user downloaded
  (``$CBX_SEED_TTS_DIR`` or ``get_eval_set("seed-tts-en", root=...)``), read from its
  ``meta.lst`` (``id|prompt text|prompt wav|target text``).
- a path ending in ``.jsonl``: the user's own set, one utterance a line
  (``{"prompt": wav, "text": target, "prompt_text"?: transcript, "id"?: name}``, paths relative
  to the manifest). Its version is a hash of the manifest and of every file it names, so
  editing a line or re-recording a prompt makes a new version; bad lines are errors naming the
  line number (all of them, before any work).

Loading is lazy: nothing is downloaded unless a network set is named, and offline those fail
with a :class:`CbxError` that says what is missing. A set's version is bumped whenever its
items change, and results record it, so scores of different set versions are never mixed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cbx.errors import CbxError


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str  # target text to synthesize
    prompt_path: Path  # voice prompt audio
    prompt_text: str | None = None  # transcript of the prompt, when known
    voice: str | None = None


@dataclass(frozen=True)
class EvalSet:
    name: str
    version: str
    items: list[EvalItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


# Kinds are recorded in the item id, so per-kind breakdowns need no second table.
OFFLINE_SENTENCES: list[tuple[str, str]] = [
    ("short", "Good morning."),
    ("short", "Please close the door behind you."),
    ("short", "The coffee is ready."),
    ("short", "I never said that."),
    ("short", "Turn left at the bridge."),
    ("question", "Where did you park the car last night?"),
    ("question", "Could you send me the report before Friday?"),
    ("question", "Why would anyone leave a bicycle in the rain?"),
    ("question", "Have you ever seen the ocean at sunrise?"),
    ("numbers", "The train leaves at 7:45 from platform 12."),
    ("numbers", "She was born on March 3rd, 1987, in a small town."),
    ("numbers", "The invoice came to $1,250, due within 30 days."),
    ("numbers", "Call me back at 555 0199 after 6 o'clock."),
    ("numbers", "About 2.5 million people visited the museum in 2023."),
    ("abbrev", "Dr. Smith moved the meeting to 10 a.m. on Tuesday."),
    ("abbrev", "The NASA team shared the data with the FBI and the UN."),
    ("abbrev", "Mr. and Mrs. Lee live on Oak St. near the old mill."),
    ("abbrev", "Our CEO said the AI model runs on a single GPU."),
    ("quote", 'He looked up and said, "I will be there in five minutes."'),
    ("quote", 'The sign on the door read "Closed for the holidays."'),
    ("quote", 'She whispered, "Do not tell anyone," and walked away.'),
    ("long", "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, "
     "and watched the ships pass safely through the rocky strait until dawn."),
    ("long", "When the storm finally passed, the villagers came out of their houses, cleared the "
     "fallen branches from the road, and shared whatever food they had left."),
    ("long", "Researchers measured how much each compression step changed the voice, the accuracy "
     "of the words, and the time it took to speak a single sentence."),
    ("long", "If you are planning a long journey by train, bring a good book, some water, and a "
     "warm sweater, because the heating rarely works in the night carriages."),
    ("medium", "A gentle breeze carried the smell of fresh bread across the square."),
    ("medium", "The children laughed as the puppy chased its own tail."),
    ("medium", "Every library card opens a door to a different world."),
    ("medium", "Nobody expected the quiet student to win the chess tournament."),
    ("medium", "Thick fog rolled over the hills and hid the farmhouse from view."),
]
OFFLINE_VERSION = "1"  # bump when sentences, voices or cuts change


def _offline(**_: object) -> EvalSet:
    from cbx.eval import assets

    voices = list(assets.VOICES)
    prompts = {v: assets.voice_prompt(v) for v in voices}
    items = []
    for i, (kind, text) in enumerate(OFFLINE_SENTENCES):
        v = voices[i % len(voices)]
        path, ptext = prompts[v]
        items.append(EvalItem(f"{i:03d}-{kind}-{v}", text, path, ptext, v))
    return EvalSet("offline", OFFLINE_VERSION, items)


def _seed_tts_en(root: str | os.PathLike | None = None, **_: object) -> EvalSet:
    root = root or os.environ.get("CBX_SEED_TTS_DIR")
    if not root:
        raise CbxError(
            "eval set 'seed-tts-en' reads a local copy of Seed-TTS-eval: download it and pass its "
            "folder (the one with en/meta.lst) as root= or set CBX_SEED_TTS_DIR"
        )
    base = Path(root).expanduser()
    meta = next((p for p in (base / "en" / "meta.lst", base / "meta.lst") if p.is_file()), None)
    if meta is None:
        raise CbxError(f"{base}: no en/meta.lst or meta.lst (Seed-TTS-eval test-en layout) found")
    items = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 4:
            raise CbxError(f"{meta}:{n}: expected 'id|prompt text|prompt wav|target text', got {len(parts)} fields")
        uid, ptext, pwav, text = parts[0], parts[1], parts[2], parts[3]
        items.append(EvalItem(uid, text.strip(), meta.parent / pwav.strip(), ptext.strip() or None))
    if not items:
        raise CbxError(f"{meta}: no items")
    return EvalSet("seed-tts-en", "1", items)


def _librispeech_pc(pair_list: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                    repo: str | os.PathLike | None = None, **_: object) -> EvalSet:
    pair_list = pair_list or os.environ.get("CBX_LIBRISPEECH_PC_LIST")
    if not pair_list or not Path(pair_list).expanduser().is_file():
        raise CbxError(
            "eval set 'librispeech-pc' needs the F5-TTS pair list "
            "(librispeech_pc_test_clean_cross_sentence.lst): pass pair_list= or set CBX_LIBRISPEECH_PC_LIST"
        )
    pairs = []
    for n, line in enumerate(Path(pair_list).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) != 6:
            raise CbxError(f"{pair_list}:{n}: expected 6 tab-separated fields (ref id, dur, text, gen id, dur, text)")
        pairs.append((f[0], f[2], f[3], f[5]))
    try:
        import datasets
    except ImportError:
        raise CbxError("eval set 'librispeech-pc' needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_test_clean(datasets, str(repo) if repo else LIBRISPEECH_REPO)
    except Exception as e:  # offline, hub errors surface as many exception types
        raise CbxError(f"eval set 'librispeech-pc': cannot load LibriSpeech test-clean through datasets ({e})") from None
    from cbx.eval.assets import cache_dir
    from cbx.eval.audio import write_wav

    import io

    import soundfile as sf

    out = Path(cache or cache_dir() / "librispeech-pc")
    wanted = {p[0] for p in pairs}
    # Undecoded flac bytes, read with soundfile: datasets' own decoder needs torchcodec.
    ds = ds.filter(lambda i: i in wanted, input_columns=["id"]).cast_column("audio", datasets.Audio(decode=False))
    paths: dict[str, Path] = {}
    for row in ds:
        p = out / f"{row['id']}.wav"
        if not p.is_file():
            wav, sr = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
            write_wav(p, wav, sr)
        paths[row["id"]] = p
    missing = wanted - set(paths)
    if missing:
        raise CbxError(f"eval set 'librispeech-pc': {len(missing)} prompt utterances not in test-clean, e.g. {sorted(missing)[0]}")
    items = [EvalItem(f"{gen}", gtext, paths[ref], rtext) for ref, rtext, gen, gtext in pairs]
    return EvalSet("librispeech-pc", "1", items)


LIBRISPEECH_REPO = "openslr/librispeech_asr"
# The test-clean shard(s) of the Hub dataset's parquet conversion. ``load_dataset(repo, "clean",
# split="test")`` would download and prepare every split of the "clean" config (train-clean-100
# and -360 too, about 30 GB) to hand back 350 MB; naming the files reads only test-clean.
LIBRISPEECH_TEST_CLEAN_FILES = "clean/test/*.parquet"
# Pinned so the set cannot change under a version label (the revision two public eval scripts
# pin for clean/test/0000.parquet, 350,452,636 bytes).
LIBRISPEECH_REVISION = "71cacbfb7e2354c4226d01e70d77d5fca3d04ba1"


def load_test_clean(datasets_module, repo: str = LIBRISPEECH_REPO):
    """LibriSpeech test-clean as a ``datasets.Dataset``, reading only that split's files.
    ``repo``: the Hub dataset, or a local folder in its layout (tests use a stand-in)."""
    kw = {"revision": LIBRISPEECH_REVISION} if repo == LIBRISPEECH_REPO else {}
    return datasets_module.load_dataset(repo, data_files={"test": LIBRISPEECH_TEST_CLEAN_FILES}, split="test", **kw)


def _jsonl(path: Path) -> EvalSet:
    """An own eval set from a JSONL manifest (see the module docstring)."""
    import hashlib
    import json

    from cbx.files import jsonl_objects, sha256_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise CbxError(f"eval.set {str(path)!r}: manifest not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CbxError(f"{path}: cannot read eval-set manifest ({e})") from None
    base = path.parent
    items: list[EvalItem] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    h = hashlib.sha256()
    file_hashes: dict[Path, str] = {}
    for n, d, why in jsonl_objects(lines):
        if why:
            bad.append(f"line {n}: {why}")
            continue
        unknown = sorted(set(d) - {"prompt", "text", "prompt_text", "id"})
        if unknown:
            bad.append(f"line {n}: unknown key {unknown[0]!r} (valid: prompt, text, prompt_text, id)")
            continue
        if not isinstance(d.get("text"), str) or not d["text"].strip():
            bad.append(f"line {n}: 'text' must be a non-empty string")
            continue
        if not isinstance(d.get("prompt"), str) or not d["prompt"]:
            bad.append(f"line {n}: 'prompt' must be the path of the voice prompt audio")
            continue
        if "prompt_text" in d and d["prompt_text"] is not None and not isinstance(d["prompt_text"], str):
            bad.append(f"line {n}: 'prompt_text' must be a string")
            continue
        uid = d.get("id", f"line{n}")
        if not isinstance(uid, str) or not uid.strip():
            bad.append(f"line {n}: 'id' must be a non-empty string")
            continue
        if uid in seen:
            bad.append(f"line {n}: duplicate id {uid!r} (first on line {seen[uid]})")
            continue
        prompt = (base / d["prompt"]).resolve()
        if not prompt.is_file():
            bad.append(f"line {n}: prompt file {d['prompt']!r} not found (paths are relative to the manifest)")
            continue
        seen[uid] = n
        if prompt not in file_hashes:
            file_hashes[prompt] = sha256_file(prompt)
        # The version covers what each item is (text, prompt bytes), not where files live.
        h.update(json.dumps([uid, d["text"], d.get("prompt_text"), file_hashes[prompt]]).encode("utf-8") + b"\n")
        items.append(EvalItem(uid, d["text"], prompt, d.get("prompt_text")))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CbxError(f"{path}: {len(bad)} bad line(s): " + "; ".join(bad[:3]) + more)
    if not items:
        raise CbxError(f"{path}: no items (one JSON object per line: prompt, text)")
    return EvalSet(path.name, h.hexdigest()[:12], items)


def is_manifest(name: str) -> bool:
    """Whether an ``eval.set`` value names a JSONL manifest rather than a built-in set."""
    return str(name).endswith(".jsonl")


EVAL_SETS: dict[str, Callable[..., EvalSet]] = {
    "offline": _offline,
    "librispeech-pc": _librispeech_pc,
    "seed-tts-en": _seed_tts_en,
}


def get_eval_set(name: str, **options: object) -> EvalSet:
    """Build the eval set ``name`` (a built-in name or a ``.jsonl`` manifest path); options
    (``root``, ``pair_list``) go to network sets."""
    if is_manifest(name):
        return _jsonl(Path(name))
    if name not in EVAL_SETS:
        raise CbxError(f"unknown eval set {name!r}; valid choices: {', '.join(EVAL_SETS)}, or a path to a .jsonl manifest")
    return EVAL_SETS[name](**options)
