"""The benchmark's protocol: runs over (task, method, targets, lr, seed), resumable, and their
summary (lr chosen on dev, test reported) as a table and as inputs of ``evaluation/report.py``.

Each finished run is one JSON file ``OUT/runs/<task>/<method>@<targets>/lr<lr>-seed<seed>.json``
(the zero-shot baseline: ``OUT/runs/<task>/zero-shot.json``), written atomically once the run is
complete, so a killed benchmark restarts where it stopped and a rerun skips what is done.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass

from . import engine
from .engine import BenchError  # noqa: F401  (the benchmarks' CLIs catch it from here)
from .methods import TARGETS, Method, attach

LR_MULTIPLIERS = {"defaults": (1.0,), "sweep": (0.25, 1.0, 4.0)}


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: Method
    targets: str
    lr: float
    lr_multiplier: float
    seed: int

    def path(self, out: str) -> str:
        return os.path.join(out, "runs", self.task, f"{self.method.name}@{self.targets}",
                            f"lr{self.lr:g}-seed{self.seed}.json")


def grid(tasks: list[str], methods: list[Method], targets: list[str], base_lr: float, mode: str,
         seeds: list[int]) -> list[RunSpec]:
    """Every run of the protocol: each lr of the mode's grid, each seed."""
    return [RunSpec(t, m, tg, base_lr * mult, mult, s)
            for t in tasks for m in methods for tg in targets for mult in LR_MULTIPLIERS[mode] for s in seeds]


def write_json(path: str, data: dict) -> None:
    from tensorft.saving import write_text

    write_text(path, json.dumps(data, indent=1) + "\n")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- running


@dataclass
class Bench:
    """What every run shares: the base model (never trained itself), its tokenizer, the
    encoded splits per task, and the training settings."""

    base: object
    tokenizer: object
    splits: dict[str, dict[str, list[engine.Encoded]]]
    settings: engine.TrainSettings
    out: str
    model_name: str = ""
    verbose: bool = False  # print the loss every 10 steps

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id or 0

    def zero_shot_path(self, task: str) -> str:
        return os.path.join(self.out, "runs", task, "zero-shot.json")

    def finished(self, path: str) -> dict | None:
        """The run written at ``path``, if any; one of another model is refused, not mixed in."""
        if not os.path.isfile(path):
            return None
        result = read_json(path)
        if self.model_name and result.get("model", self.model_name) != self.model_name:
            raise BenchError(f"{path} is a run of model {result['model']!r}, not {self.model_name!r}: "
                             "give each model its own --out")
        return result

    def zero_shot(self, task: str) -> dict:
        """The base model's dev / test accuracy, computed once per task."""
        path = self.zero_shot_path(task)
        if (done := self.finished(path)) is not None:
            return done
        result = {"task": task, "method": "zero-shot", "kind": "none", "params": 0, "model": self.model_name,
                  **{f"{s}_acc": engine.evaluate(self.base, self.splits[task][s], self.pad) for s in ("dev", "test")}}
        write_json(path, result)
        return result

    def run(self, spec: RunSpec) -> dict:
        """Train one adapter on a fresh copy of the base and evaluate it; skipped when done."""
        path = spec.path(self.out)
        if (done := self.finished(path)) is not None:
            return done
        start = time.perf_counter()
        model, groups, params = attach(engine.fresh_copy(self.base), spec.method, TARGETS[spec.targets],
                                       spec.lr, spec.seed)
        # what the optimizer gives each factor group: the kind's shipped multipliers on top of
        # ``lr`` (read before training: the schedule decays the groups' lr in place)
        group_lrs = sorted({float(f"{g['lr']:.6g}") for g in groups})
        data = self.splits[spec.task]
        losses = engine.train(model, groups, data["train"], self.settings, spec.seed, self.pad,
                              self._progress(start) if self.verbose else None)
        trained = time.perf_counter() - start
        result = {
            "task": spec.task, "method": spec.method.name, "family": spec.method.family,
            "kind": spec.method.label, "rank": spec.method.rank, "targets": spec.targets,
            "lr": spec.lr, "lr_multiplier": spec.lr_multiplier, "seed": spec.seed, "params": params,
            "group_lrs": group_lrs,  # runs are cached by lr: a later change of the defaults shows here
            "steps": self.settings.steps, "batch": self.settings.batch, "warmup": self.settings.warmup,
            "model": self.model_name,
            "dev_acc": engine.evaluate(model, data["dev"], self.pad),
            "test_acc": engine.evaluate(model, data["test"], self.pad),
            "loss_first": losses[0], "loss_last10": statistics.fmean(losses[-10:]),
            "train_s": round(trained, 1), "total_s": round(time.perf_counter() - start, 1),
        }
        write_json(path, result)
        return result


    @staticmethod
    def _progress(start: float):
        def show(step: int, loss: float) -> None:
            if step % 10 == 0:
                print(f"    step {step} loss {loss:.3f} [{time.perf_counter() - start:.0f} s]", flush=True)

        return show


# --------------------------------------------------------------------------- summary


@dataclass
class Selected:
    """One (task, method, targets) cell: the lr chosen by mean dev accuracy, test over seeds."""

    task: str
    method: str
    kind: str
    rank: int | None
    targets: str
    params: int
    lr: float | None
    test_mean: float
    test_std: float
    dev_mean: float
    seeds: int


