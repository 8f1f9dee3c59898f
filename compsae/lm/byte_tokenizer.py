"""A byte-level tokenizer built in code: `tiny-neox` needs no download, not even a vocabulary.

Id 0 is `<|endoftext|>` (BOS = EOS, as in Pythia), ids 1..256 are the 256 bytes in the order of
the GPT-2 byte-to-unicode alphabet.  There are no merges, so every byte is one token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from compsae.lm.text_tokenizer import TextTokenizer

ENDOFTEXT = "<|endoftext|>"
VOCAB_SIZE = 257


def byte_tokenizer() -> TextTokenizer:
    """The 257-token byte-level tokenizer of `tiny-neox` (BOS = EOS = id 0)."""
    vocab = {ENDOFTEXT: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # name_or_path and add_bos_token keep transformer_lens from re-loading the tokenizer by name
    # (TransformerBridge rebuilds tokenizers without add_bos_token from the hub).
    return TextTokenizer(
        core,
        ENDOFTEXT,
        ENDOFTEXT,
        "compsae/byte-tokenizer",
        extra={"add_bos_token": True, "pad_token": ENDOFTEXT},
    )
