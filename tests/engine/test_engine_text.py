"""Text normalisation, tokenisation with start/stop tokens, and chunking of long text."""

from __future__ import annotations

import pytest

from cbx.engine import text as T
from cbx.errors import CbxError


def test_text_punc_norm_follows_each_variant():
    raw = "wait... what; really – yes"
    assert T.punc_norm(raw, "original") == "Wait,  what,  really - yes."  # upstream keeps the doubled spaces
    assert T.punc_norm(raw, "turbo") == "Wait... what; really - yes."
    assert T.punc_norm("你好", "multilingual") == "你好."
    assert T.punc_norm("你好。", "multilingual") == "你好。"
    assert T.punc_norm("", "turbo") == "You need to add some text for me to talk."
    with pytest.raises(CbxError, match="unknown model variant 'tts'"):
        T.punc_norm("x", "tts")


def test_text_t3_tokens_have_upstream_start_stop(tiny_model, tiny_turbo, tiny_multilingual):
    hp = tiny_model.t3.hp
    ids = T.t3_text_tokens(tiny_model, "hello world")
    assert ids[0] == hp.start_text_token == 255 and ids[-1] == hp.stop_text_token == 0
    assert ids[1:-1] == tiny_model.tokenizer.encode("Hello world.")
    space = tiny_model.tokenizer.backend.tokenizer.token_to_id("[SPACE]")
    assert space in ids  # upstream's EnTokenizer turns spaces into [SPACE]
    turbo = T.t3_text_tokens(tiny_turbo, "hello world")
    assert turbo == tiny_turbo.tokenizer.encode("Hello world.")  # Turbo: no start/stop tokens
    fr = T.t3_text_tokens(tiny_multilingual, "Bonjour", language_id="FR")
    tag = tiny_multilingual.tokenizer.backend.tokenizer.token_to_id("[fr]")
    assert fr[0] == 255 and fr[1] == tag and fr[-1] == 0
    with pytest.raises(CbxError, match="language_id 'xx' is not supported"):
        T.t3_text_tokens(tiny_multilingual, "Bonjour", language_id="xx")
    with pytest.raises(CbxError, match="English only"):
        T.t3_text_tokens(tiny_model, "Bonjour", language_id="fr")


def test_text_split_sentences_then_clauses_then_words():
    assert T.split_text("One. Two!  Three?") == ["One.", "Two!", "Three?"]
    assert T.split_text("   ") == []
    long = "alpha beta gamma, delta epsilon zeta, eta theta iota kappa lambda."
    chunks = T.split_text(long, max_chars=25)
    assert chunks == ["alpha beta gamma,", "delta epsilon zeta,", "eta theta iota kappa", "lambda."]
    assert all(len(c) <= 25 for c in chunks)
    assert T.split_text("x" * 12, max_chars=5) == ["xxxxx", "xxxxx", "xx"]
    text = "First sentence here. " * 30
    chunks = T.split_text(text, max_chars=300)
    assert len(chunks) == 30 and " ".join(chunks) == text.strip()
    assert T.split_text("他来了。她也来了。") == ["他来了。", "她也来了。"]
    assert T.split_text('He said "Hi." Then (he left.) Done') == ['He said "Hi."', "Then (he left.)", "Done"]
    with pytest.raises(CbxError, match="max_chars=0"):
        T.split_text("a", 0)
