"""bench/learning_quality: the harness end to end on a tiny Llama (SmolLM2's tokenizer) and a
tiny synthetic multiple-choice task; scores and losses checked against plain unpadded forwards."""

import copy
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.learning_quality import engine, protocol, tasks  # noqa: E402
from bench.learning_quality import methods as methods_module  # noqa: E402
from bench.learning_quality.methods import METHODS  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def synthetic_rows(n):
    """Options of different token lengths and shared prefixes, so padding and the option start
    are exercised; the gold is a fixed function of the prompt."""
    rows = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        rows.append({"prompt": f"Item {i}: the {color} one.\nAnswer:",
                     "options": [" warm", " cold and wet", " neither"], "gold": (i * 7 + len(color)) % 3})
    return rows


def _pad(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _hand_scores(model, data):
    """Each option alone, unpadded: mean log-prob of its tokens after the prompt."""
    scores = []
    with torch.no_grad():
        for row in data:
            per_option = []
            for full, start in zip(row.options, row.starts):
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
                per_option.append(sum(logprobs[p - 1, full[p]].item() for p in range(start, len(full))) / (len(full) - start))
            scores.append(per_option)
    return scores


def test_rank_classification_matches_hand_computation(tiny):
    model, tok = tiny
    data = engine.encode(tok, synthetic_rows(10))
    assert all(len(set(r.starts)) == 1 and r.starts[0] > 0 for r in data)
    got = engine.option_scores(model, data, _pad(tok), batch_size=4)
    want = _hand_scores(model, data)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
    hand_acc = sum(max(range(3), key=lambda j: w[j]) == r.gold for w, r in zip(want, data)) / len(data)
    assert engine.accuracy(got, data) == hand_acc


def test_loss_is_on_the_gold_option_only(tiny):
    model, tok = tiny
    data = engine.encode(tok, synthetic_rows(4))
    loss = engine.gold_loss(model, data, [0, 1, 2, 3], _pad(tok))
    terms = []
    with torch.no_grad():
        for row in data:
            full, start = row.options[row.gold], row.starts[row.gold]
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
            terms += [-logprobs[p - 1, full[p]].item() for p in range(start, len(full))]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)


def test_stratified_splits_are_fixed_disjoint_and_balanced():
    task = tasks.Task("synthetic", lambda: [], sizes=(12, 6, 6), stratify=True)
    rows = [{"prompt": f"p{i}", "options": [" a", " b"], "gold": i % 2} for i in range(40)]
    splits = tasks.make_splits(task, rows)
    assert splits == tasks.make_splits(task, [dict(r) for r in rows])  # fixed by the seed
    assert [len(splits[s]) for s in tasks.SPLITS] == [12, 6, 6]
    prompts = [r["prompt"] for s in tasks.SPLITS for r in splits[s]]
    assert len(prompts) == len(set(prompts))
    assert all(sum(r["gold"] for r in splits[s]) * 2 == len(splits[s]) for s in tasks.SPLITS)


def test_select_chooses_lr_on_dev_and_reports_test_over_seeds():
    def run(lr, seed, dev, test):
        return {"task": "t", "method": "cp-r4", "kind": "cp", "rank": 4, "targets": "qv", "params": 10,
                "lr": lr, "seed": seed, "dev_acc": dev, "test_acc": test}

    results = [run(1e-3, 0, 0.6, 0.9), run(1e-3, 1, 0.6, 0.9),  # best test, worse dev: not chosen
               run(4e-3, 0, 0.8, 0.5), run(4e-3, 1, 0.7, 0.7),
               {"task": "t", "method": "zero-shot", "kind": "none", "params": 0, "dev_acc": 0.4, "test_acc": 0.3}]
    chosen = {s.method: s for s in protocol.select(results)}
    assert chosen["cp-r4"].lr == 4e-3 and chosen["cp-r4"].seeds == 2
    assert chosen["cp-r4"].test_mean == pytest.approx(0.6) and chosen["cp-r4"].test_std == pytest.approx(0.1414, abs=1e-3)
    assert chosen["zero-shot"].test_mean == 0.3


