"""One readable form for a token, shared by the report, the browser and the rater pages.

A token shown as decoded text loses what a reader needs: a leading space is invisible, a newline
breaks the line, and a token holding part of a multi-byte character decodes to "�".  Shown here:

* a space as `·` (byte-level BPE `Ġ`, SentencePiece `▁`), a newline as `↵` (`Ċ`), a tab as `⇥`,
  a carriage return as `␍`;
* a byte that is not a whole UTF-8 character (or any other control byte) as `<0x0A>`, the
  SentencePiece byte-token spelling; never "�";
* special tokens (`<|endoftext|>`, `<s>`) as they are spelled.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Callable
from typing import Any

WHITESPACE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>|</?s>|<unk>|<pad>")
_ERRORS = "compsae-byte-tokens"


def _byte_tokens(err: UnicodeDecodeError) -> tuple[str, int]:
    bad = err.object[err.start : err.end]
    return "".join(f"<0x{b:02X}>" for b in bad), err.end


codecs.register_error(_ERRORS, _byte_tokens)


@functools.cache
def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (`Ġ` for 0x20, `Ċ` for 0x0A) -> the byte.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, 0x7F-0xA0, 0xAD) are
    given the code points from U+0100 on, in byte order: the GPT-2 scheme the tokenizers use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


def display_text(text: str) -> str:
    """Decoded text in the readable form: whitespace as `·` `↵` `⇥` `␍`, other control characters
    as byte tokens, and "�" (a byte the decoder could not place) as `<?>`."""
    out = []
    for ch in text:
        if ch in WHITESPACE:
            out.append(WHITESPACE[ch])
        elif ch == "\ufffd":
            out.append("<?>")  # the byte is already lost here; display_token keeps it
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"<0x{ord(ch):02X}>")
        else:
            out.append(ch)
    return "".join(out)


def display_token(piece: str, byte_level: bool = True) -> str:
    """A vocabulary piece (what `convert_ids_to_tokens` gives) in the readable form.

    `Ġthe` -> `·the`, `Ċ` -> `↵`, `▁the` -> `·the`, `<0x0A>` and special tokens unchanged; with
    `byte_level`, a piece made of byte-level BPE characters is turned back into its bytes, shown as
    text where they are whole UTF-8 characters and as `<0xE2>` byte tokens where not."""
    if _SPECIAL.fullmatch(piece) or _BYTE_TOKEN.fullmatch(piece):
        return piece.upper().replace("0X", "0x") if _BYTE_TOKEN.fullmatch(piece) else piece
    alphabet = byte_alphabet()
    if byte_level and piece and all(ch in alphabet for ch in piece):
        raw = bytes(alphabet[ch] for ch in piece)
        return display_text(raw.decode("utf-8", errors=_ERRORS))
    return display_text(piece.replace("▁", " "))


def token_display(tok: Any) -> Callable[[int], str]:
    """Token id -> readable form for a tokenizer (a transformers tokenizer, a `tokenizers.Tokenizer`
    or compsae's `TextTokenizer`), read from its vocabulary pieces so no byte is lost to "�"."""
    core = getattr(tok, "core", tok)
    if hasattr(tok, "convert_ids_to_tokens"):
        def piece(i: int) -> str | None:
            return tok.convert_ids_to_tokens(i)
    elif hasattr(core, "id_to_token"):
        def piece(i: int) -> str | None:
            return core.id_to_token(i)
    else:
        return lambda i: display_text(tok.decode([i]))
    vocab = {}
    get_vocab = getattr(core, "get_vocab", None)
    if callable(get_vocab):
        vocab = get_vocab()
    # byte-level BPE spells a space `Ġ`; SentencePiece vocabularies have `▁` and byte tokens
    byte_level = "Ġ" in vocab or not vocab

    def show(i: int) -> str:
        p = piece(int(i))
        return f"<{i}>" if p is None else display_token(p, byte_level)

    return show
