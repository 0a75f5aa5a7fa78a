"""Built-in models with seeded random weights: ``tiny`` ones for tests, full-size ones for benchmarks.

Why it is built this way: tests and CI must exercise the *real* upstream classes (T3, S3Gen,
VoiceEncoder, the upstream tokenizers) without any download, in about a second. So
:func:`build_tiny` instantiates the same classes at small sizes:

* T3's backbone is chosen by name from upstream's module-level ``LLAMA_CONFIGS`` dict, so we
  register small Llama / GPT-2 configs there (idempotently) and point ``T3Config`` at them.
* Upstream builds the T3 perceiver at width 1024 whatever the backbone; we replace it by the
  same upstream ``Perceiver`` class built at the small width.
* S3Gen comes from :func:`cbx.engine.tiny_s3gen.build_tiny_s3gen` (some of its widths cannot
  shrink); the voice encoder is full size (1.4M parameters).
* Text tokenizers are built in memory with the ``tokenizers`` library: a character-level one for
  the original and multilingual models (upstream's special tokens and language tags), a byte-level
  BPE with no merges wrapped as a Hugging Face GPT-2 tokenizer for Turbo.
* Random weights give a near-uniform speech-token distribution where EOS practically never
  wins. :func:`_shape_speech_head` makes it "speech-like": a peaked distribution over the real
  S3 tokens (< 6561), rare special tokens, and an EOS logit with a larger spread so that EOS
  wins at some step (typically after some tens of tokens), different for different inputs.
  Decoding tests then see real sequences that end by themselves.

The architecture goes into ``model.meta["tiny"]`` (and into the folder metadata when saved), so
:func:`cbx.engine.model.load_model` rebuilds the same skeleton before loading weights.
:func:`build_random` gives the *full-size* architecture with random weights for benchmarks.
"""

from __future__ import annotations

import copy
import string
import unicodedata
from typing import Any

import torch

from cbx.engine.model import ChatterboxModel, build_s3gen, build_t3
from cbx.errors import CbxError

TINY_WIDTH = 64
TINY_LAYERS = 2
TINY_HEADS = 4

# Real S3 speech tokens are 0..6560; 6561 = start, 6562 = stop (EOS), higher ids are unused.
SPEECH_VOCAB = 6561


