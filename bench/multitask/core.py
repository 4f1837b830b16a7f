"""The multi-task benchmark's runs: the task mixture, one adapter trained on it, and per-task
held-out accuracy with each task's own task id.

Training and evaluation are bench/learning_quality's (``engine.train``, ``engine.evaluate``,
``methods.attach``); what is added here is where the task ids come from:

* training: the mixture's rows carry their task id (:class:`TaskRow`). ``engine.train`` hands
  the model only token ids, so routed kinds train through :class:`RowRouted`, which looks each
  row's id up from its (unpadded) tokens and calls ``model(..., task_ids=ids)`` per row;
* evaluation: one task at a time, inside ``tensorft.task_context(model, id)``.

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
# The papers' claim is routed vs the shared dense adapter of its family.
SHARED_BASELINE = {"poly": "lora", "mhr": "lora", "tensorpoly1": "tlora", "tensorpoly2": "tlora"}


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
    """An encoded row of the mixture, with the id of the task it came from."""

    task: int = 0


def mixture(train: dict[str, list[engine.Encoded]], mixing: str = "proportional", seed: int = 0) -> list[TaskRow]:
    """The training rows of every task, mixed by tensorft's multi-task rule (``tensorft.data.
    mix_rows``: the same one ``data.tasks`` training uses), each tagged with its task id."""
    from tensorft.data import mix_rows

    mixed = mix_rows({name: [{"row": r} for r in rows] for name, rows in train.items()}, mixing, 2.0, seed)
    return [TaskRow(m["row"].options, m["row"].starts, m["row"].gold, task=m["task_ids"]) for m in mixed]


class RowRouted(nn.Module):
    """``model`` called with one task id per row, looked up from the row's tokens.

    ``engine.train`` builds each batch from row indices it never passes on; the input tokens
    (prompt + gold option, less its last token) identify the row, and hence its task. An input
    that two tasks share would be ambiguous and is refused."""

    def __init__(self, model: nn.Module, rows: list[TaskRow]):
        super().__init__()
        self.model = model
        self.ids: dict[tuple[int, ...], int] = {}
        for row in rows:
            key = tuple(row.options[row.gold][:-1])
            if self.ids.setdefault(key, row.task) != row.task:
                raise ValueError(f"the same training input is in tasks {self.ids[key]} and {row.task}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        task_ids = torch.tensor([self.ids[k] for k in keys])
        return self.model(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs)


def evaluate_tasks(model: nn.Module, data: dict[str, list[engine.Encoded]], pad: int,
                   task_ids: dict[str, int] | None) -> dict[str, float]:
    """Accuracy per task; ``task_ids`` (routed kinds): the id each task is evaluated with."""
    import tensorft

    out = {}
    for name, rows in data.items():
        if task_ids is None:
            out[name] = engine.evaluate(model, rows, pad)
        else:
            with tensorft.task_context(model, torch.tensor([task_ids[name]])):
                out[name] = engine.evaluate(model, rows, pad)
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
        start = time.perf_counter()
        method = for_tasks(spec.method, self.tasks)
        routed = method.family == "tensorft" and is_routed(method.kind)
        model, groups, params = attach(engine.fresh_copy(self.base), method, TARGETS[spec.targets], spec.lr, spec.seed)
        rows = mixture({t: self.splits[t]["train"] for t in self.tasks}, seed=spec.seed)
        trainee = RowRouted(model, rows) if routed else model
        losses = engine.train(trainee, groups, rows, self.settings, spec.seed, self.pad,
                              protocol.Bench._progress(start) if self.verbose else None)
        trained = time.perf_counter() - start
        ids = self.task_ids if routed else None
        accs = {f"{s}_acc": evaluate_tasks(model, {t: self.splits[t][s] for t in self.tasks}, self.pad, ids)
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
        protocol.write_json(path, result)
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
    """The papers' claim, per routed kind: mean accuracy minus its shared dense baseline's
    (same targets), and on how many tasks it is ahead / level / behind."""
    rows = means(selected)
    lines = ["## Routed vs the shared dense adapter of the same family", "",
             "| routed | shared | targets | routed mean | shared mean | difference | tasks ahead / level / behind |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (method, targets), row in sorted(rows.items()):
        base_kind = SHARED_BASELINE.get(row["kind"])
        shared = next(((m, r) for (m, t), r in rows.items() if r["kind"] == base_kind and t == targets), None)
        if shared is None:
            continue
        tasks = sorted(set(row["accs"]) & set(shared[1]["accs"]))
        diffs = [row["accs"][t] - shared[1]["accs"][t] for t in tasks]
        ahead, behind = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
        lines.append(f"| {method} | {shared[0]} | {targets} | {row['mean']:.3f} | {shared[1]['mean']:.3f} | "
                     f"{row['mean'] - shared[1]['mean']:+.3f} | {ahead} / {len(diffs) - ahead - behind} / {behind} |")
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
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = sorted(((r["params"], r["mean"], m, t, r["kind"]) for (m, t), r in rows.items() if m != "zero-shot"))
    for i, (params, mean, method, targets, kind) in enumerate(points):
        routed = kind in SHARED_BASELINE
        ax.scatter([params], [mean], marker=MARKERS[i % len(MARKERS)], s=70, color=f"C{i % 10}",
                   facecolors=f"C{i % 10}" if routed else "none", linewidths=1.5, zorder=3,
                   label=f"{method} ({targets}){' routed' if routed else ''}")
        # alternate above / below: neighbours with near-equal counts do not overprint
        ax.annotate(method, (params, mean), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -12), fontsize=9)
    for (method, _), r in rows.items():
        if method == "zero-shot":
            ax.axhline(r["mean"], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"zero-shot {r['mean']:.3f}", (0.01, r["mean"]), xycoords=("axes fraction", "data"),
                        fontsize=9, color="gray", va="bottom")
    if points:
        ax.set_xscale("log")
        lo, hi = points[0][0], points[-1][0]
        ax.set_xlim(lo / 2, hi * 3)
        ax.legend(fontsize=8, loc="best")
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
    write_text(os.path.join(out, "summary.md"), table + "\n" + comparison_markdown(selected))
    png = plot_png(selected, "multi-task mixture: mean held-out accuracy vs trainable parameters")
    with atomic_file(os.path.join(out, "report.png")) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)
    return selected
