"""Gather lm-eval results of several runs into one table and a plot of metric vs parameters.

    tensorft report RESULTS [RESULTS ...] --out DIR [--metric NAME[,FILTER]]
        [--tasks a,b] [--title TEXT]

``RESULTS`` are lm-eval results JSON files or folders searched for them (``results_*.json``; the
newest one per folder). Writes ``DIR/report.md`` (one row per run: adapter kind, rank, trainable
parameters, the metric of every task and their mean) and ``DIR/report.png`` (the mean against
trainable parameters on a log axis, one line and marker shape per adapter kind labelled by rank,
runs without adapter as a horizontal line), in the manner of the LoRTA paper's figures. Runs at
the same point (a LoRA and its PEFT export, say) show as nested markers under one label naming
each; labels never overprint.

What each run evaluated comes from the results JSON:

* ``tensorft eval`` runs record the adapter (kind, rank, trainable parameters as
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


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LABEL_HEIGHT_PT = 10.0  # a label line's height (fontsize 8 plus leading), in points


def _count(x: float, _pos=None) -> str:
    """A parameter count as people write it: 500, 20k, 1.5M."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def _readable_count_ticks(axis, lo: float, hi: float) -> None:
    """Labels written as counts, at 1, 2 and 5 x 10^k when the data ``lo..hi`` span under 2.5
    decades, else at powers of 10. Matplotlib's default labels every minor tick of a log axis
    spanning under a decade or two, and "2x10^4 3x10^4 ..." overprint."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) < 2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(_count))
    axis.set_minor_formatter(NullFormatter())


def plot_figure(runs: list[Run], ylabel: str, title: str):
    """The figure (Agg canvas: no display, no global pyplot state).

    Runs that land on the same point stay visible: every adapter kind has its own marker
    shape, drawn hollow and the smaller the later its kind is drawn, so coinciding points show
    as nested shapes; the points at one spot get one label naming each of them, and labels
    that would overprint one another (also of the no-adapter lines) are moved apart."""
    from tensorft.extras import require

    require("matplotlib", "the report's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    by_kind: dict[str, list[Run]] = {}
    flat: list[Run] = []
    for run in runs:
        if run.mean is None:
            continue
        if run.kind == "none":
            flat.append(run)
        elif run.params:
            by_kind.setdefault(run.kind, []).append(run)
    kinds = sorted(by_kind)
    spots: dict[tuple, list[tuple[str, Run]]] = {}  # one entry per distinct point
    for i, kind in enumerate(kinds):
        points = sorted(by_kind[kind], key=lambda r: r.params)
        size = max(4.0, 10.0 - 2.0 * i)
        ax.plot([r.params for r in points], [r.mean for r in points], marker=MARKERS[i % len(MARKERS)],
                markersize=size, markerfacecolor="none", markeredgewidth=1.5, label=kind, zorder=2 + i)
        for r in points:
            spots.setdefault((r.params, round(r.mean, 9)), []).append((kind, r))
    for value in sorted({round(r.mean, 9) for r in flat}):
        ax.axhline(value, linestyle="--", color="gray", linewidth=1, zorder=1)
    if by_kind:
        ax.set_xscale("log")
        counts = [r.params for points in by_kind.values() for r in points]
        _readable_count_ticks(ax.xaxis, min(counts), max(counts))
        ax.legend(title="adapter", fontsize=8)
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()  # fixes the axes box, so data -> pixels below holds for the saved figure

    placed: list[tuple[float, float, float, float]] = []  # label boxes in display pixels
    px_per_pt = fig.dpi / 72.0
    frame = ax.get_window_extent()

    def place(text: str, x_px: float, y_px: float, right_only: bool = False, **kwargs) -> None:
        """Annotate (x, y) beside it: right or left, then ever further up or down, at the first
        spot inside the axes that no earlier label takes."""
        width = (len(text) * 4.8 + 2) * px_per_pt
        height = LABEL_HEIGHT_PT * px_per_pt
        candidates = []
        for k in range(40):
            for dy in (2.0 + LABEL_HEIGHT_PT * k, -LABEL_HEIGHT_PT - 2.0 - LABEL_HEIGHT_PT * k):
                for dx in ((5.0,) if right_only else (5.0, -5.0 - width / px_per_pt)):
                    x0, y0 = x_px + dx * px_per_pt, y_px + dy * px_per_pt
                    candidates.append(((dx, dy), (x0, y0, x0 + width, y0 + height)))

        def free(box):
            return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)

        def inside(box):
            return frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1

        (dx, dy), box = next((c for c in candidates if free(c[1]) and inside(c[1])),
                             next((c for c in candidates if free(c[1])), candidates[0]))
        placed.append(box)
        ax.annotate(text, (x_px, y_px), xycoords="figure pixels", textcoords="offset points",
                    xytext=(dx, dy), fontsize=8, va="bottom", ha="left", annotation_clip=False, **kwargs)

    to_px = ax.transData.transform
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for (params, _), members in sorted(spots.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ranks = [(kind, r) for kind, r in members if r.rank is not None]
        if not ranks:
            continue
        if len(members) == 1:  # in its kind's colour: nearby points of two kinds stay apart
            text, color = f"r={ranks[0][1].rank}", colors.get(members[0][0], "black")
        else:
            text = " = ".join(f"{kind} r={r.rank}" if r.rank is not None else kind for kind, r in members)
            color = "black"
        x, y = to_px((params, members[0][1].mean))
        place(text, x, y, color=color)
    flat_groups: dict[float, list[Run]] = {}
    for r in flat:
        flat_groups.setdefault(round(r.mean, 9), []).append(r)
    left = ax.transAxes.transform((0.01, 0))[0]
    for value, members in sorted(flat_groups.items()):
        text = " = ".join(r.name for r in members) + " (no adapter)"
        place(text, left - 5.0 * px_per_pt, to_px((1.0, value))[1], right_only=True, color="gray")
    return fig


def plot_png(runs: list[Run], ylabel: str, title: str) -> bytes:
    """The figure as PNG bytes."""
    fig = plot_figure(runs, ylabel, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- command line


def build_parser(prog: str = "tensorft report") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
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


def main(argv: list[str] | None = None, prog: str = "tensorft report") -> int:
    from tensorft.errors import TensorftError

    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except (ReportError, TensorftError) as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
