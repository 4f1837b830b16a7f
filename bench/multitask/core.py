"""The multi-task benchmark's runs: the task mixture, one adapter trained on it, and per-task
held-out accuracy with each task's own task id.

Training and evaluation are bench/learning_quality's (``engine.train``, ``engine.evaluate``,
``methods.attach``); what is added here is where the task ids come from:

* training: the mixture's rows carry their task id (:class:`TaskRow`). ``engine.train`` hands
  the model only token ids, so routed kinds train through :class:`RowRouted`, which looks each
  row's id up from its (unpadded) tokens and calls ``model(..., task_ids=ids)`` per row;
* evaluation: one task at a time, inside ``tensorft.task_context(model, id)``.

T-REX (``trex``) routes by each example's intuition instead of a task id, and is fed the way the
launcher feeds it (``tensorft.train.run`` -> ``tensorft.intuition.add_intuition``): the prompt
text of every mixture row (``tensorft.intuition.prompt_text``) is embedded and clustered by
``tensorft.intuition.compute`` (cached in ``OUT/intuition/``), the centroids go into the adapter
(``kind.set_intuition``), and each training row carries its scores (``model(..., intuition=)``,
looked up per row like the task ids). Evaluation gives each scored row its prompt's intuition
(``kind.routing_for_prompts``, what the lm-eval wrapper does), as training embeds the prompt only.

TT-LoRA MoE (``ttmoe``, :meth:`MultiTaskBench.run_ttmoe`): stage 1 trains one ``tt`` expert per
task on that task's rows only (each with the step budget of one mixture run) and saves it with
``tensorft.save`` (a normal adapter, as ``tensorft.experts`` writes); stage 2 attaches
``{"kind": "ttmoe", "experts": [dirs]}`` and trains only its router on the mixture, from the
router's ``router_ce`` auxiliary loss (``tensorft.collect_aux_losses``; a stage-2 step is one
base pass over the prompts, no expert pass). Evaluation routes each row once from its prompt
(``kind.route``, the clean router) and scores every option with that expert (``expert_ids=``).

Each finished run is one JSON file ``OUT/runs/<method>@<targets>/lr<lr>-seed<seed>.json``
(zero-shot: ``OUT/runs/zero-shot.json``), written atomically once complete, so a rerun skips
finished runs. A run records its setup (tasks, steps, batch, evaluated rows); a folder holding
runs of another setup is refused rather than mixed into one table.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.learning_quality import engine, protocol
from bench.learning_quality.methods import TARGETS, Method, attach, tensorft_kind

# Rank 8 for the LoRA family (lora, poly, mhr: poly / mhr at their shipped 8 skills, mhr 8
# heads) and the TLoRA family (tlora R=1, tensorpoly1/2 R=8, order 2: the paper's best);
# cp at r=64 (~1/10 of LoRA r=8 on q,v, as in the learning-quality quick set).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        tensorft_kind("lora", 8),
        tensorft_kind("poly", 8),
        tensorft_kind("mhr", 8),
        tensorft_kind("tlora", 8),
        tensorft_kind("tensorpoly1", 8),
        tensorft_kind("tensorpoly2", 8),
        tensorft_kind("cp", 64),
    )
}
# T-REX at its shipped 4 x 8 (32 rank-one experts from I = 4 output and J = 8 input vectors:
# the paper's main setting, which it compares against LoRA r=32); lora r=32 as that baseline;
# T-REX 2 x 4 (8 experts) has LoRA r=8's parameter count on q,v (460,860 vs 460,800).
# TT-LoRA MoE over tt r=4 experts (learning-quality's tt-r4 shapes, ~1/9 of LoRA r=8 each).
METHODS.update({
    m.name: m
    for m in (
        tensorft_kind("lora", 32),
        Method("trex-4x8", "tensorft", "trex", 8, {"rank_out": 4}),
        Method("trex-2x4", "tensorft", "trex", 4, {"rank_out": 2}),
        Method("ttmoe-tt4", "tensorft", "ttmoe", 4),
    )
})
# The papers' claims: routed vs the shared dense adapter of its family, by kind -> the shared
# methods (by name) it is compared with. T-REX's paper compares with LoRA r=32; TT-LoRA MoE's
# with its own experts (``tt-experts-r4``, written by the ttmoe run) and a shared LoRA.
SHARED_BASELINE = {"poly": ("lora-r8",), "mhr": ("lora-r8",), "tensorpoly1": ("tlora-r8",),
                   "tensorpoly2": ("tlora-r8",), "trex": ("lora-r8", "lora-r32"),
                   "ttmoe": ("tt-experts-r4", "lora-r8")}
# Stage 2 of ttmoe: router steps per mixture-run step (a router step is one no-grad base pass
# over the batch's prompts plus a (hidden x E) linear map: ~1/3 of a training step or less).
ROUTER_STEPS_PER_STEP = 5


def is_routed(kind: str) -> bool:
    """A task-routed kind: its options have ``n_tasks`` (read from the registry, so a new routed
    kind needs no entry here)."""
    from tensorft.registry import adapter_kind

    options_cls = getattr(adapter_kind(kind), "options_cls", None)
    return options_cls is not None and "n_tasks" in {f.name for f in dataclasses.fields(options_cls)}


def for_tasks(method: Method, tasks: list[str]) -> Method:
    """A routed method configured for ``tasks`` (ids in list order, names saved with it)."""
    if method.family != "tensorft" or not is_routed(method.kind):
        return method
    return dataclasses.replace(method, options={**method.options, "n_tasks": len(tasks), "tasks": list(tasks)})


# --------------------------------------------------------------------------- data


@dataclass
class TaskRow(engine.Encoded):
    """An encoded row of the mixture, with the id of the task it came from and (T-REX) its
    prompt text."""

    task: int = 0
    prompt: str = ""


@dataclass
class PromptRow(engine.Encoded):
    """An encoded row with its prompt's text as tensorft's intuition embeds it."""

    prompt: str = ""


def encode(tokenizer, rows: list[dict]) -> list[PromptRow]:
    """``engine.encode`` (the same token ids), each row keeping its prompt text as T-REX's
    training embeds it (``tensorft.intuition.prompt_text``: rendered back from the ids)."""
    from tensorft.intuition import prompt_text

    return [PromptRow(e.options, e.starts, e.gold, prompt=prompt_text({"prompt": r["prompt"]}, tokenizer))
            for e, r in zip(engine.encode(tokenizer, rows), rows)]


def prompt_of(row: engine.Encoded, tokenizer) -> str:
    """A row's prompt text: the one it carries, else its prompt tokens decoded."""
    if getattr(row, "prompt", ""):
        return row.prompt
    return tokenizer.decode(row.options[row.gold][:row.starts[row.gold]], skip_special_tokens=True)


