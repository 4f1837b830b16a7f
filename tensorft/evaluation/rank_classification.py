"""Rank classification for lm-eval multiple-choice tasks: log-likelihood per token.

The multi-task papers score each answer choice by its log-likelihood divided by its number of
tokens and pick the best one. lm-eval's own metrics differ: ``acc`` uses the raw sum,
``acc_norm`` divides by the number of *characters* and ``acc_bytes`` by UTF-8 bytes. This module
adds ``acc_norm_tok``: the sum divided by the number of tokens lm-eval scored for the choice.

Tokens are counted with the evaluated model's tokenizer, split the way lm-eval splits context and
continuation (trailing whitespace of the context moves to the continuation; the continuation is
what ``encode(context + continuation)`` adds after ``encode(context)``), with the context taken
as the document's ``doc_to_text`` (few-shot examples and descriptions come before it and do not
move that boundary).

A task opts in with ``class: !function _tensorft.RankClassificationTask`` (see
``evaluation/tasks``) and ``- metric: acc_norm_tok`` in its ``metric_list``. The tokenizer is
found in the task metadata, which lm-eval fills from ``--model_args`` (``tokenizer``, else
``base``, else ``pretrained``; a tensorft adapter directory stands for its base model) or
``--metadata``.

This file is also loaded by path from ``evaluation/tasks/_tensorft.py``, so it imports nothing
from the ``evaluation`` package.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import numpy as np

METRIC = "acc_norm_tok"


def continuation_token_counts(tokenizer, context: str, continuations: Sequence[str]) -> list[int]:
    """How many tokens lm-eval scores for each continuation after ``context``."""
    counts = []
    for continuation in continuations:
        ctx, cont = context, continuation
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:  # lm-eval keeps word-boundary spaces with the continuation
            ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
        whole = tokenizer.encode(ctx + cont, add_special_tokens=False)
        head = tokenizer.encode(ctx, add_special_tokens=False) if ctx else []
        counts.append(max(len(whole) - len(head), 1))
    return counts


def rank_classify(loglikelihoods: Sequence[float], token_counts: Sequence[int]) -> int:
    """Index of the choice with the highest log-likelihood per token (first one on ties)."""
    return int(np.argmax(np.asarray(loglikelihoods, dtype=np.float64) / np.asarray(token_counts, dtype=np.float64)))


def _tokenizer_source(metadata: dict) -> str | None:
    for key in ("tokenizer", "base", "pretrained", "adapter"):  # base: the wrapper's --base
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return _base_of_adapter(value)
    return None


def _base_of_adapter(path: str) -> str:
    """A tensorft adapter directory names its base model; anything else is returned as is."""
    config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            raw = json.load(f)
        if "peft_type" not in raw:
            return (raw.get("model") or {}).get("name_or_path") or raw.get("base_model_name_or_path") or path
    return path


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _register_metric() -> None:
    # Importing lm_eval.api.metrics first matters: lm-eval fills its metric registry lazily only
    # while the registry is empty, so registering ours first would hide the built-in metrics.
    import lm_eval.api.metrics  # noqa: F401
    from lm_eval.api.registry import metric_registry, register_metric

    if METRIC in metric_registry:  # this file may be loaded twice (by path and as a module)
        return

    @register_metric(metric=METRIC, higher_is_better=True, output_type="multiple_choice", aggregation="mean")
    def acc_norm_tok_fn(items):  # per-document 0/1 values, averaged by lm-eval
        return items


_register_metric()

from lm_eval.api.task import ConfigurableTask  # noqa: E402


class RankClassificationTask(ConfigurableTask):
    """A YAML task (``class: !function ...``) whose multiple-choice results add ``acc_norm_tok``."""

    def __init__(self, config: dict | None = None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)

    def _tokenizer(self):
        from tensorft.errors import TensorftError

        source = _tokenizer_source(self.config.metadata or {})
        if source is None:
            raise TensorftError(
                f"{self.config.task}: {METRIC} counts tokens with the model's tokenizer; pass "
                "--model_args pretrained=... (or tokenizer=...), or --metadata tokenizer=DIR"
            )
        return _load_tokenizer(source)

    def process_results(self, doc, results):
        out = super().process_results(doc, results)
        if self.OUTPUT_TYPE != "multiple_choice" or METRIC not in self._metric_fn_list or self.multiple_input:
            return out
        choices = self.doc_to_choice(doc)
        lls = [ll for ll, _ in results][: len(choices)]  # acc_mutual_info appends unconditional ones
        context = self.doc_to_text(doc)
        delimiter = self.config.target_delimiter
        counts = continuation_token_counts(self._tokenizer(), context, [delimiter + c for c in choices])
        pred = rank_classify(lls, counts)
        gold = self.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
        golds = gold if isinstance(gold, list) else [gold]
        out[METRIC] = 1.0 if pred in golds else 0.0
        return out
