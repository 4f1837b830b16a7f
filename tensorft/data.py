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
multiple-choice    prompt, options (list of strings),     prompt, completion = the gold option
                   gold (index into options)              (appended as written: mind the space)
classification     text, label (class index)              text, label (``model.task: seq-cls``)
=================  =====================================  ==================================

``data.columns`` maps a field to a differently named column (``{prompt: input}``).

Multi-task (``data.tasks``): each task is read in its own format, capped, then mixed into one
training set by :func:`mix_counts` / :func:`mix_rows`; every row carries ``task_ids``, the
task's index in the config.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Iterator

from .config import FORMAT_FIELDS
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


def multiple_choice(row: dict) -> dict:
    options, gold = row.get("options"), row.get("gold")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise RowError("field 'options' must be a list of at least two non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise RowError(f"field 'gold' must be an index into options (0..{len(options) - 1}), got {gold!r}")
    return {"prompt": _text(row, "prompt"), "completion": options[gold]}


def classification(row: dict) -> dict:
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # csv cells are strings
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise RowError(f"field 'label' must be a class index (an integer >= 0), got {label!r}")
    return {"text": _text(row, "text"), "label": label}


def choice_row(row: dict) -> dict:
    """A multiple-choice row as rank classification scores it: checked as for training."""
    multiple_choice(row)
    return {"prompt": row["prompt"], "options": list(row["options"]), "gold": row["gold"]}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": alpaca,
    "messages": messages,
    "prompt-completion": prompt_completion,
    "text": text,
    "preference": preference,
    "multiple-choice": multiple_choice,
    "classification": classification,
}
FORMATS = tuple(CONVERTERS)
# The fields each format reads (what data.columns may map): declared with the config schema,
# which checks data.columns without importing this module (the core imports no training code).
FIELDS = FORMAT_FIELDS
assert set(FIELDS) == set(CONVERTERS), "every data.format needs its fields in tensorft.config.FORMAT_FIELDS"


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
    source: str, fmt: str, key: str = "data.train", limit: int | None = None, columns: dict[str, str] | None = None,
    convert: Callable[[dict], dict] | None = None,
) -> list[dict]:
    """Rows of a local file (or a hub dataset id), converted to the trainer's columns (or by
    ``convert``, which raises RowError as the format's converter does). ``columns`` maps a
    format field to the column holding it."""
    if fmt not in CONVERTERS:
        raise TensorftError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    convert = convert or CONVERTERS[fmt]
    columns = columns or {}
    section = key.rsplit(".", 1)[0]  # data, or data.tasks.NAME: where format and columns are set
    out = []
    for where, row in _source_rows(source, key):
        if not isinstance(row, dict):
            raise TensorftError(f"{where}: expected an object with fields, got {type(row).__name__}")
        for field, column in columns.items():
            if column not in row:
                raise TensorftError(f"{where}: no column {column!r} ({section}.columns.{field})")
        try:
            out.append(convert({**row, **{field: row[column] for field, column in columns.items()}}))
        except RowError as e:
            raise TensorftError(f"{where}: {e} ({section}.format: {fmt})") from None
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TensorftError(f"{key}: {source} holds no rows")
    return out


def _source_rows(source: str, key: str) -> Iterator[tuple[str, Any]]:
    if is_local(source):
        if not os.path.isfile(source):
            where = "" if os.path.isabs(source) else ", relative to the working directory"
            raise TensorftError(f"{key}: {source}: no such file (looked for {os.path.abspath(source)}{where})")
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
    return rows_to_dataset(read_rows(source, fmt, key, limit, columns))


