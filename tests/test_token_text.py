"""The readable token form: visible whitespace, byte tokens instead of "�", specials as spelled."""

from __future__ import annotations

from compsae.lm.byte_tokenizer import byte_tokenizer
from compsae.lm.token_text import display_text, display_token, token_display


def test_byte_level_space_and_newline() -> None:
    assert display_token("Ġthe") == "·the"
    assert display_token("Ċ") == "↵"


def test_sentencepiece_space() -> None:
    assert display_token("▁the", byte_level=False) == "·the"


def test_partial_utf8_byte_is_a_byte_token() -> None:
    # "â" is byte-level BPE's stand-in for 0xE2, the first byte of a 3-byte character
    shown = display_token("â")
    assert shown == "<0xE2>"
    assert "\ufffd" not in shown


def test_special_and_byte_tokens_unchanged() -> None:
    for piece in ["<|endoftext|>", "<s>", "</s>", "<0x0A>"]:
        assert display_token(piece) == piece


def test_display_text_whitespace() -> None:
    assert display_text(" a\nb\tc") == "·a↵b⇥c"


def test_real_tokenizer_never_shows_replacement_char() -> None:
    tok = byte_tokenizer()
    show = token_display(tok)
    ids = tok(" the\n日本")["input_ids"]
    shown = [show(i) for i in ids]
    assert all("\ufffd" not in s for s in shown)
    assert shown[0] == "·" and "↵" in shown and "<0xE6>" in shown