def select(results: list[dict]) -> list[Selected]:
    """Choose each cell's lr on dev (ties: the lower lr), report test mean / std at it."""
    cells: dict[tuple, dict[float, list[dict]]] = {}
    for r in results:
        if r["method"] == "zero-shot":
            continue
        cells.setdefault((r["task"], r["method"], r["targets"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (task, method, targets), by_lr in sorted(cells.items()):
        lr = max(sorted(by_lr), key=lambda x: statistics.fmean(r["dev_acc"] for r in by_lr[x]))
        runs = by_lr[lr]
        tests = [r["test_acc"] for r in runs]
        out.append(Selected(task, method, runs[0]["kind"], runs[0]["rank"], targets, runs[0]["params"], lr,
                            statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0,
                            statistics.fmean(r["dev_acc"] for r in runs), len(runs)))
    for r in results:
        if r["method"] == "zero-shot":
            out.append(Selected(r["task"], "zero-shot", "none", None, "-", 0, None, r["test_acc"], 0.0, r["dev_acc"], 1))
    return out


def summary_markdown(selected: list[Selected], settings: str) -> str:
    """Rows: method @ targets; columns: tasks, then the mean over tasks (when all are present)."""
    tasks = sorted({s.task for s in selected})
    rows: dict[tuple[str, str], dict[str, Selected]] = {}
    for s in selected:
        rows.setdefault((s.method, s.targets), {})[s.task] = s
    header = ["method", "targets", "params", "lr (chosen on dev)"] + tasks + ["mean over tasks"]
    lines = ["# Learning quality: test accuracy (mean ± std over seeds)", "", settings, "",
             "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    order = sorted(rows, key=lambda k: (k[0] != "zero-shot", k[1], next(iter(rows[k].values())).kind,
                                        next(iter(rows[k].values())).params))
    for method, targets in order:
        cells = rows[(method, targets)]
        any_cell = next(iter(cells.values()))
        lrs = sorted({c.lr for c in cells.values() if c.lr is not None})
        accs = [cells[t].test_mean for t in tasks if t in cells]
        mean = f"{statistics.fmean(accs):.3f}" if len(accs) == len(tasks) else "-"
        lines.append("| " + " | ".join([
            method, targets, f"{any_cell.params:,}", ", ".join(f"{x:g}" for x in lrs) or "-",
            *[_cell(cells.get(t)) for t in tasks], mean]) + " |")
    return "\n".join(lines) + "\n"


def _cell(s: Selected | None) -> str:
    if s is None:
        return "-"
    return f"{s.test_mean:.3f}" if s.seeds == 1 else f"{s.test_mean:.3f} ± {s.test_std:.3f}"


def report_inputs(selected: list[Selected], out: str, model_name: str) -> list[str]:
    """One lm-eval-shaped results file per (method, targets), for ``evaluation/report.py``:
    the test accuracy at the chosen lr as metric ``acc`` of each task, the adapter under
    ``config.tensorft`` (its kind carries the targets, so q,v and all-linear plot as two lines)."""
    by_row: dict[tuple[str, str], list[Selected]] = {}
    for s in selected:
        by_row.setdefault((s.method, s.targets), []).append(s)
    files = []
    for (method, targets), cells in sorted(by_row.items()):
        first = cells[0]
        name = method if method == "zero-shot" else f"{method}@{targets}"
        kind = "none" if method == "zero-shot" else f"{first.kind} ({targets})"
        data = {
            "results": {c.task: {"alias": c.task, "acc,none": c.test_mean, "acc_stderr,none": c.test_std} for c in cells},
            "group_subtasks": {c.task: [] for c in cells},
            "configs": {c.task: {"task": c.task, "metric_list": [{"metric": "acc"}]} for c in cells},
            "config": {"model": "tensorft-bench", "model_args": {"pretrained": model_name},
                       "tensorft": {"adapter": name, "kind": kind, "rank": first.rank, "trainable_parameters": first.params}},
        }
        path = os.path.join(out, "report", "inputs", name.replace("@", "_"), "results_bench.json")
        write_json(path, data)
        files.append(path)
    return files


def write_report(out: str, settings: str, model_name: str) -> list[Selected]:
    """summary.md from every finished run in OUT, then the report tool's table and plot."""
    from evaluation import report
    from tensorft.saving import write_text

    results = [read_json(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(out, "runs"))
               for f in sorted(files) if f.endswith(".json")]
    if not results:
        return []
    selected = select(results)
    # the folder may hold more seeds than this invocation ran: name the ones summarised
    seeds = sorted({r["seed"] for r in results if "seed" in r})
    settings += (f" Seeds the folder's runs used: {', '.join(map(str, seeds))}; a cell shows mean ± std over "
                 "the seeds it holds, a bare number is one seed.")
    write_text(os.path.join(out, "summary.md"), summary_markdown(selected, settings))
    files = report_inputs(selected, out, model_name)
    report.main([*files, "--out", os.path.join(out, "report"), "--metric", "acc",
                 "--title", "held-out accuracy vs trainable parameters"])
    return selected