def prompt_ids(row: engine.Encoded) -> list[int]:
    """The prompt's token ids (shared by all options: up to the earliest option start)."""
    return row.options[row.gold][:min(row.starts)]


def mixture(train: dict[str, list[engine.Encoded]], mixing: str = "proportional", seed: int = 0) -> list[TaskRow]:
    """The training rows of every task, mixed by tensorft's multi-task rule (``tensorft.data.
    mix_rows``: the same one ``data.tasks`` training uses), each tagged with its task id."""
    from tensorft.data import mix_rows

    mixed = mix_rows({name: [{"row": r} for r in rows] for name, rows in train.items()}, mixing, 2.0, seed)
    return [TaskRow(m["row"].options, m["row"].starts, m["row"].gold, task=m["task_ids"],
                    prompt=getattr(m["row"], "prompt", "")) for m in mixed]


class RowInputs(nn.Module):
    """``model`` called with per-row routing inputs, looked up from each row's tokens.

    ``engine.train`` builds batches from row indices it never passes on; a row's input tokens
    (prompt + gold option, less its last token) identify it (evaluation takes the per-row inputs
    itself: ``engine.option_scores(row_inputs=)``). ``keys[i]``: the inputs of row i; ``inputs``:
    name -> tensor with one entry per row (``task_ids``, ``intuition``, ``expert_ids``). An
    input that two rows with different routing inputs share would be ambiguous and is refused."""

    def __init__(self, model: nn.Module, keys: list[list[tuple[int, ...]]], inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.index: dict[tuple[int, ...], int] = {}
        for i, row_keys in enumerate(keys):
            for key in row_keys:
                j = self.index.setdefault(key, i)
                if j != i and any(not torch.equal(v[j], v[i]) for v in inputs.values()):
                    raise ValueError(f"the same input is in rows {j} and {i} with different routing inputs "
                                     f"({', '.join(inputs)})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        rows = torch.tensor([self.index[k] for k in keys])
        picked = {name: value[rows] for name, value in self.inputs.items()}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **picked, **kwargs)


def gold_keys(rows: list[engine.Encoded]) -> list[list[tuple[int, ...]]]:
    return [[tuple(r.options[r.gold][:-1])] for r in rows]


class RowRouted(RowInputs):
    """``model`` called with one task id per row (and any ``inputs``, one per row), looked up
    from the row's training input (prompt + gold option, less its last token). An input that
    two tasks share would be ambiguous and is refused."""

    def __init__(self, model: nn.Module, rows: list[TaskRow], inputs: dict[str, torch.Tensor] | None = None,
                 task_ids: bool = True):
        routing = {"task_ids": torch.tensor([r.task for r in rows])} if task_ids else {}
        try:
            super().__init__(model, gold_keys(rows), {**routing, **(inputs or {})})
        except ValueError:
            raise ValueError("the same training input is in two tasks (or rows with different routing inputs)") from None


def evaluate_tasks(model: nn.Module, data: dict[str, list[engine.Encoded]], pad: int,
                   task_ids: dict[str, int] | None, row_inputs=None) -> dict[str, float]:
    """Accuracy per task; ``task_ids`` (routed kinds): the id each task is evaluated with;
    ``row_inputs(task, rows)``: per-row routing inputs (name -> one entry per row) every option
    of a row is scored with (T-REX's intuition, ttmoe's expert choice)."""
    import tensorft

    out = {}
    for name, rows in data.items():
        inputs = None if row_inputs is None else row_inputs(name, rows)
        if task_ids is None:
            out[name] = engine.evaluate(model, rows, pad, inputs)
        else:
            with tensorft.task_context(model, torch.tensor([task_ids[name]])):
                out[name] = engine.evaluate(model, rows, pad, inputs)
    return out


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    method: Method
    targets: str
    lr: float
    lr_multiplier: float
    seed: int

    def path(self, out: str) -> str:
        return os.path.join(out, "runs", f"{self.method.name}@{self.targets}", f"lr{self.lr:g}-seed{self.seed}.json")


def grid(methods: list[Method], targets: list[str], base_lr: float, mode: str, seeds: list[int]) -> list[RunSpec]:
    """The learning-quality lr protocol: each multiplier of the mode's grid, each seed."""
    return [RunSpec(m, t, base_lr * mult, mult, s)
            for m in methods for t in targets for mult in protocol.LR_MULTIPLIERS[mode] for s in seeds]


class SetupMismatch(Exception):
    pass


@dataclass
class MultiTaskBench:
    """What every run shares: the frozen base, tokenizer, encoded splits per task (``train``,
    ``test`` and, for an lr grid, ``dev``: already cut to the rows to evaluate), settings."""

    base: nn.Module
    tokenizer: object
    splits: dict[str, dict[str, list[engine.Encoded]]]
    settings: engine.TrainSettings
    out: str
    model_name: str = ""
    verbose: bool = False

    pad = protocol.Bench.pad

    @property
    def tasks(self) -> list[str]:
        return list(self.splits)

    @property
    def task_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.tasks)}

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in ("dev", "test") if s in next(iter(self.splits.values()))]

    def setup(self) -> dict:
        """What makes runs comparable; stored in every result and checked on resume."""
        return {"tasks": self.tasks, "model": self.model_name, "steps": self.settings.steps,
                "batch": self.settings.batch, "warmup": self.settings.warmup,
                "eval_rows": {s: {t: len(self.splits[t][s]) for t in self.tasks} for s in self.eval_splits}}

    def _done(self, path: str) -> dict | None:
        if not os.path.isfile(path):
            return None
        result = protocol.read_json(path)
        if result.get("setup") != self.setup():
            raise SetupMismatch(f"{path}: a run of another setup ({result.get('setup')}); use another --out")
        return result

    def zero_shot(self) -> dict:
        path = os.path.join(self.out, "runs", "zero-shot.json")
        done = self._done(path)
        if done is not None:
            return done
        start = time.perf_counter()
        result = {"method": "zero-shot", "kind": "none", "rank": None, "targets": "-", "routed": False, "params": 0,
                  "lr": None, "seed": None, "setup": self.setup(),
                  **{f"{s}_acc": evaluate_tasks(self.base, {t: self.splits[t][s] for t in self.tasks}, self.pad, None)
                     for s in self.eval_splits},
                  "total_s": round(time.perf_counter() - start, 1)}
        protocol.write_json(path, result)
        return result

    def run(self, spec: RunSpec) -> dict:
        """Train one adapter on the mixture (fresh copy of the base) and evaluate it per task."""
        path = spec.path(self.out)
        done = self._done(path)
        if done is not None:
            return done
        if spec.method.kind == "ttmoe":
            return self.run_ttmoe(spec)
        start = time.perf_counter()
        method = for_tasks(spec.method, self.tasks)
        routed = method.family == "tensorft" and is_routed(method.kind)
        model, groups, params = attach(engine.fresh_copy(self.base), method, TARGETS[spec.targets], spec.lr, spec.seed)
        rows = mixture({t: self.splits[t]["train"] for t in self.tasks}, seed=spec.seed)
        extra, row_inputs, intuition = {}, None, None
        if method.kind == "trex":
            intuition = self.intuition(model, rows, spec.seed)
            extra = {"intuition": intuition.scores}
            kind = model.tensorft.kind

            def row_inputs(task, eval_rows):  # each row's prompt alone, as in training
                return kind.routing_for_prompts(model, [prompt_of(r, self.tokenizer) for r in eval_rows])
        trainee = RowRouted(model, rows, extra, task_ids=routed) if routed or extra else model
        losses = engine.train(trainee, groups, rows, self.settings, spec.seed, self.pad,
                              protocol.Bench._progress(start) if self.verbose else None)
        trained = time.perf_counter() - start
        ids = self.task_ids if routed else None
        accs = {f"{s}_acc": evaluate_tasks(model, {t: self.splits[t][s] for t in self.tasks}, self.pad, ids, row_inputs)
                for s in self.eval_splits}
        result = {
            "method": method.name, "family": method.family, "kind": method.label, "rank": method.rank,
            "targets": spec.targets, "routed": routed, "lr": spec.lr, "lr_multiplier": spec.lr_multiplier,
            "seed": spec.seed, "params": params, "setup": self.setup(), **accs,
            "test_mean": statistics.fmean(accs["test_acc"].values()),
            "rows_per_task_trained": _rows_per_task(rows, self.settings, spec.seed, self.tasks),
            "loss_first": losses[0], "loss_last10": statistics.fmean(losses[-10:]),
            "train_s": round(trained, 1), "total_s": round(time.perf_counter() - start, 1),
        }
        if intuition is not None:
            result["intuition"] = {
                "encoder": intuition.encoder, "examples": int(intuition.embeddings.shape[0]),
                "centroids": int(intuition.centroids.shape[0]), "cached": intuition.cached,
                "encoder_kmeans_s": round(intuition.seconds, 1),
                "frozen_centroid_values": int(intuition.centroids.numel()),
            }
        protocol.write_json(path, result)
        return result

    def intuition(self, model: nn.Module, rows: list[TaskRow], seed: int):
        """T-REX's intuition as the launcher computes it (``tensorft.intuition.add_intuition``
        on a ``data.tasks`` config): every training row's prompt embedded, K = rank_out x rank
        k-means centroids seeded by the adapter seed, cached in ``OUT/intuition/``; the
        centroids are copied into the adapter. Returns the ``Intuition`` (``scores``: one row
        per mixture row)."""
        from tensorft.intuition import compute, describe

        kind = model.tensorft.kind
        texts = [prompt_of(r, self.tokenizer) for r in rows]
        result = compute(texts, kind.options.encoder, kind.K, seed, os.path.join(self.out, "intuition"))
        kind.set_intuition(model, result.centroids)
        if self.verbose:
            print(describe(result), flush=True)
        return result

    # ------------------------------------------------------------------ TT-LoRA MoE

    def expert_dir(self, spec: RunSpec, task: str) -> str:
        return os.path.join(self.out, "experts", f"{spec.method.name}@{spec.targets}",
                            f"lr{spec.lr:g}-seed{spec.seed}", task)

    def train_expert(self, spec: RunSpec, expert: Method, task: str) -> dict:
        """Stage 1 for one task: a ``tt`` expert trained on that task's rows only, with the step
        budget of one mixture run (``settings``), saved with ``tensorft.save`` (the adapter
        ``tensorft.experts`` writes per task: its ``tasks`` is the task's name, the expert's
        name) and evaluated on its own task. Resumable: a saved expert is read back."""
        import tensorft

        out = self.expert_dir(spec, task)
        record = os.path.join(out, "bench_result.json")
        if os.path.isfile(record):
            result = protocol.read_json(record)
            if result.get("setup") == self.setup():
                return result
        start = time.perf_counter()
        method = dataclasses.replace(expert, options={**expert.options, "tasks": [task]})
        model, groups, params = attach(engine.fresh_copy(self.base), method, TARGETS[spec.targets], spec.lr, spec.seed)
        rows = self.splits[task]["train"]
        losses = engine.train(model, groups, rows, self.settings, spec.seed, self.pad,
                              protocol.Bench._progress(start) if self.verbose else None)
        trained = time.perf_counter() - start
        accs = {f"{s}_acc": engine.evaluate(model, self.splits[task][s], self.pad) for s in self.eval_splits}
        tensorft.save(model, out)
        result = {"task": task, "params": params, "setup": self.setup(), **accs,
                  "rows_trained": self.settings.steps * self.settings.batch,
                  "loss_first": losses[0], "loss_last10": statistics.fmean(losses[-10:]),
                  "train_s": round(trained, 1), "total_s": round(time.perf_counter() - start, 1)}
        protocol.write_json(record, result)
        if self.verbose:
            print(f"    expert {task}: params {params:,} test {accs['test_acc']:.3f} "
                  f"loss {losses[0]:.2f}->{result['loss_last10']:.2f} [{result['total_s']:.0f} s]", flush=True)
        return result

    def train_router(self, model: nn.Module, groups: list[dict], rows: list[TaskRow], steps: int, seed: int) -> list[float]:
        """Stage 2: the ttmoe router on the mixture, AdamW with ``engine``'s schedule, clipping
        and batches. A step is ``model(prompt ids, task_ids=labels)`` in training mode: ttmoe
        runs it as a base pass (adapters off, no expert pass) and its hook adds ``router_ce``
        (noisy router, cross-entropy on the task label) to the auxiliary losses, the router's
        only objective (as ``TensorftTrainer.compute_loss`` does for stage 2). The inputs are
        the prompts, so the router reads the last prompt token (what routing at inference
        reads); ``logits_to_keep=1`` skips most of the unused LM head."""
        import tensorft

        settings = dataclasses.replace(self.settings, steps=steps)
        optimizer = torch.optim.AdamW(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.schedule(settings))
        params = [p for g in groups for p in g["params"]]
        torch.manual_seed(seed)  # the router's training noise
        model.train()
        losses = []
        for indices in engine.batches(len(rows), steps, settings.batch, seed):
            inputs = engine._left_padded([prompt_ids(rows[i]) for i in indices], self.pad)
            with tensorft.collect_aux_losses(model) as aux:
                model(**inputs, task_ids=torch.tensor([rows[i].task for i in indices]), logits_to_keep=1)
            loss = aux["router_ce"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        return losses

    @torch.no_grad()
    def route(self, model: nn.Module, rows: list[engine.Encoded], batch_size: int = 32) -> torch.Tensor:
        """Each row's expert from its prompt: ``kind.route`` (one base pass, the clean router)."""
        kind = model.tensorft.kind
        model.eval()
        out = []
        for b in range(0, len(rows), batch_size):
            out.append(kind.route(model, engine._left_padded([prompt_ids(r) for r in rows[b:b + batch_size]], self.pad)))
        return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.long)

    def run_ttmoe(self, spec: RunSpec) -> dict:
        """TT-LoRA MoE on the mixture: stage 1 (one tt expert per task, own rows only, the step
        budget of one mixture run each), stage 2 (the router on the mixture,
        ``ROUTER_STEPS_PER_STEP`` x steps), then held-out router accuracy, the MoE's per-task
        accuracy (each row routed once from its prompt) and each task's own expert's. Writes
        the MoE's run and ``tt-experts-r<rank>``'s (each task scored by its own expert)."""
        import tensorft
        from tensorft.adapters.ttmoe import router_report

        start = time.perf_counter()
        expert = tensorft_kind("tt", spec.method.rank)
        experts = {t: self.train_expert(spec, expert, t) for t in self.tasks}
        stage1 = sum(e["total_s"] for e in experts.values())  # as recorded: a resumed expert keeps its time
        dirs = [self.expert_dir(spec, t) for t in self.tasks]
        expert_params = experts[self.tasks[0]]["params"]

        t2 = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = tensorft.attach(engine.fresh_copy(self.base), {"kind": "ttmoe", "experts": dirs, "seed": spec.seed})
        kind = model.tensorft.kind
        assert kind.options.expert_names == self.tasks, kind.options.expert_names
        groups = tensorft.optimizer_groups(model, spec.lr, 0.0)
        trainable = tensorft.count_parameters(model)
        rows = mixture({t: self.splits[t]["train"] for t in self.tasks}, seed=spec.seed)
        router_steps = ROUTER_STEPS_PER_STEP * self.settings.steps
        losses = self.train_router(model, groups, rows, router_steps, spec.seed)
        stage2 = time.perf_counter() - t2

        # held-out: route every evaluated row once from its prompt; score its options with that expert
        chosen = {s: {t: self.route(model, self.splits[t][s]) for t in self.tasks} for s in self.eval_splits}
        routers = {}
        for s in self.eval_splits:
            E = len(self.tasks)
            counts = torch.zeros(E, E, dtype=torch.long)
            for i, t in enumerate(self.tasks):
                counts[i] += torch.bincount(chosen[s][t], minlength=E)
            routers[s] = router_report(counts, self.tasks)
        accs = {f"{s}_acc": evaluate_tasks(model, {t: self.splits[t][s] for t in self.tasks}, self.pad, None,
                                           lambda t, _rows, s=s: {"expert_ids": chosen[s][t]})
                for s in self.eval_splits}
        setup = self.setup()
        common = {"family": "tensorft", "targets": spec.targets, "lr": spec.lr, "lr_multiplier": spec.lr_multiplier,
                  "seed": spec.seed, "setup": setup}
        expert_accs = {f"{s}_acc": {t: experts[t][f"{s}_acc"] for t in self.tasks} for s in self.eval_splits}
        experts_result = {
            "method": f"tt-experts-r{spec.method.rank}", "kind": "tt (own task's expert)", "rank": spec.method.rank,
            "routed": False, **common, "params": expert_params * len(self.tasks), "params_per_expert": expert_params,
            **expert_accs, "test_mean": statistics.fmean(expert_accs["test_acc"].values()),
            "rows_per_task_trained": {t: experts[t]["rows_trained"] for t in self.tasks},
            "loss_first": {t: experts[t]["loss_first"] for t in self.tasks},
            "loss_last10": {t: experts[t]["loss_last10"] for t in self.tasks},
            "train_s": round(sum(experts[t]["train_s"] for t in self.tasks), 1),
            "total_s": round(sum(experts[t]["total_s"] for t in self.tasks), 1),
            "note": "each task scored by its own tt expert, trained on that task's rows only (stage 1 of ttmoe)",
        }
        result = {
            "method": spec.method.name, "kind": "ttmoe", "rank": spec.method.rank, "routed": True, **common,
            "params": expert_params * len(self.tasks) + trainable, "params_trainable_stage2": trainable,
            "params_per_expert": expert_params, "experts": self.tasks, **accs,
            "test_mean": statistics.fmean(accs["test_acc"].values()),
            "router": routers, "router_test_accuracy": routers["test"]["accuracy"],
            "router_steps": router_steps, "router_loss_first": losses[0],
            "router_loss_last10": statistics.fmean(losses[-10:]),
            "rows_per_task_trained": {t: experts[t]["rows_trained"] for t in self.tasks},
            "router_rows_per_task": _rows_per_task(rows, dataclasses.replace(self.settings, steps=router_steps),
                                                   spec.seed, self.tasks),
            "stage1_s": round(stage1, 1), "stage2_s": round(stage2, 1),
            "train_s": round(stage1 + stage2, 1), "total_s": round(time.perf_counter() - start, 1),
        }
        protocol.write_json(os.path.join(self.out, "runs", f"{experts_result['method']}@{spec.targets}",
                                         f"lr{spec.lr:g}-seed{spec.seed}.json"), experts_result)
        protocol.write_json(spec.path(self.out), result)
        return result


