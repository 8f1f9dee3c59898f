"""A `tokenizers.Tokenizer` with the few parts of transformers' tokenizer API that compsae uses.

Importing `transformers` costs a harvest about half a second of start-up before it has done
anything; the Rust `tokenizers` library it wraps imports in a hundredth of that.  The harvest only
ever encodes text without special tokens (`tokenizer(batch, add_special_tokens=False)`), reads the
BOS / EOS ids and the vocabulary size, and reports decode token ids: all of it is the Rust
tokenizer's own work, so the ids are the ones transformers' fast tokenizer gives for the same
`tokenizer.json` (`tests/test_text_tokenizer.py`).  Where a transformers tokenizer object is needed
(the transformer_lens wrapper), `to_transformers` builds one around the same Rust tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Encode / decode with a Rust tokenizer; `bos_token_id` / `eos_token_id` as transformers names
    them."""

    def __init__(
        self,
        core: Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        name_or_path: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        core.no_truncation()  # transformers turns both off for a call that asks for neither
        core.no_padding()
        # as transformers does with the special tokens it is given: text spelling one is that token
        special = [t for t in dict.fromkeys((bos_token, eos_token)) if t]
        core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self.core = core
        self.bos_token, self.eos_token = bos_token, eos_token
        self.name_or_path = name_or_path
        self.extra = dict(extra or {})  # further keyword arguments for `to_transformers`
        self.bos_token_id = core.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = core.token_to_id(eos_token) if eos_token is not None else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer | None:
        """The tokenizer of a Hugging Face model folder from its `tokenizer.json`, or None when the
        folder has none (only a slow tokenizer's files: transformers must build it)."""
        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            return None
        special: dict[str, Any] = {}
        for name in reversed(_CONFIG_FILES):  # tokenizer_config.json wins, as in transformers
            path = folder / name
            if path.is_file():
                special.update(json.loads(path.read_text()))
        core = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        return cls(
            core,
            _token_text(special.get("bos_token")),
            _token_text(special.get("eos_token")),
            str(folder),
        )

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = False,
        return_offsets_mapping: bool = False,
    ) -> dict[str, Any]:
        """`{"input_ids": ids}` of one text or `[ids, ...]` of a batch (and `offset_mapping`, the
        character span of each token, when asked); special tokens are never added."""
        if add_special_tokens:
            raise ValueError(
                "TextTokenizer encodes without special tokens only (add_special_tokens=False)"
            )
        one = isinstance(text, str)
        encodings = self.core.encode_batch([text] if one else text, add_special_tokens=False)
        out: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [list(e.offsets) for e in encodings]
        return {k: v[0] for k, v in out.items()} if one else out

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens kept, as transformers' default decode does)."""
        return self.core.decode(list(ids), skip_special_tokens=False)

    def __len__(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    def to_transformers(self) -> Any:
        """A transformers fast tokenizer over the same Rust tokenizer (imports transformers)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=self.core,
            name_or_path=self.name_or_path,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **self.extra,
        )
