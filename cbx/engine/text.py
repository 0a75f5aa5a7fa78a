"""Text side of the engine: punctuation normalisation, tokenisation and sentence chunking.

Why it is built this way:

* Normalisation is *upstream's own* ``punc_norm`` of the variant (``tts.py``, ``tts_turbo.py``,
  ``mtl_tts.py`` differ: Turbo keeps ``...``, ``;`` and `` - ``; multilingual knows CJK sentence
  ends). Calling those functions rather than re-typing them keeps us exact when upstream changes.
* :class:`TextTokenizer` is one interface over the three upstream tokenizers (``EnTokenizer``,
  ``MTLTokenizer``, a Hugging Face GPT-2 tokenizer for Turbo), so the rest of the workbench never
  branches on the variant. It also writes itself back in the upstream file layout.
* :func:`t3_text_tokens` adds the start/stop text tokens exactly as upstream's ``generate()``
  does (original and multilingual: ``[SOT] ids [EOT]``; Turbo: no start/stop tokens).
* :func:`split_text` cuts long text into chunks the model handles well (sentence ends first,
  then clause punctuation, then spaces) for the pipeline to synthesize as separate batch rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cbx.errors import CbxError

VARIANTS = ("original", "turbo", "multilingual")

# Where upstream keeps the tokenizer of each variant (file names inside a checkpoint folder).
TOKENIZER_FILES = {
    "original": "tokenizer.json",
    "multilingual": "grapheme_mtl_merged_expanded_v1.json",
    # Turbo: a Hugging Face tokenizer folder (tokenizer.json or vocab.json + merges.txt, configs).
    "turbo": "tokenizer_config.json",
}

DEFAULT_MAX_CHUNK_CHARS = 300


def punc_norm(text: str, variant: str) -> str:
    """Upstream's punctuation clean-up for ``variant`` (its own function, called as is)."""
    from cbx.engine import upstream

    fn = {"original": upstream.tts.punc_norm, "turbo": upstream.tts_turbo.punc_norm,
          "multilingual": upstream.mtl_tts.punc_norm}.get(variant)
    if fn is None:
        raise CbxError(f"unknown model variant '{variant}' (expected one of {list(VARIANTS)})")
    return fn(text)


class TextTokenizer:
    """Engine text tokenizer: ``encode(text, language_id=None) -> list[int]`` for any variant.

    ``encode`` is upstream's tokenisation of already-normalised text *without* start/stop tokens
    (those belong to the T3 prompt: see :func:`t3_text_tokens`). ``backend`` is the upstream
    object (``EnTokenizer``, ``MTLTokenizer`` or a ``PreTrainedTokenizerFast``).
    """

    def __init__(self, variant: str, backend: Any):
        if variant not in VARIANTS:
            raise CbxError(f"unknown model variant '{variant}' (expected one of {list(VARIANTS)})")
        self.variant = variant
        self.backend = backend

    def __len__(self) -> int:
        if self.variant == "turbo":
            return len(self.backend)
        return self.backend.tokenizer.get_vocab_size()

    def encode(self, text: str, language_id: str | None = None) -> list[int]:
        if self.variant == "multilingual":
            lang = check_language(language_id)
            return list(self.backend.encode(text, language_id=lang))
        if language_id not in (None, "en"):
            raise CbxError(f"language_id '{language_id}': the {self.variant} model speaks English only "
                           "(use the multilingual model for other languages)")
        if self.variant == "turbo":
            # Same call as tts_turbo.generate(): no special tokens are added by a GPT-2 tokenizer.
            return list(self.backend(text, truncation=True)["input_ids"])
        return list(self.backend.encode(text))

    def save(self, out_dir: str | Path) -> list[str]:
        """Write the tokenizer file(s) in the upstream layout; returns the names written."""
        out_dir = Path(out_dir)
        if self.variant == "turbo":
            return [Path(p).name for p in self.backend.save_pretrained(str(out_dir))]
        name = TOKENIZER_FILES[self.variant]
        self.backend.tokenizer.save(str(out_dir / name))
        return [name]


def check_language(language_id: str | None) -> str | None:
    """Lower-cased ``language_id`` if the multilingual model supports it, else :class:`CbxError`."""
    if language_id is None:
        return None
    from cbx.engine import upstream

    lang = str(language_id).lower()
    if lang not in upstream.SUPPORTED_LANGUAGES:
        raise CbxError(f"language_id '{language_id}' is not supported by the multilingual model "
                       f"(choose one of {', '.join(sorted(upstream.SUPPORTED_LANGUAGES))})")
    return lang