def _rows_per_task(rows: list[TaskRow], settings: engine.TrainSettings, seed: int, tasks: list[str]) -> dict[str, int]:
    """How many training rows of each task the steps drew (engine.train's own batches)."""
    counts = dict.fromkeys(tasks, 0)
    for batch in engine.batches(len(rows), settings.steps, settings.batch, seed):
        for i in batch:
            counts[tasks[rows[i].task]] += 1
    return counts


# --------------------------------------------------------------------------- summary


def read_results(out: str) -> list[dict]:
    root = os.path.join(out, "runs")
    return [protocol.read_json(os.path.join(d, f)) for d, _, files in sorted(os.walk(root))
            for f in sorted(files) if f.endswith(".json")]


def select(results: list[dict]) -> list[protocol.Selected]:
    """Per (method, targets): the lr with the best dev accuracy averaged over tasks and seeds
    (one adapter serves every task, so one lr for all; ties: the lower lr; with one lr there is
    no dev evaluation), then each task's test accuracy over seeds at that lr, as
    learning-quality ``Selected`` cells (one per task) so its table code applies."""
    cells: dict[tuple[str, str], dict[float, list[dict]]] = {}
    out = []
    for r in results:
        if r["method"] == "zero-shot":
            out += [protocol.Selected(t, "zero-shot", "none", None, "-", 0, None, acc, 0.0,
                                      r.get("dev_acc", {}).get(t, float("nan")), 1) for t, acc in r["test_acc"].items()]
        else:
            cells.setdefault((r["method"], r["targets"]), {}).setdefault(r["lr"], []).append(r)
    for (method, targets), by_lr in sorted(cells.items()):
        def dev(lr):
            return statistics.fmean(statistics.fmean(r["dev_acc"].values()) for r in by_lr[lr]) if "dev_acc" in by_lr[lr][0] else 0.0

        lr = max(sorted(by_lr), key=dev)
        runs = by_lr[lr]
        for task in runs[0]["test_acc"]:
            tests = [r["test_acc"][task] for r in runs]
            devs = [r["dev_acc"][task] for r in runs if "dev_acc" in r]
            out.append(protocol.Selected(task, method, runs[0]["kind"], runs[0]["rank"], targets, runs[0]["params"], lr,
                                         statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0,
                                         statistics.fmean(devs) if devs else float("nan"), len(runs)))
    return out


