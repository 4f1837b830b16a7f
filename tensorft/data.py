"""Training data: local json / jsonl / csv / parquet files or a hub dataset, in one of the
formats below, checked row by row (a malformed row is reported with its file and row number).

=================  =====================================  ==================================
``data.format``    fields of a row                        what the trainer sees
=================  =====================================  ==================================
alpaca             instruction, input (optional), output  prompt (Alpaca template), completion
messages           messages: [{role, content}, ...]       prompt = all but the last message,
                   (the last one from the assistant)      completion = the last message
prompt-completion  prompt, completion (strings or         the same
                   message lists)
text               text                                   text (loss on every token)
preference         prompt, chosen, rejected (strings or   the same (DPO)
                   message lists)
=================  =====================================  ==================================

``data.columns`` maps a field to a differently named column (``{prompt: input}``).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Iterator

from .errors import TensorftError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class RowError(ValueError):
    """A row does not fit the format; the message says which field and why."""


# --------------------------------------------------------------------------- per-format rows


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # csv/parquet NaN
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{key}[{i}] must be {{role: str, content: str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_or_messages(row: dict, key: str) -> str | list[dict]:
    value = row.get(key)
    if isinstance(value, list):
        return _messages(value, key)
    return _text(row, key)


def alpaca(row: dict) -> dict:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=extra), "completion": _text(row, "output")}


def messages(row: dict) -> dict:
    msgs = _messages(row.get("messages"), "messages")
    if msgs[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (it is what the model learns)")
    if len(msgs) < 2:
        raise RowError("messages needs at least one message before the assistant's answer")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def prompt_completion(row: dict) -> dict:
    prompt, completion = _text_or_messages(row, "prompt"), _text_or_messages(row, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise RowError("prompt and completion must both be strings or both be message lists")
    return {"prompt": prompt, "completion": completion}


def text(row: dict) -> dict:
    return {"text": _text(row, "text")}


def preference(row: dict) -> dict:
    out = {k: _text_or_messages(row, k) for k in ("prompt", "chosen", "rejected")}
    if len({isinstance(v, list) for v in out.values()}) > 1:
        raise RowError("prompt, chosen and rejected must all be strings or all be message lists")
    return out


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": alpaca,
    "messages": messages,
    "prompt-completion": prompt_completion,
    "text": text,
    "preference": preference,
}
FORMATS = tuple(CONVERTERS)
# The fields each format reads (what data.columns may map).
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}


# --------------------------------------------------------------------------- reading


def _read_json_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON array of rows
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise TensorftError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
            for i, row in enumerate(rows, 1):
                yield i, row
            return
        for i, line in enumerate(f, 1):  # JSON lines; row number = line number
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise TensorftError(f"{path}: row {i}: invalid JSON ({e.msg})") from None


def _read_csv_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 1):
            yield i, row


def _read_parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors for a damaged file
        raise TensorftError(f"{path}: cannot read parquet ({e})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield i, row


READERS = {".json": _read_json_rows, ".jsonl": _read_json_rows, ".csv": _read_csv_rows, ".parquet": _read_parquet_rows}


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or os.path.exists(source)


def read_rows(
    source: str, fmt: str, key: str = "data.train", limit: int | None = None, columns: dict[str, str] | None = None
) -> list[dict]:
    """Rows of a local file (or a hub dataset id), converted to the trainer's columns.
    ``columns`` maps a format field to the column holding it."""
    if fmt not in CONVERTERS:
        raise TensorftError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    convert = CONVERTERS[fmt]
    columns = columns or {}
    out = []
    for where, row in _source_rows(source, key):
        if not isinstance(row, dict):
            raise TensorftError(f"{where}: expected an object with fields, got {type(row).__name__}")
        for field, column in columns.items():
            if column not in row:
                raise TensorftError(f"{where}: no column {column!r} (data.columns.{field})")
        try:
            out.append(convert({**row, **{field: row[column] for field, column in columns.items()}}))
        except RowError as e:
            raise TensorftError(f"{where}: {e} (data.format: {fmt})") from None
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TensorftError(f"{key}: {source} holds no rows")
    return out


def _source_rows(source: str, key: str) -> Iterator[tuple[str, Any]]:
    if is_local(source):
        if not os.path.isfile(source):
            raise TensorftError(f"{key}: {source}: no such file")
        suffix = os.path.splitext(source)[1]
        if suffix not in READERS:
            raise TensorftError(f"{key}: {source}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
        for i, row in READERS[suffix](source):
            yield f"{source}: row {i}", row
        return
    # A hub dataset id ("tatsu-lab/alpaca" or "name:split").
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub client raises many types (offline, missing, auth)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TensorftError(f"{key}: cannot load dataset {name!r}: {first}") from None
    for i, row in enumerate(ds, 1):
        yield f"{source}: row {i}", row


def load_dataset(
    source: str, fmt: str, key: str = "data.train", limit: int | None = None, columns: dict[str, str] | None = None
):
    """A ``datasets.Dataset`` with the trainer's columns for ``fmt``.

    Built into the datasets cache (keyed by the rows' content) rather than held in memory:
    derived data (tokenized rows, DPO's precomputed reference log-probs) is then cached beside
    it, where every rank finds what the main process wrote; an in-memory dataset would cache
    into a private temporary directory per process."""
    import datasets

    rows = read_rows(source, fmt, key, limit, columns)
    return datasets.Dataset.from_generator(_yield_rows, gen_kwargs={"rows": rows})


def _yield_rows(rows: list[dict]) -> Iterator[dict]:
    yield from rows
