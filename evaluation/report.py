"""Gather lm-eval results of several runs into one table and a plot of metric vs parameters.

    python -m evaluation.report RESULTS [RESULTS ...] --out DIR [--metric NAME[,FILTER]]
        [--tasks a,b] [--title TEXT]

``RESULTS`` are lm-eval results JSON files or folders searched for them (``results_*.json``; the
newest one per folder). Writes ``DIR/report.md`` (one row per run: adapter kind, rank, trainable
parameters, the metric of every task and their mean) and ``DIR/report.png`` (the mean against
trainable parameters on a log axis, one line per adapter kind labelled by rank, runs without
adapter as a horizontal line), in the manner of the LoRTA paper's figures.

What each run evaluated comes from the results JSON:

* ``python -m evaluation.lm_eval`` runs record the adapter (kind, rank, trainable parameters as
  ``tensorft.count_parameters`` counts them) under ``config.tensorft``;
* ``--model hf`` runs name ``peft=DIR`` (a PEFT adapter: kind ``peft-lora``, parameters counted
  in its weights file; a tensorft export has LoRA's count, not the original kind's) or only
  ``pretrained=DIR``: kind ``none`` (a merged model is indistinguishable from a base model; report
  the adapter directory's run for its counts);
* a ``pretrained=`` or ``adapter=`` that is a tensorft adapter directory is read like the first.

``python -m bench.learning_quality`` (the learning-quality benchmark) writes its results in this
same shape (``OUT/report/inputs/*/results_bench.json``: test accuracy at the lr chosen on dev as
metric ``acc`` per task, the adapter under ``config.tensorft`` with the targets in its kind) and
calls this tool on them, so its plot is this tool's plot.

The metric of a task is ``--metric`` (with ``,FILTER``, default ``none`` or the first filter
reported), else the first metric of the task's ``metric_list``. The mean is over every task
column (groups only when nothing else is shown); a run missing one of them has no mean and no
point in the plot. Bad input ends with one line ``tensorft: error: ...``, exit code 2, and
nothing written.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field


class ReportError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"tensorft: error: {message}\n")


@dataclass
class Run:
    name: str
    source: str
    kind: str
    rank: int | None
    params: int | None
    adapter_path: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # column -> value
    leaves: set[str] = field(default_factory=set)  # columns that are tasks, not groups
    averaged: list[str] = field(default_factory=list)  # the columns the mean is over

    @property
    def mean(self) -> float | None:
        """None when the run lacks one of the averaged columns: means over other task sets
        would not compare."""
        if not self.averaged or any(c not in self.metrics for c in self.averaged):
            return None
        return sum(self.metrics[c] for c in self.averaged) / len(self.averaged)


# --------------------------------------------------------------------------- reading runs


def find_results(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "results_*.json"), recursive=True))
            if not found:
                raise ReportError(f"{path}: no lm-eval results (results_*.json) in this folder")
            newest = {}
            for f in found:  # re-runs into one folder: the newest counts
                folder = os.path.dirname(f)
                if folder not in newest or os.path.basename(f) > os.path.basename(newest[folder]):
                    newest[folder] = f
            files.extend(sorted(newest.values()))
        else:
            raise ReportError(f"{path}: no such file or folder")
    return files


def _model_args(config: dict) -> dict:
    args = config.get("model_args") or {}
    if isinstance(args, str):  # "key=value,key=value" when given as a string
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    return args if isinstance(args, dict) else {}


def _safetensors_count(path: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def adapter_info(path: str, where: str) -> tuple[str, int | None, int | None]:
    """(kind, rank, trainable parameters) of a tensorft or PEFT adapter directory."""
    config_file = os.path.join(path, "adapter_config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{where}: cannot read {config_file} ({e})") from None
    weights = os.path.join(path, "adapter_model.safetensors")
    # tensorft saves exactly tensorft.adapter_parameters(model): its element count is
    # tensorft.count_parameters of the model the adapter came from.
    params = _safetensors_count(weights) if os.path.isfile(weights) else None
    if "peft_type" in raw:
        return f"peft-{str(raw['peft_type']).lower()}", raw.get("r"), params
    return str(raw.get("kind", "?")), raw.get("rank"), params


def _describe(results: dict, where: str) -> tuple[str, str, int | None, int | None]:
    config = results.get("config") or {}
    info = config.get("tensorft")
    if isinstance(info, dict):
        return info.get("adapter") or "?", info.get("kind", "?"), info.get("rank"), info.get("trainable_parameters")
    args = _model_args(config)
    if args.get("peft"):
        kind, rank, params = adapter_info(str(args["peft"]), where)
        return str(args["peft"]), kind, rank, params
    for key in ("adapter", "pretrained"):
        value = args.get(key)
        if isinstance(value, str) and os.path.isfile(os.path.join(value, "adapter_config.json")):
            kind, rank, params = adapter_info(value, where)
            return value, kind, rank, params
    name = args.get("pretrained") or config.get("model") or "?"
    return str(name), "none", None, 0


def _pick(task_results: dict, metric: str | None, filt: str | None, task_config: dict) -> tuple[str, float] | None:
    if metric is None:
        metric_list = task_config.get("metric_list") or []
        metric = metric_list[0].get("metric") if metric_list and isinstance(metric_list[0], dict) else None
        if not isinstance(metric, str):
            return None
    keys = [k for k in task_results if k.split(",")[0] == metric and "," in k]
    if not keys:
        return None
    wanted = f"{metric},{filt}" if filt else (f"{metric},none" if f"{metric},none" in keys else keys[0])
    value = task_results.get(wanted)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return wanted, float(value)


def _first_metric(values: dict) -> tuple[str, float] | None:
    for key, value in values.items():
        name, _, filt = key.partition(",")
        if filt and not name.endswith("_stderr") and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def read_run(path: str, metric: str | None, filt: str | None, tasks: list[str] | None) -> tuple[Run, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise ReportError(f"{path}: no 'results' section (not an lm-eval results file)")
    name, kind, rank, params = _describe(results, path)
    groups = set((results.get("group_subtasks") or {}).keys())
    configs = results.get("configs") or {}
    run = Run(name=os.path.basename(os.path.normpath(name)) or name, source=path, kind=kind, rank=rank, params=params,
              adapter_path=name)
    chosen = {}
    # Tasks first, then groups: a group is reported with the metric its tasks use.
    items = sorted(results["results"].items(), key=lambda kv: kv[0] in groups)
    for task, values in items:
        if tasks and task not in tasks or not isinstance(values, dict):
            continue
        picked = _pick(values, metric, filt, configs.get(task) or {})
        if picked is None and metric is None and task in groups:
            sub = [chosen[t] for t in (results["group_subtasks"].get(task) or []) if t in chosen]
            picked = _pick(values, sub[0].split(",")[0], sub[0].split(",", 1)[1], {}) if sub else None
            if picked is None:  # the group aggregated another metric or filter: report that one
                picked = _first_metric(values)
        if picked is None:
            continue
        key, value = picked
        chosen[task] = key
        run.metrics[task] = value
        if task not in groups:
            run.leaves.add(task)
    return run, chosen


def read_runs(paths: list[str], metric_arg: str | None, tasks: list[str] | None) -> tuple[list[Run], dict[str, str]]:
    metric, filt = (metric_arg.split(",", 1) + [None])[:2] if metric_arg else (None, None)
    runs, columns = [], {}
    for path in find_results(paths):
        run, chosen = read_run(path, metric, filt, tasks)
        runs.append(run)
        for task, key in chosen.items():
            columns.setdefault(task, key)
    if not columns:
        what = f"metric {metric_arg!r}" if metric_arg else "any metric"
        scope = f" for tasks {', '.join(tasks)}" if tasks else ""
        raise ReportError(f"no run reports {what}{scope}")
    if tasks:
        missing = [t for t in tasks if t not in columns]
        if missing:
            raise ReportError(f"--tasks: no run reports {', '.join(missing)}")
    # The mean is over every task column (groups would count their tasks twice); over the
    # groups when only groups are shown.
    leaves = set().union(*(run.leaves for run in runs))
    averaged = [c for c in columns if c in leaves] or list(columns)
    for run in runs:
        run.averaged = averaged
    names = [run.name for run in runs]
    for run in runs:  # the same folder name twice: add the parent folder
        if names.count(run.name) > 1 and run.adapter_path:
            run.name = os.path.join(*os.path.normpath(run.adapter_path).split(os.sep)[-2:])
    return runs, columns


# --------------------------------------------------------------------------- table and plot


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(runs: list[Run], columns: dict[str, str], title: str) -> str:
    tasks = list(columns)
    header = ["run", "kind", "rank", "trainable params"] + [f"{t} ({columns[t]})" for t in tasks] + ["mean"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for run in sorted(runs, key=lambda r: (r.kind, r.params if r.params is not None else -1, r.name)):
        cells = [
            run.name,
            run.kind,
            "-" if run.rank is None else str(run.rank),
            "-" if run.params is None else f"{run.params:,}",
            *[_fmt(run.metrics.get(t)) for t in tasks],
            _fmt(run.mean),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "mean: over the task columns (the group columns when only groups are shown); "
              "`-` when a run lacks one of them. Sources:", ""]
    lines += [f"- {run.name}: `{run.source}`" for run in runs]
    return "\n".join(lines) + "\n"


def plot_png(runs: list[Run], ylabel: str, title: str) -> bytes:
    """The figure as PNG bytes (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    by_kind: dict[str, list[Run]] = {}
    for run in runs:
        if run.mean is None:
            continue
        if run.kind == "none":
            ax.axhline(run.mean, linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"{run.name} (no adapter)", (0.01, run.mean), xycoords=("axes fraction", "data"),
                        fontsize=8, color="gray", va="bottom")
        elif run.params:
            by_kind.setdefault(run.kind, []).append(run)
    for kind, points in sorted(by_kind.items()):
        points.sort(key=lambda r: r.params)
        xs, ys = [r.params for r in points], [r.mean for r in points]
        ax.plot(xs, ys, marker="o", label=kind)
        for r in points:
            if r.rank is not None:
                ax.annotate(f"r={r.rank}", (r.params, r.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if by_kind:
        ax.set_xscale("log")
        ax.legend(title="adapter")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m evaluation.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="lm-eval results JSON files or folders")
    p.add_argument("--out", required=True, help="folder for report.md and report.png")
    p.add_argument("--metric", default=None, help="NAME or NAME,FILTER (default: each task's first metric)")
    p.add_argument("--tasks", default="", help="comma-separated task names to keep (default: all)")
    p.add_argument("--title", default=None)
    return p


def run(args) -> int:
    from tensorft.saving import atomic_file, write_text

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ReportError(f"--out {args.out}: exists and is not a folder")
    runs, columns = read_runs(args.results, args.metric, tasks)
    metric_names = sorted({key.split(",")[0] for key in columns.values()})
    title = args.title or f"{' / '.join(metric_names)} vs trainable parameters"
    text = markdown(runs, columns, title)
    png = plot_png(runs, f"mean {' / '.join(metric_names)} over tasks", title)
    # Both are built before either is written.
    os.makedirs(args.out, exist_ok=True)
    with atomic_file(os.path.join(args.out, "report.png")) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)
    write_text(os.path.join(args.out, "report.md"), text)
    print(text, end="")
    print(f"\nwritten: {os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'report.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from tensorft.errors import TensorftError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ReportError, TensorftError) as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
