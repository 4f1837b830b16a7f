"""Training and rank-classification evaluation of one adapter on multiple-choice rows.

Everything runs in-process: the base model is loaded once and every run trains a deep copy of
it (a memory copy, ~0.3 s for SmolLM2-135M), so no run can see another run's adapter.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn


class BenchError(Exception):
    """Bad input (arguments, data rows, a results folder of another model): one line, exit 2."""


@dataclass
class Encoded:
    """A row tokenized once: each option's ids after the prompt and where its tokens start."""

    options: list[list[int]]  # prompt + option ids, per option
    starts: list[int]  # index of each option's first token
    gold: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode(tokenizer, rows: list[dict]) -> list[Encoded]:
    """Tokenize prompt and prompt + option; an option's tokens start where the two diverge
    (as trl does for prompt-completion rows), so merges across the boundary are handled."""
    out = []
    for i, row in enumerate(rows):
        prompt = tokenizer(row["prompt"])["input_ids"]
        fulls = [tokenizer(row["prompt"] + option)["input_ids"] for option in row["options"]]
        starts = [max(1, _common_prefix(prompt, full)) for full in fulls]
        for option, full, start in zip(row["options"], fulls, starts):
            if start >= len(full):  # nothing to score: the option merged into the prompt's tokens
                raise BenchError(f"row {i}: option {option!r} adds no token of its own after the prompt {row['prompt']!r}")
        out.append(Encoded(fulls, starts, row["gold"]))
    return out


