"""Held-out accuracy of multiple-choice tasks by rank classification, during and after training.

A ``multiple-choice`` evaluation set (``data.eval``, or ``data.tasks.<name>.eval``) is scored as
the multi-task papers score it: every option's log-likelihood after the prompt, divided by its
number of tokens, and the best option is the model's answer. A task's rows run with that task's
id (``task_ids``), so a task-routed adapter is scored with each task's own routing; other
routing (T-REX's intuition) is computed by the kind from the input, as at inference.

The trainers log ``eval_<task>_accuracy`` (``eval_accuracy`` for one task) at every evaluation,
and the launcher writes the final numbers to ``eval_results.json``. Every rank scores the same
rows in the same batches: a sharded model (FSDP2, ZeRO-3) needs every rank in every forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import TensorftError


@dataclass
class ChoiceSet:
    """One task's held-out multiple-choice rows (``prompt``, ``options``, ``gold``)."""

    name: str | None  # the task's name; None for a single-task config
    task_id: int | None
    rows: list[dict]

    @property
    def metric(self) -> str:
        return "eval_accuracy" if self.name is None else f"eval_{self.name}_accuracy"


def choice_sets(cfg) -> list[ChoiceSet]:
    """The config's multiple-choice evaluation sets (empty when it has none)."""
    from .data import read_choice_rows

    d = cfg.data
    if not d.tasks:
        if d.eval and d.format == "multiple-choice":
            return [ChoiceSet(None, None, read_choice_rows(d.eval, "data.eval", d.max_eval_samples, d.columns))]
        return []
    names = list(cfg.adapter.tasks or d.tasks)  # a few-shot config's task is the adapter's last
    return [
        ChoiceSet(name, names.index(name), read_choice_rows(t.eval, f"data.tasks.{name}.eval", d.max_eval_samples, t.columns))
        for name, t in d.tasks.items()
        if t.eval and t.format == "multiple-choice"
    ]


def encode_options(tokenizer, prompt: str, options: list[str]) -> list[tuple[list[int], int]]:
    """Per option: the ids of prompt + option and where the option's tokens start. The start is
    where the tokenization of the prompt alone stops agreeing (trl tokenizes prompt and
    prompt + completion the same way), so a token merged across the boundary counts for the
    option; at least one prompt token is kept to predict the first option token."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    out = []
    for option in options:
        ids = tokenizer(prompt + option)["input_ids"]
        start = 0
        while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
            start += 1
        start = max(1, min(start, len(ids) - 1))
        out.append((ids, start))
    return out


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def option_scores(model: nn.Module, tokenizer, rows: list[dict], task_id: int | None = None,
                  batch_size: int = 16, device: torch.device | str | None = None) -> list[list[float]]:
    """Per row, per option: mean log-probability of the option's tokens after the prompt.

    Sequences are left-padded so that every option sits at the end of its row: the model then
    computes logits for the last positions only (``logits_to_keep``, where the model takes it)
    instead of a vocabulary-wide softmax over every prompt token."""
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [
        (i, ids, start)
        for i, row in enumerate(rows)
        for ids, start in encode_options(tokenizer, row["prompt"], row["options"])
    ]
    keep_logits = _accepts(model, "logits_to_keep")
    scores: list[list[float]] = [[] for _ in rows]
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        keep = max(len(ids) - start for _, ids, start in chunk) + 1  # option tokens + the one before
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in chunk], device=device)
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        if task_id is not None:
            kwargs["task_ids"] = torch.full((len(chunk),), task_id, dtype=torch.long)
        if keep_logits:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits[:, -keep:].float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j + 1
        targets = input_ids[:, -keep + 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for k, (i, ids, start) in enumerate(chunk):
            n = len(ids) - start  # the option's tokens are the last n
            scores[i].append(token_lp[k, -n:].mean().item())
    return scores


def accuracy(scores: list[list[float]], rows: list[dict]) -> float:
    right = sum(max(range(len(s)), key=s.__getitem__) == row["gold"] for s, row in zip(scores, rows))
    return right / len(rows)


def evaluate_choices(model: nn.Module, tokenizer, sets: list[ChoiceSet], batch_size: int = 16,
                     device=None) -> dict[str, float]:
    """``{metric name: accuracy}`` for every set, the model left in the mode it was in."""
    if not sets:
        return {}
    was_training = model.training
    model.eval()
    try:
        out = {}
        for choice_set in sets:
            scores = option_scores(model, tokenizer, choice_set.rows, choice_set.task_id, batch_size, device)
            out[choice_set.metric] = round(accuracy(scores, choice_set.rows), 6)
        return out
    except torch.OutOfMemoryError:
        raise TensorftError(
            f"rank-classification evaluation ran out of memory at batch size {batch_size} "
            "(lower train.batch_size or data.max_eval_samples)"
        ) from None
    finally:
        model.train(was_training)