def test_bench_end_to_end_resume_and_report(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    rows = synthetic_rows(24)
    splits = {"synthetic": {"train": engine.encode(tok, rows[:12]), "dev": engine.encode(tok, rows[12:18]),
                            "test": engine.encode(tok, rows[18:])}}
    out = str(tmp_path / "lq")
    bench = protocol.Bench(model, tok, splits, engine.TrainSettings(steps=3, batch=4, warmup=1), out, "tiny")
    methods = [METHODS["peft-lora-r1"], METHODS["cp-r24"]]
    specs = protocol.grid(["synthetic"], methods, ["qv"], 1e-3, "defaults", [0])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    bench.zero_shot("synthetic")
    results = [bench.run(spec) for spec in specs]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the base is never trained
    for spec, r in zip(specs, results):
        assert json.load(open(spec.path(out))) == r
        assert r["params"] > 0 and 0 <= r["dev_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["steps"] == 3
        assert r["method"] == spec.method.name and r["lr"] == 1e-3
    assert results[0]["params"] == 2 * ((64 + 64) + (64 + 32))  # PEFT LoRA r=1 on q (64->64), v (64->32), 2 layers
    # the lrs the optimizer started from (the schedule decays them to 0 by the end): PEFT's one,
    # cp's two (A and B; the C's at A's pace) at the kind's shipped multipliers
    assert results[0]["group_lrs"] == [1e-3]
    cp_groups = methods_module.attach(copy.deepcopy(model), METHODS["cp-r24"], ["q_proj", "v_proj"], 1e-3, 0)[1]
    assert results[1]["group_lrs"] == sorted(float(f"{g['lr']:.6g}") for g in cp_groups) and len(cp_groups) == 2

    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert [bench.run(spec) for spec in specs] == results

    selected = protocol.write_report(out, "settings", "tiny")
    assert {s.method for s in selected} == {"peft-lora-r1", "cp-r24", "zero-shot"}
    summary = open(os.path.join(out, "summary.md")).read()
    assert "peft-lora-r1" in summary and "zero-shot" in summary
    assert "Seeds the folder's runs used: 0;" in summary  # what it holds, not what a run asked for
    assert os.path.getsize(os.path.join(out, "report", "report.png")) > 0
    assert "cp (qv)" in open(os.path.join(out, "report", "report.md")).read()


def test_report_only_summary_names_no_single_base_lr():
    """--report-only summarises whatever runs a folder holds (often several base lrs): its
    settings line must not claim the --lr default for all of them."""
    from bench.learning_quality import __main__ as cli

    run = cli.resolve(cli.build_parser().parse_args(["--quick", "--lr", "0.001"]))
    assert "base lr 0.001, mode defaults (x1)" in cli.settings_line(run)
    only = cli.resolve(cli.build_parser().parse_args(["--quick", "--report-only"]))
    line = cli.settings_line(only)
    assert "base lr" not in line and "every lr the folder's runs used" in line


def test_time_estimate_counts_the_tokens_runs_read():
    """The up-front estimate follows tokens, not rows: a row's options that share one input are
    read once, their shared prefix once per row, and long multi-option rows (intent_recognition)
    cost what their tokens cost."""
    from bench.learning_quality import __main__ as cli

    shared = engine.Encoded(options=[[1, 2, 3, 9], [1, 2, 3, 8]], starts=[3, 3], gold=0)  # one input
    apart = engine.Encoded(options=[[1, 2, 5, 6], [1, 2, 7]], starts=[2, 2], gold=1)  # two inputs
    assert cli.eval_tokens([shared]) == 3 and cli.eval_tokens([apart]) == 1 + 2 + 1  # prefix [1], rests [2, 5], [2]
    splits = {"t": {"train": [shared, apart], "dev": [shared], "test": [apart]}}
    args = cli.resolve(cli.build_parser().parse_args(["--quick", "--steps", "10", "--batch", "4"]))
    spec = protocol.RunSpec("t", METHODS["cp-r64"], "qv", 1e-3, 1.0, 0)
    eval_s = (3 + 4) * cli.EVAL_S_PER_TOKEN
    train_s = 10 * 4 * (4 + 3) / 2 * cli.TRAIN_S_PER_TOKEN  # mean gold option length 3.5
    zero_shot_s, run_s = cli.costs(splits, args)
    assert zero_shot_s == {"t": pytest.approx(eval_s)} and run_s(spec) == pytest.approx(train_s + eval_s)


def test_option_scores_read_each_prompt_once(tiny):
    """A row's options share its prompt's keys and values: the scores equal each option read
    alone, and the forwards read exactly the tokens ``option_inputs`` counts (each prompt once,
    options that share a whole input once), also where an option's first token merges with
    the prompt's last (its start differs from its siblings')."""
    model, tok = tiny
    rows = synthetic_rows(5) + [{"prompt": "The word is: cat", "options": ["s", "alog", " and dog"], "gold": 2},
                                {"prompt": "Count: one, two,", "options": [" three", " four", " five"], "gold": 0}]
    data = engine.encode(tok, rows)
    assert len(set(data[5].starts)) > 1  # "cats" merges across the boundary
    read = []
    hook = model.register_forward_pre_hook(
        lambda mod, a, kw: read.append(int(kw["attention_mask"][:, -kw["input_ids"].shape[1]:].sum())), with_kwargs=True)
    try:
        got = engine.option_scores(model, data, _pad(tok), batch_size=4)  # chunks of rows with <= 4 rests
    finally:
        hook.remove()
    assert torch.allclose(torch.tensor(got), torch.tensor(_hand_scores(model, data)), atol=1e-4)
    reads = engine.option_inputs(data)
    assert sum(read) == sum(r.tokens() for r in reads)
    assert sum(read) < sum(len(o) - 1 for row in data for o in row.options) * 0.6  # the prompts dominate
    assert len(reads[6].rests) == 1 and len(reads[6].prefix) == data[6].starts[0] - 1  # one-token options: one rest


def test_rows_whose_option_adds_no_token_are_refused(tiny):
    _, tok = tiny
    with pytest.raises(engine.BenchError, match="row 1: option 'y' adds no token"):
        engine.encode(tok, synthetic_rows(1) + [{"prompt": "x", "options": ["y", "yz"], "gold": 0}])


def test_jobs_spread_runs_longest_first_over_least_loaded_workers():
    from bench.learning_quality import __main__ as cli

    assert cli.shares([5, 1, 4, 2, 3], 2) == [[0, 3, 1], [2, 4]]  # 5+2+1 and 4+3
    assert cli.shares([1.0], 3) == [[0]]  # no idle workers


def test_jobs_run_in_worker_processes_and_match_one_process(tmp_path):
    """``--jobs 2`` runs the grid in two worker processes (one thread each) with the same
    results as one process; a results folder of another model is refused in one line."""
    import subprocess

    from conftest import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "tiny-a")
    args = ["--tasks", "tweet_sentiment", "--methods", "lora-r1,cp-r24", "--targets", "qv", "--mode", "defaults",
            "--seeds", "0", "--steps", "2", "--batch", "2", "--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def bench(out, *extra):
        return subprocess.run([sys.executable, "-m", "bench.learning_quality", *args, "--out", str(out), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    two, one = bench(tmp_path / "two", "--jobs", "2"), bench(tmp_path / "one", "--jobs", "1")
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert "worker 1:" in two.stdout and "worker 2:" in two.stdout and "worker 1:" not in one.stdout
    timing = {"train_s", "total_s"}
    for path in sorted((tmp_path / "one" / "runs").rglob("*.json")):
        a, b = json.loads(path.read_text()), json.loads((tmp_path / "two" / path.relative_to(tmp_path / "one")).read_text())
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert len(list((tmp_path / "two" / "runs").rglob("*.json"))) == 3  # zero-shot + 2 runs
    assert (tmp_path / "two" / "summary.md").is_file()

    other = save_tiny_chat_llama(tmp_path / "tiny-b")
    refused = bench(tmp_path / "two", "--model", other)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is a run of model 'tiny-a', not 'tiny-b'" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("after", ["worker 1:", "worker 2:"])
def test_ctrl_c_stops_every_worker_with_one_line(tmp_path, after):
    """Ctrl-C (SIGINT to the terminal's whole process group) while workers start: the parent stops
    them, says so in one line and exits 130; no worker prints a traceback or outlives it (before
    Ctrl-C was held back during the start, one landing between a worker's fork and its SIG_IGN
    left that worker running: 2 of 6 tries at "worker 1:")."""
    import signal
    import subprocess

    from conftest import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "tiny")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.learning_quality", "--tasks", "tweet_sentiment", "--methods", "lora-r1,cp-r24",
         "--targets", "qv", "--mode", "defaults", "--seeds", "0", "--steps", "5000", "--model", model,
         "--out", str(tmp_path / "out"), "--jobs", "2"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    for line in proc.stdout:  # printed just before that worker is started
        if line.startswith(after):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "tensorft: interrupted; finished runs are kept, a rerun resumes"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the group is left