def _left_padded(inputs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Model inputs, left-padded so that every row's option tokens sit at the end: the model
    then computes logits for the last positions only (``logits_to_keep``), skipping the LM
    head (~20% of SmolLM2's compute) and the vocabulary-wide softmax over the prompts."""
    width = max(map(len, inputs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in inputs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in inputs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as without padding
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _target(row: Encoded, j: int) -> list[int]:
    return row.options[j][row.starts[j]:]


def option_logits(model: nn.Module, inputs: list[list[int]], keep: int, pad: int) -> torch.Tensor:
    """Logits [batch, keep, vocab] predicting the tokens after each input's last ``keep`` positions."""
    return model(**_left_padded(inputs, pad), logits_to_keep=keep).logits.float()


# --------------------------------------------------------------------------- evaluation


@dataclass
class Reads:
    """What scoring one row reads: the prefix its options' inputs share (read once, its keys and
    values then serve every option), then each distinct rest of an input (prompt + option
    without its last token) -> the options it scores. Options that share a whole input (every
    one-token option of a prompt) share one rest."""

    prefix: list[int]
    rests: dict[tuple[int, ...], list[int]]

    def tokens(self) -> int:
        return len(self.prefix) + sum(map(len, self.rests))


def option_inputs(data: list[Encoded]) -> list[Reads]:
    """Per row, what ``option_scores`` reads. The prefix stops before the earliest option
    start's predicting position, so each option's scored positions all lie in its rest."""
    out = []
    for row in data:
        inputs = [full[:-1] for full in row.options]
        shared = min([min(row.starts) - 1] + [_common_prefix(inputs[0], x) for x in inputs[1:]])
        rests: dict[tuple[int, ...], list[int]] = {}
        for j, x in enumerate(inputs):
            rests.setdefault(tuple(x[shared:]), []).append(j)
        out.append(Reads(inputs[0][:shared], rests))
    return out


def _chunks(reads: list[Reads], batch_size: int) -> list[list[int]]:
    """Row indices per forward pair, at most ``batch_size`` rests each (one row may exceed it
    alone); rows of similar prefix length together (little padding), empty prefixes apart."""
    order = sorted(range(len(reads)), key=lambda i: (len(reads[i].prefix), max(map(len, reads[i].rests))))
    chunks: list[list[int]] = []
    width = 0
    for i in order:
        n = len(reads[i].rests)
        if chunks and width + n <= batch_size and bool(reads[chunks[-1][0]].prefix) == bool(reads[i].prefix):
            chunks[-1].append(i)
            width += n
        else:
            chunks.append([i])
            width = n
    return chunks


def _take(inputs: dict[str, torch.Tensor] | None, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value[index] for name, value in (inputs or {}).items()}


def option_scores(model: nn.Module, data: list[Encoded], pad: int, batch_size: int = 32,
                  row_inputs: dict[str, torch.Tensor] | None = None) -> list[list[float]]:
    """Mean log-probability per token of every option after its prompt.

    Per chunk of rows: one forward of the rows' shared prefixes (left-padded) fills a key/value
    cache, whose rows are then repeated for each row's rests (``option_inputs``), read in one
    right-padded forward after it. A long prompt with many options (intent_recognition: 7) is
    read once, not once per option. ``row_inputs``: name -> one entry per row of ``data``,
    passed to both forwards for the rows they hold (routing inputs: ``task_ids``, T-REX's
    ``intuition``, ttmoe's ``expert_ids``)."""
    from transformers import DynamicCache

    reads = option_inputs(data)
    scores = [[float("-inf")] * len(row.options) for row in data]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for chunk in _chunks(reads, batch_size):
            cache, prefix_mask, offsets = None, None, torch.zeros(len(chunk), dtype=torch.long)
            if reads[chunk[0]].prefix:
                batch = _left_padded([reads[i].prefix for i in chunk], pad)
                cache = DynamicCache(config=getattr(model, "config", None))
                model(**batch, **_take(row_inputs, torch.tensor(chunk)), past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
                prefix_mask = batch["attention_mask"]
                offsets = prefix_mask.sum(-1)
            owners = [(c, rest, reads[i].rests[rest]) for c, i in enumerate(chunk) for rest in reads[i].rests]
            index = torch.tensor([c for c, _, _ in owners])
            width = max(len(rest) for _, rest, _ in owners)
            ids = torch.tensor([list(rest) + [pad] * (width - len(rest)) for _, rest, _ in owners])
            mask = torch.tensor([[1] * len(rest) + [0] * (width - len(rest)) for _, rest, _ in owners])
            positions = offsets[index, None] + torch.arange(width)
            if cache is not None:
                cache.reorder_cache(index)  # each row's prefix once per rest that follows it
                mask = torch.cat([prefix_mask[index], mask], dim=-1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=cache is not None, **_take(row_inputs, torch.tensor(chunk)[index])).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, (c, rest, options) in enumerate(owners):
                i = chunk[c]
                for j in options:
                    target = torch.tensor(_target(data[i], j))
                    first = data[i].starts[j] - 1 - len(reads[i].prefix)
                    picked = logprobs[r, first:first + len(target)].gather(1, target[:, None])
                    scores[i][j] = picked.mean().item()
    model.train(was_training)
    return scores


def accuracy(scores: list[list[float]], data: list[Encoded]) -> float:
    """Share of rows whose best-scoring option is the gold one (the first on ties)."""
    hits = sum(max(range(len(s)), key=lambda j: (s[j], -j)) == row.gold for s, row in zip(scores, data))
    return hits / len(data)


def evaluate(model: nn.Module, data: list[Encoded], pad: int, row_inputs: dict[str, torch.Tensor] | None = None) -> float:
    return accuracy(option_scores(model, data, pad, row_inputs=row_inputs), data)


# --------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    steps: int = 70
    batch: int = 8
    warmup: int = 5  # linear warmup steps, then linear decay to 0
    max_grad_norm: float = 1.0


def batches(n_rows: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Row indices per step: seeded reshuffles of the whole train split, epoch after epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch:
            epoch = list(range(n_rows))
            rng.shuffle(epoch)
            order += epoch
        out.append(order[:batch])
        order = order[batch:]
    return out


def gold_loss(model: nn.Module, data: list[Encoded], indices: list[int], pad: int) -> torch.Tensor:
    """Mean cross-entropy over the gold options' tokens (the prompt is not trained on)."""
    targets = [_target(data[i], data[i].gold) for i in indices]
    keep = max(map(len, targets))
    logits = option_logits(model, [data[i].options[data[i].gold][:-1] for i in indices], keep, pad)
    labels = torch.tensor([[-100] * (keep - len(t)) + t for t in targets])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def schedule(settings: TrainSettings):
    """Linear warmup to the peak lr, then linear decay to 0 at the last step."""

    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - settings.warmup))

    return factor


def train(model: nn.Module, groups: list[dict], data: list[Encoded], settings: TrainSettings, seed: int,
          pad: int, on_step=None) -> list[float]:
    """AdamW on ``groups`` (each keeps its own lr) for ``settings.steps`` steps; the losses.
    ``on_step(step, loss)`` is called after every step (progress of runs that take minutes)."""
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    params = [p for g in groups for p in g["params"]]
    model.train()
    losses = []
    for indices in batches(len(data), settings.steps, settings.batch, seed):
        loss = gold_loss(model, data, indices, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), losses[-1])
        if not math.isfinite(losses[-1]):
            break
    model.eval()
    return losses


def fresh_copy(base: nn.Module) -> nn.Module:
    """An independent copy of the frozen base for one run (adapters never leak between runs)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