def tiny_arch(variant: str, seed: int = 0, layers: int = TINY_LAYERS) -> dict:
    """The tiny architecture of ``variant`` as a JSON-able dict (see module docstring)."""
    from cbx.engine import upstream

    d, heads = TINY_WIDTH, TINY_HEADS
    if variant == "turbo":
        backbone = copy.deepcopy(upstream.LLAMA_CONFIGS["GPT2_medium"])
        backbone.update(n_embd=d, hidden_size=d, n_head=heads, n_layer=layers, n_ctx=2048, n_positions=2048)
        name = f"cbx_tiny_gpt2_{d}x{layers}"
        t3 = dict(max_text_tokens=256, max_speech_tokens=512)
        perceiver = None
    elif variant in ("original", "multilingual"):
        backbone = copy.deepcopy(upstream.LLAMA_CONFIGS["Llama_520M"])
        backbone.update(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=heads,
                        head_dim=d // heads, num_key_value_heads=heads // 2)
        name = f"cbx_tiny_llama_{d}x{layers}"
        t3 = dict(max_text_tokens=256, max_speech_tokens=512)
        perceiver = dict(query_tokens=32, width=d, heads=4)
    else:
        raise CbxError(f"unknown model variant '{variant}' (expected original, turbo or multilingual)")
    from cbx.engine.tiny_s3gen import tiny_s3gen_arch

    # Weights 10x larger than the usual 0.02 init, so attention and MLPs matter against the
    # N(0, 1) token embeddings: outputs then depend on text and voice, not only on the last token.
    backbone["initializer_range"] = 0.2
    return {"backbone_name": name, "backbone": backbone, "t3": t3, "perceiver": perceiver,
            "s3gen": {"seed": seed, "arch": tiny_s3gen_arch()}, "seed": seed}


def build_tiny(variant: str = "original", seed: int = 0) -> ChatterboxModel:
    """A small Chatterbox ``variant`` built from the upstream classes with seeded random weights.
    ``variant`` may also be a checkpoint name (:data:`cbx.engine.model.CHECKPOINTS`): ``nano`` is
    Turbo's architecture with a smaller backbone (here 3 tiny layers) and Nano's file names."""
    name, real = _checkpoint(variant)
    arch = tiny_arch(real, seed, layers=3 if name == "nano" else TINY_LAYERS)
    source = {"original": "tiny", "turbo": "tiny-turbo", "multilingual": "tiny-multilingual", "nano": "tiny-nano",
              "multilingual-v3": "tiny-multilingual"}[name]
    return _build(real, arch, seed, source=source, checkpoint=name)


def _checkpoint(variant: str) -> tuple[str, str]:
    from cbx.engine.model import CHECKPOINTS

    if variant not in CHECKPOINTS:
        raise CbxError(f"unknown model variant '{variant}' (expected one of {', '.join(CHECKPOINTS)})")
    return variant, CHECKPOINTS[variant].variant


def build_random(variant: str = "original", full_size: bool = True, seed: int = 0) -> ChatterboxModel:
    """Upstream's full-size architecture of ``variant`` with random weights (no download).

    The model source ``random:VARIANT``: it has the real sizes, key sets and costs, but says
    nothing sensible. Its text tokenizer is the tiny one (the real vocabulary is only on the
    Hub). ``full_size=False`` is :func:`build_tiny`. Saved with
    :func:`cbx.engine.model.save_upstream_layout` it is a folder in the upstream layout with no
    workbench metadata, loaded exactly as a Hub snapshot is.
    """
    if not full_size:
        return build_tiny(variant, seed)
    name, real = _checkpoint(variant)
    return _build(real, None, seed, source=f"random:{name}", checkpoint=name)


def _build(variant: str, arch: dict | None, seed: int, source: str, checkpoint: str | None = None) -> ChatterboxModel:
    from cbx.engine import upstream
    from cbx.engine.model import CHECKPOINTS, checkpoint_meta
    from cbx.engine.text import TextTokenizer, wrap_raw_tokenizer

    checkpoint = checkpoint or variant
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t3 = build_t3(variant, arch, backbone=None if arch else CHECKPOINTS[checkpoint].backbone)
        if variant == "turbo":
            del t3.tfmr.wte  # unused input embedding, as upstream's loader does
        _shape_speech_head(t3, seed)
        s3gen = build_s3gen(variant, arch["s3gen"] if arch else None)
        torch.manual_seed(seed + 1)
        ve = upstream.VoiceEncoder()
        conds = _random_conds(t3.hp, seed)
    if variant == "turbo":
        tokenizer = TextTokenizer("turbo", _gpt2_tokenizer())
    else:
        tokenizer = TextTokenizer(variant, wrap_raw_tokenizer(variant, _char_tokenizer(variant)))
    meta: dict[str, Any] = {"seed": seed, **checkpoint_meta(checkpoint)}
    if arch is not None:
        meta["tiny"] = arch
    else:
        meta["random_full_size"] = True
    return ChatterboxModel(t3, s3gen, ve, variant=variant, tokenizer=tokenizer, source=source,
                           builtin_conds=conds, meta=meta).eval()


@torch.no_grad()
def _shape_speech_head(t3: torch.nn.Module, seed: int) -> None:
    """Give random weights a speech-like next-token distribution (see module docstring)."""
    hp = t3.hp
    w = t3.speech_head.weight
    g = torch.Generator().manual_seed(seed + 7)
    d = w.shape[1]
    # Normalised hidden states have about unit scale per channel, so a row with std s/sqrt(d)
    # gives logits with std ~s: s = 2 makes a peaked distribution over the real tokens.
    w.copy_(torch.randn(w.shape, generator=g) * (2.0 / d**0.5))
    w[SPEECH_VOCAB:] *= 0.1
    w[hp.stop_speech_token] = torch.randn(d, generator=g) * (3.5 / d**0.5)
    if t3.speech_head.bias is not None:
        t3.speech_head.bias.zero_()
        t3.speech_head.bias[SPEECH_VOCAB:] = -2.0
        t3.speech_head.bias[hp.stop_speech_token] = 0.0


def _random_conds(hp: Any, seed: int) -> Any:
    """A built-in voice (``conds.pt`` equivalent) of 1 s with random content."""
    from cbx.engine import upstream

    g = torch.Generator().manual_seed(seed + 11)
    n_tok = 25
    spk = torch.randn(1, hp.speaker_embed_size, generator=g)
    t3_cond = upstream.T3Cond(
        speaker_emb=spk / spk.norm(),
        cond_prompt_speech_tokens=torch.randint(0, SPEECH_VOCAB, (1, n_tok), generator=g),
        emotion_adv=0.5 * torch.ones(1, 1, 1),
    )
    gen = dict(
        prompt_token=torch.randint(0, SPEECH_VOCAB, (1, n_tok), generator=g),
        prompt_token_len=torch.tensor([n_tok]),
        prompt_feat=torch.randn(1, 2 * n_tok, 80, generator=g) * 0.5 - 5.0,
        prompt_feat_len=None,
        embedding=torch.randn(1, 192, generator=g),
    )
    return upstream.Conditionals(t3_cond, gen)


# ----------------------------------------------------------------------------- tokenizers

_SPECIALS = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[START]": 255, "[PAD]": 256, "[SEP]": 257,
             "[CLS]": 258, "[MASK]": 259}


def _char_tokenizer(variant: str) -> Any:
    """Character-level ``tokenizers.Tokenizer`` with upstream's special-token ids ([START]=255,
    [STOP]=0); the multilingual one also has the ``[xx]`` language tags and NFKD combining marks."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    from cbx.engine import upstream

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    chars += [c for c in "àáâäçèéêëìíîïñòóôöùúûüßæøåœ"]
    if variant == "multilingual":
        chars += [chr(c) for c in range(0x300, 0x370)]  # combining marks left by NFKD
        chars += [chr(c) for c in range(0x3b1, 0x3ca)] + [chr(c) for c in range(0x430, 0x450)]
    chars = [c for c in dict.fromkeys(chars) if unicodedata.category(c) != "Cs"]
    vocab = dict(_SPECIALS)
    free = (i for i in range(3, 10_000) if i not in vocab.values())
    for c in chars:
        vocab[c] = next(free)
    specials = list(_SPECIALS)
    if variant == "multilingual":
        for lang in sorted(upstream.SUPPORTED_LANGUAGES):
            vocab[f"[{lang}]"] = next(free)
            specials.append(f"[{lang}]")
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def _gpt2_tokenizer() -> Any:
    """Byte-level BPE without merges (every byte a token) as a Hugging Face GPT-2 tokenizer."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    raw = Tokenizer(BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok
