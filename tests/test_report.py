"""``python -m evaluation.report``: lm-eval results of several runs -> one table and one plot.

The results files are written here in lm-eval's format (what ``lm_eval`` and
``python -m evaluation.lm_eval`` write); the adapters are real tensorft / PEFT directories.
"""

import json
import os
import sys

import pytest

import tensorft
from conftest import randomize_adapters, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluation import report  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def _results(path, scores, model_args, tensorft_info=None, groups=None):
    """A results file shaped like lm-eval's: per task ``metric,filter`` values and configs."""
    results = {task: {"alias": task, **{f"{m},none": v for m, v in values.items()},
                      **{f"{m}_stderr,none": 0.01 for m in values}} for task, values in scores.items()}
    config = {"model": "tensorft" if tensorft_info else "hf", "model_args": model_args}
    if tensorft_info:
        config["tensorft"] = tensorft_info
    data = {
        "results": results,
        "group_subtasks": groups or {t: [] for t in scores},
        "configs": {t: {"task": t, "metric_list": [{"metric": m} for m in values]} for t, values in scores.items()},
        "config": config,
    }
    for group, members in (groups or {}).items():
        if members:
            data["configs"].pop(group, None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Saved adapters of a tiny Llama and their trainable-parameter counts."""
    work = tmp_path_factory.mktemp("report")
    counts = {}
    for kind, rank in (("cp", 2), ("cp", 8), ("lora", 2), ("tt", 2)):
        model = tiny_llama()
        cfg = {"kind": kind, "rank": rank, "alpha": 4, "targets": TARGETS}
        if kind == "tt":
            cfg["tt_shapes"] = {"in": [8, 8], "out": [8, 8]}
        tensorft.attach(model, cfg)
        randomize_adapters(model)
        name = f"{kind}_r{rank}"
        tensorft.save(model, str(work / name))
        counts[name] = tensorft.count_parameters(model)
        if name == "lora_r2":
            tensorft.export_peft(model, str(work / "lora_r2_peft"))
    return work, counts


def test_report_table_and_plot(adapters, tmp_path, capsys):
    work, counts = adapters
    runs = tmp_path / "runs"
    # the wrapper records the adapter in config.tensorft
    _results(runs / "a" / "cp_r2" / "results_2026-01-01T00-00-00.json", {"sst2": {"acc": 0.70, "acc_norm_tok": 0.72}, "rte": {"acc": 0.50}},
             {"pretrained": str(work / "cp_r2")},
             {"adapter": str(work / "cp_r2"), "kind": "cp", "rank": 2, "trainable_parameters": counts["cp_r2"]})
    # an older run in the same folder: the newest one counts
    _results(runs / "a" / "cp_r2" / "results_2025-01-01T00-00-00.json", {"sst2": {"acc": 0.10}, "rte": {"acc": 0.10}},
             {"pretrained": str(work / "cp_r2")},
             {"adapter": str(work / "cp_r2"), "kind": "cp", "rank": 2, "trainable_parameters": counts["cp_r2"]})
    # a run that only names the adapter directory: kind, rank and count come from it
    cp8 = _results(runs / "cp_r8.json", {"sst2": {"acc": 0.80, "acc_norm_tok": 0.81}, "rte": {"acc": 0.60}},
                   {"pretrained": str(work / "cp_r8")})
    tt = _results(runs / "tt.json", {"sst2": {"acc": 0.75}, "rte": {"acc": 0.55}}, {"adapter": str(work / "tt_r2")})
    # the standard path: --model hf with a PEFT export; and the base model alone
    peft = _results(runs / "peft.json", {"sst2": {"acc": 0.78}, "rte": {"acc": 0.58}},
                    f"pretrained=/models/tiny,peft={work / 'lora_r2_peft'}")
    base = _results(runs / "base.json", {"sst2": {"acc": 0.50}, "rte": {"acc": 0.40}}, {"pretrained": "/models/tiny"})

    out = tmp_path / "report"
    assert report.main([str(runs / "a"), cp8, tt, peft, base, "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")}
    assert rows["cp_r2"][:6] == ["cp_r2", "cp", "2", f"{counts['cp_r2']:,}", "0.7000", "0.5000"]
    assert rows["cp_r2"][-1] == "0.6000"  # mean over sst2 and rte
    assert rows["cp_r8"][1:4] == ["cp", "8", f"{counts['cp_r8']:,}"]
    assert rows["tt_r2"][1:4] == ["tt", "2", f"{counts['tt_r2']:,}"]
    # a PEFT export holds LoRA's pair per layer: LoRA's count, here equal to the tensorft lora adapter's
    assert rows["lora_r2_peft"][1:4] == ["peft-lora", "2", f"{counts['lora_r2']:,}"]
    assert rows["tiny"][1:4] == ["none", "-", "0"]
    assert "sst2 (acc,none)" in table and "rte (acc,none)" in table
    assert counts["cp_r2"] < counts["cp_r8"] < counts["lora_r2"]  # what the plot's x axis orders
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # another metric and a subset of tasks
    assert report.main([cp8, str(runs / "a"), "--metric", "acc_norm_tok", "--tasks", "sst2", "--out", str(tmp_path / "r2")]) == 0
    table = (tmp_path / "r2" / "report.md").read_text()
    assert "sst2 (acc_norm_tok,none)" in table and "rte" not in table.split("Sources")[0]
    assert "| cp_r8 | cp | 8 |" in table and "0.8100" in table


def test_report_groups(adapters, tmp_path):
    """Groups (lm-eval's aggregates) get a column; the mean is over tasks, not groups."""
    work, counts = adapters
    path = _results(tmp_path / "r.json", {"bbh_rc_local": {"acc": 0.5}, "bbh_rc_snarks": {"acc": 0.6}, "bbh_rc_navigate": {"acc": 0.2}},
                    {"pretrained": str(work / "cp_r2")}, groups={"bbh_rc_local": ["bbh_rc_snarks", "bbh_rc_navigate"]})
    # a run without one of the tasks gets no mean (and no point in the plot)
    partial = _results(tmp_path / "p.json", {"bbh_rc_snarks": {"acc": 0.9}}, {"pretrained": str(work / "cp_r8")})
    assert report.main([path, partial, "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| cp_r2")][0].strip("| ").split(" | ")
    assert row[-1] == "0.4000" and "bbh_rc_local (acc,none)" in table
    row = [line for line in table.splitlines() if line.startswith("| cp_r8")][0].strip("| ").split(" | ")
    assert row[-1] == "-" and "0.9000" in row
    assert report.main([path, "--tasks", "bbh_rc_local", "--out", str(tmp_path / "only")]) == 0
    row = [line for line in (tmp_path / "only" / "report.md").read_text().splitlines() if line.startswith("| cp_r2")][0]
    assert row.strip("| ").split(" | ")[-1] == "0.5000"


def test_report_bad_input(adapters, tmp_path, capsys):
    work, _ = adapters
    good = _results(tmp_path / "good.json", {"sst2": {"acc": 0.5}}, {"pretrained": str(work / "cp_r2")})
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "empty").mkdir()
    lost = _results(tmp_path / "lost.json", {"sst2": {"acc": 0.5}}, {"peft": str(tmp_path / "gone")})
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "missing.json")], "no such file or folder"),
        ([str(tmp_path / "broken.json")], "not a readable JSON file"),
        ([str(tmp_path / "other.json")], "no 'results' section"),
        ([str(tmp_path / "empty")], "no lm-eval results"),
        ([good, "--metric", "bleu"], "no run reports metric 'bleu'"),
        ([good, "--tasks", "rte"], "no run reports any metric for tasks rte"),
        ([lost], "cannot read"),
        ([good], None),  # --out is a file
    ]
    (tmp_path / "afile").write_text("x")
    for argv, message in cases:
        target = str(tmp_path / "afile") if message is None else str(out)
        assert report.main([*argv, "--out", target]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tensorft: error: ") and "\n" not in err, err
        assert message is None or message in err, err
        assert not out.exists()
    assert (tmp_path / "afile").read_text() == "x"


def _run(name, kind, rank, params, value):
    return report.Run(name=name, source=name, kind=kind, rank=rank, params=params, metrics={"t": value}, averaged=["t"])


def test_plot_keeps_coinciding_runs_readable():
    """A LoRA and its PEFT export land on the same point, two base-model runs on the same
    line, close ranks next to each other: every run stays visible and no label overprints."""
    runs = [
        _run("lora_r8", "lora", 8, 16_384, 0.71), _run("lora_r8_peft", "peft-lora", 8, 16_384, 0.71),
        _run("lora_r4", "lora", 4, 8_192, 0.70), _run("cp_r4", "cp", 4, 8_300, 0.70),
        _run("cp_r8", "cp", 8, 8_400, 0.705),
        _run("base", "none", None, None, 0.5), _run("merged", "none", None, None, 0.5),
    ]
    fig = report.plot_figure(runs, "mean acc", "title")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    # one marker shape per kind, so coinciding points of two kinds show as two shapes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"cp", "lora", "peft-lora"}
    assert len({line.get_marker() for line in lines.values()}) == 3
    assert len({line.get_markersize() for line in (lines["lora"], lines["peft-lora"])}) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cp", "lora", "peft-lora"]
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert "lora r=8 = peft-lora r=8" in labels and "base = merged (no adapter)" in labels
    assert {"r=4", "r=8"} <= set(labels)  # cp r=8 and a rank-4 run sit next to each other
    boxes = list(labels.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("counts", [(16_416, 43_776, 87_552, 460_800), (900, 1_200), (1_300, 1_700), (3_000, 2_400_000_000)])
def test_parameter_axis_labels_are_counts_that_do_not_overprint(counts):
    """The log x axis (trainable parameters) is labelled at 1/2/5 x 10^k as "20k", "1M"...: with
    matplotlib's defaults a range under two decades labelled every minor tick and overprinted."""
    runs = [_run(f"r{i}", "cp", i + 1, n, 0.6 + 0.01 * i) for i, n in enumerate(counts)]
    fig = report.plot_figure(runs, "mean acc", "title")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()
             and lo <= t.get_position()[0] <= hi]
    assert shown, "no x tick label"
    assert all(t.get_text()[0].isdigit() and "times" not in t.get_text() for t in shown), [t.get_text() for t in shown]
    boxes = [t.get_window_extent(renderer) for t in shown]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), ([t.get_text() for t in shown], a, b)


def test_count_labels():
    assert [report._count(x) for x in (500, 20_000, 1_500_000, 2e9)] == ["500", "20k", "1.5M", "2B"]