def means(selected: list[protocol.Selected]) -> dict[tuple[str, str], dict]:
    """Per (method, targets): kind, params and the mean test accuracy over its tasks."""
    rows: dict[tuple[str, str], dict] = {}
    for s in selected:
        row = rows.setdefault((s.method, s.targets), {"kind": s.kind, "params": s.params, "accs": {}})
        row["accs"][s.task] = s.test_mean
    for row in rows.values():
        row["mean"] = statistics.fmean(row["accs"].values())
    return rows


def comparison_markdown(selected: list[protocol.Selected]) -> str:
    """The papers' claims, per routed kind: mean accuracy minus each shared baseline's
    (``SHARED_BASELINE``, same targets), and on how many tasks it is ahead / level / behind."""
    rows = means(selected)
    lines = ["## Routed vs the shared dense adapter of the same family", "",
             "| routed | shared | targets | routed params | shared params | routed mean | shared mean | difference "
             "| tasks ahead / level / behind |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (method, targets), row in sorted(rows.items()):
        for base_method in SHARED_BASELINE.get(row["kind"], ()):
            shared = rows.get((base_method, targets))
            if shared is None:
                continue
            tasks = sorted(set(row["accs"]) & set(shared["accs"]))
            diffs = [row["accs"][t] - shared["accs"][t] for t in tasks]
            ahead, behind = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
            lines.append(f"| {method} | {base_method} | {targets} | {row['params']:,} | {shared['params']:,} | "
                         f"{row['mean']:.3f} | {shared['mean']:.3f} | {row['mean'] - shared['mean']:+.3f} | "
                         f"{ahead} / {len(diffs) - ahead - behind} / {behind} |")
    return "\n".join(lines) + "\n"


def ttmoe_markdown(results: list[dict]) -> str:
    """Per ttmoe run: router accuracy on the held-out rows (per task, usage) and stage costs."""
    runs = [r for r in results if r.get("kind") == "ttmoe"]
    if not runs:
        return ""
    lines = ["## TT-LoRA MoE: router on held-out mixed rows", ""]
    for r in runs:
        rep = r["router"]["test"]
        lines += [f"{r['method']}@{r['targets']} (lr {r['lr']:g}, seed {r['seed']}): {len(r['experts'])} tt r={r['rank']} "
                  f"experts of {r['params_per_expert']:,} parameters each (stage 1: each on its own task's rows, "
                  f"{next(iter(r['rows_per_task_trained'].values()))} rows drawn), router {r['params_trainable_stage2']:,} "
                  f"trainable parameters ({r['router_steps']} steps on the mixture, CE "
                  f"{r['router_loss_first']:.2f} -> {r['router_loss_last10']:.2f}); stage 1 {r['stage1_s']:.0f} s, "
                  f"stage 2 {r['stage2_s']:.0f} s.", "",
                  f"Router accuracy (clean top-1 from the prompt's last token) on {rep['rows']} held-out rows: "
                  f"**{rep['accuracy']:.3f}**", "",
                  "| task | router accuracy | rows routed to its expert (usage) |", "|---|---:|---:|"]
        lines += [f"| {t} | {rep['per_task'].get(t, float('nan')):.3f} | {rep['usage'][t]} |" for t in rep["experts"]]
        lines.append("")
    return "\n".join(lines) + "\n"


MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h"]


def plot_png(selected: list[protocol.Selected], title: str) -> bytes:
    """Mean test accuracy vs trainable parameters (log x), one marker per method, named next to
    it (evaluation/report.py draws one line per kind with a legend only: with one point per
    kind and near-equal counts, e.g. poly and mhr, names on the points read better); routed
    kinds filled, shared ones hollow; zero-shot as a dashed line."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = means(selected)
    fig = Figure(figsize=(10.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = sorted(((r["params"], r["mean"], m, t, r["kind"]) for (m, t), r in rows.items() if m != "zero-shot"))
    for i, (params, mean, method, targets, kind) in enumerate(points):
        routed = kind in SHARED_BASELINE
        ax.scatter([params], [mean], marker=MARKERS[i % len(MARKERS)], s=70, color=f"C{i % 10}",
                   facecolors=f"C{i % 10}" if routed else "none", linewidths=1.5, zorder=3,
                   label=f"{method} ({targets}){' routed' if routed else ''}")
        # alternate right / left of the marker, level with it: neighbours with near-equal counts
        # (poly / mhr) neither overprint nor read as each other's label
        ax.annotate(method, (params, mean), textcoords="offset points", xytext=(8, 0) if i % 2 == 0 else (-8, 0),
                    ha="left" if i % 2 == 0 else "right", va="center", fontsize=9)
    for (method, _), r in rows.items():
        if method == "zero-shot":
            ax.axhline(r["mean"], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"zero-shot {r['mean']:.3f}", (0.01, r["mean"]), xycoords=("axes fraction", "data"),
                        fontsize=9, color="gray", va="bottom")
    if points:
        ax.set_xscale("log")
        lo, hi = points[0][0], points[-1][0]
        ax.set_xlim(lo / 2, hi * 3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no point is covered
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("mean held-out accuracy over tasks")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(out: str, settings: str) -> list[protocol.Selected]:
    """summary.md (the learning-quality table: per-task and mean test accuracy, params; then the
    routed-vs-shared comparison) and report.png from every finished run in OUT."""
    from tensorft.saving import atomic_file, write_text

    results = read_results(out)
    if not results:
        return []
    selected = select(results)
    table = protocol.summary_markdown(selected, settings).replace(
        "# Learning quality: test accuracy", "# Multi-task benchmark: held-out accuracy per task, one adapter", 1)
    write_text(os.path.join(out, "summary.md"), table + "\n" + comparison_markdown(selected) + "\n" + ttmoe_markdown(results))
    png = plot_png(selected, "multi-task mixture: mean held-out accuracy vs trainable parameters")
    with atomic_file(os.path.join(out, "report.png")) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)
    return selected