def read_choice_rows(source: str, key: str, limit: int | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """Multiple-choice rows with their options and gold index (``prompt``, ``options``, ``gold``)."""
    return read_rows(source, "multiple-choice", key, limit, columns, convert=choice_row)


def rows_to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_generator(_yield_rows, gen_kwargs={"rows": rows})


def _yield_rows(rows: list[dict]) -> Iterator[dict]:
    yield from rows


# --------------------------------------------------------------------------- multi-task


def mix_counts(sizes: dict[str, int], mixing: str, temperature: float = 2.0) -> dict[str, int]:
    """Rows each task contributes to the mixed training set (same total as the tasks' rows).

    proportional: every row once; equal: the same share per task; temperature: shares
    ``p_i ~ n_i^(1/T)`` (T = 1 proportional, T -> inf equal). Shares are rounded by largest
    remainder so the counts add up to the total exactly."""
    if mixing == "proportional":
        return dict(sizes)
    if mixing == "equal":
        weights = {name: 1.0 for name in sizes}
    elif mixing == "temperature":
        weights = {name: n ** (1.0 / temperature) for name, n in sizes.items()}
    else:
        raise TensorftError(f"data.mixing: {mixing!r} is not one of proportional, equal, temperature")
    total, norm = sum(sizes.values()), sum(weights.values())
    exact = {name: total * w / norm for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def sample_indices(size: int, count: int, rng) -> list[int]:
    """``count`` row indices of a task with ``size`` rows: whole shuffled passes while the task
    is smaller than its share (so every row repeats floor or ceil times), then a random subset."""
    passes, rest = divmod(count, size)
    out = [int(i) for _ in range(passes) for i in rng.permutation(size)]
    return out + [int(i) for i in rng.permutation(size)[:rest]]


def mix_rows(task_rows: dict[str, list[dict]], mixing: str, temperature: float, seed: int) -> list[dict]:
    """The mixed, shuffled training rows, each with its task's ``task_ids`` (config order)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = mix_counts({name: len(rows) for name, rows in task_rows.items()}, mixing, temperature)
    mixed = [
        {**rows[i], "task_ids": task_id}
        for task_id, (name, rows) in enumerate(task_rows.items())
        for i in sample_indices(len(rows), counts[name], rng)
    ]
    return [mixed[i] for i in rng.permutation(len(mixed))]


def load_tasks(d, seed: int):
    """``data.tasks`` (``d``: the DataConfig): the mixed training set, the per-task evaluation
    sets (or None) and what went into the mix per task."""
    train = {
        name: read_rows(t.train, t.format, f"data.tasks.{name}.train", d.max_per_task, t.columns)
        for name, t in d.tasks.items()
    }
    check_same_shape(train)
    mixed = mix_rows(train, d.mixing, d.mixing_temperature, seed)
    evaluation = {
        name: rows_to_dataset(
            with_task_id(read_rows(t.eval, t.format, f"data.tasks.{name}.eval", d.max_eval_samples, t.columns), i)
        )
        for i, (name, t) in enumerate(d.tasks.items())
        if t.eval
    }
    mixed_counts = [0] * len(train)
    for row in mixed:
        mixed_counts[row["task_ids"]] += 1
    info = {
        "mixing": d.mixing,
        "tasks": {
            name: {"id": i, "rows": len(rows), "mixed": mixed_counts[i]} for i, (name, rows) in enumerate(train.items())
        },
    }
    return rows_to_dataset(mixed), evaluation or None, info


def with_task_id(rows: list[dict], task_id: int) -> list[dict]:
    return [{**row, "task_ids": task_id} for row in rows]


def row_shape(row: dict) -> tuple:
    """What the trainer sees of a converted row: its columns and whether each is a message list."""
    return tuple(sorted((key, isinstance(value, list)) for key, value in row.items()))


def check_same_shape(task_rows: dict[str, list[dict]]) -> None:
    """Tasks are trained as one data set: every task must give the trainer the same columns."""
    shapes = {name: row_shape(rows[0]) for name, rows in task_rows.items()}
    first = next(iter(shapes))
    for name, shape in shapes.items():
        if shape != shapes[first]:
            raise TensorftError(
                f"data.tasks.{name}: its rows give the trainer {_describe(shape)}, but data.tasks.{first}'s give "
                f"{_describe(shapes[first])}; every task must give the same (all text, all strings or all messages)"
            )


def _describe(shape: tuple) -> str:
    return ", ".join(f"{key} ({'messages' if is_list else 'string'})" for key, is_list in shape)