def load_tokenizer(variant: str, folder: str | Path) -> TextTokenizer:
    """The upstream tokenizer of ``variant`` read from a checkpoint ``folder`` (no download)."""

    folder = Path(folder)
    if variant == "turbo":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a bad folder
            raise CbxError(f"{folder}: cannot read the Turbo tokenizer files: {exc}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return TextTokenizer("turbo", tok)
    path = folder / TOKENIZER_FILES[variant]
    if not path.is_file():
        raise CbxError(f"{path}: missing tokenizer file")
    try:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise CbxError(f"{path}: not a valid tokenizer.json ({exc})") from None
    return TextTokenizer(variant, wrap_raw_tokenizer(variant, raw, folder))


def wrap_raw_tokenizer(variant: str, raw: Any, folder: str | Path | None = None) -> Any:
    """An upstream ``EnTokenizer``/``MTLTokenizer`` around an in-memory ``tokenizers.Tokenizer``.

    Upstream's constructors only take a file path, and ``MTLTokenizer``'s also downloads the
    Chinese Cangjie table from the Hub; we set the same attributes without either, reading the
    table from ``folder/Cangjie5_TC.json`` when the checkpoint has it.
    """
    from cbx.engine import upstream

    if variant == "original":
        tok = upstream.EnTokenizer.__new__(upstream.EnTokenizer)
    else:
        tok = upstream.MTLTokenizer.__new__(upstream.MTLTokenizer)
        tok.cangjie_converter = _cangjie_converter(folder)
    tok.tokenizer = raw
    vocab = raw.get_vocab()
    for special in ("[START]", "[STOP]"):
        if special not in vocab:
            raise CbxError(f"{folder or 'tokenizer'}: tokenizer has no '{special}' token")
    return tok


def _cangjie_converter(folder: str | Path | None) -> Any:
    import importlib

    from cbx.engine import upstream

    ChineseCangjieConverter = importlib.import_module(upstream.MTLTokenizer.__module__).ChineseCangjieConverter
    conv = ChineseCangjieConverter.__new__(ChineseCangjieConverter)
    conv.word2cj, conv.cj2word, conv.segmenter = {}, {}, None
    path = Path(folder) / "Cangjie5_TC.json" if folder is not None else None
    if path is not None and path.is_file():
        # Same table format upstream reads: a JSON list of "glyph<TAB>code..." strings.
        for entry in json.loads(path.read_text(encoding="utf-8")):
            word, code = entry.split("\t")[:2]
            conv.word2cj[word] = code
            conv.cj2word.setdefault(code, []).append(word)
        conv._init_segmenter()
    return conv


def t3_text_tokens(model: Any, text: str, language_id: str | None = None, normalize: bool = True) -> list[int]:
    """The text token ids upstream's ``generate()`` feeds T3 for ``text``.

    Original and multilingual: ``[start_text] + ids + [stop_text]``; Turbo: the ids alone.
    """
    if normalize:
        text = punc_norm(text, model.variant)
    ids = model.tokenizer.encode(text, language_id=language_id)
    if model.variant == "turbo":
        if not ids:
            raise CbxError(f"text {text!r} gives no tokens")
        return ids
    hp = model.t3.hp
    return [hp.start_text_token, *ids, hp.stop_text_token]


# A cut is whitespace after a sentence end (optionally followed by a closing quote or bracket,
# which stays with its sentence), or right after a CJK full stop, which needs no space.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?。！？])|(?<=[.!?。！？][\"'”’)\]]))\s+|(?<=[。！？])(?=\S)")
_CLAUSE_END = re.compile(r"(?<=[,;:，、；：])\s+")


def split_text(text: str, max_chars: int = DEFAULT_MAX_CHUNK_CHARS) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars`` characters.

    Cuts at sentence ends; a sentence longer than ``max_chars`` is cut at clause punctuation,
    and a clause still too long at the last space that fits (a word longer than ``max_chars``
    is cut hard). Whitespace is collapsed; empty text gives ``[]``.
    """
    if max_chars < 1:
        raise CbxError(f"max_chars={max_chars}: must be >= 1")
    text = " ".join(text.split())
    chunks: list[str] = []
    for sentence in filter(None, (s.strip() for s in _SENTENCE_END.split(text))):
        if len(sentence) <= max_chars:
            chunks.append(sentence)
            continue
        chunks.extend(_pack(_CLAUSE_END.split(sentence), max_chars, " "))
    return chunks


def _pack(pieces: list[str], max_chars: int, sep: str) -> list[str]:
    """Greedily join ``pieces`` with ``sep`` into chunks <= max_chars, splitting long pieces."""
    out: list[str] = []
    cur = ""
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        if len(piece) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.extend(_split_words(piece, max_chars))
            continue
        joined = f"{cur}{sep}{piece}" if cur else piece
        if len(joined) <= max_chars:
            cur = joined
        else:
            out.append(cur)
            cur = piece
    if cur:
        out.append(cur)
    return out


def _split_words(piece: str, max_chars: int) -> list[str]:
    out: list[str] = []
    cur = ""
    for word in piece.split(" "):
        while len(word) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(word[:max_chars])
            word = word[max_chars:]
        joined = f"{cur} {word}" if cur else word
        if len(joined) <= max_chars:
            cur = joined
        else:
            out.append(cur)
            cur = word
    if cur:
        out.append(cur)
    return out
