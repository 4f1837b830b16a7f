"""bench/multitask: the multi-task benchmark end to end on a tiny Llama (SmolLM2's tokenizer) and
two synthetic tasks that ask the same questions with different answers (so a shared adapter
cannot fit both and per-task routing matters)."""

import json
import os
import sys

import pytest
import torch

from conftest import randomize_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorft  # noqa: E402
from bench.learning_quality import engine  # noqa: E402
from bench.learning_quality.methods import TARGETS, attach  # noqa: E402
from bench.multitask import core  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
TASKS = ["warmth", "inverse"]


def task_rows(task, n):
    """Same items, task-specific prompt wording and gold (task 1 shifts task 0's answer)."""
    word = "Guess" if task == 0 else "Reverse"
    return [{"prompt": f"{word} item {i}: the {COLORS[i % len(COLORS)]} one.\nAnswer:",
             "options": [" warm", " cold and wet", " neither"], "gold": (i * 7 + task) % 3} for i in range(n)]


def splits(tok):
    out = {}
    for t, name in enumerate(TASKS):
        rows = task_rows(t, 20)
        out[name] = {"train": engine.encode(tok, rows[:12]), "test": engine.encode(tok, rows[12:])}
    return out


def _pad(tok):
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def test_mixture_tags_every_row_with_its_task(tiny):
    _, tok = tiny
    data = splits(tok)
    rows = core.mixture({t: s["train"] for t, s in data.items()})
    assert len(rows) == 24 and sorted(r.task for r in rows) == [0] * 12 + [1] * 12
    for r in rows:  # a row's task is the task whose train split holds it
        assert any(r.options == x.options and r.gold == x.gold for x in data[TASKS[r.task]]["train"])
    assert {r.task for r in rows[:8]} == {0, 1}  # shuffled across tasks, not task after task


def test_row_routed_forward_passes_each_rows_own_task_id(tiny):
    model, tok = tiny
    data = splits(tok)
    rows = core.mixture({t: s["train"] for t, s in data.items()})
    method = core.for_tasks(core.METHODS["poly-r8"], TASKS)
    adapted, _, _ = attach(engine.fresh_copy(model), method, TARGETS["qv"], 1e-3, 0)
    randomize_adapters(adapted)
    adapted.eval()
    batch = rows[:6]
    inputs = engine._left_padded([r.options[r.gold][:-1] for r in batch], _pad(tok))
    got = core.RowRouted(adapted, rows)(**inputs).logits
    right = adapted(**inputs, task_ids=torch.tensor([r.task for r in batch])).logits
    wrong = adapted(**inputs, task_ids=torch.tensor([1 - r.task for r in batch])).logits
    assert torch.allclose(got, right) and not torch.allclose(got, wrong, atol=1e-3)


def test_bench_end_to_end_task_ids_resume_and_report(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    data = splits(tok)
    out = str(tmp_path / "mt")
    bench = core.MultiTaskBench(model, tok, data, engine.TrainSettings(steps=4, batch=4, warmup=1), out, "tiny")
    assert bench.task_ids == {"warmth": 0, "inverse": 1}
    methods = [core.METHODS[m] for m in ("lora-r8", "poly-r8", "tlora-r8", "tensorpoly1-r8")]
    specs = core.grid(methods, ["qv"], 1e-2, "defaults", [0])
    before = {n: p.clone() for n, p in model.state_dict().items()}

    # Capture the routed models to re-evaluate them below.
    trained = {}
    real_attach = core.attach

    def keep(*args, **kwargs):
        m, groups, params = real_attach(*args, **kwargs)
        trained[args[1].name] = m
        return m, groups, params

    monkeypatch.setattr(core, "attach", keep)
    zero = bench.zero_shot()
    results = [bench.run(spec) for spec in specs]
    monkeypatch.setattr(core, "attach", real_attach)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the base is never trained

    for spec, r in zip(specs, results):
        assert json.load(open(spec.path(out))) == r
        assert set(r["test_acc"]) == set(TASKS) and all(0 <= a <= 1 for a in r["test_acc"].values())
        assert r["params"] > 0 and r["setup"]["steps"] == 4 and r["setup"]["tasks"] == TASKS
        assert sum(r["rows_per_task_trained"].values()) == 16
        assert r["routed"] == (r["kind"] in ("poly", "tensorpoly1"))
    assert set(zero["test_acc"]) == set(TASKS)
    by_name = {r["method"]: r for r in results}
    # Routed parameter counts include the routing logits for the 2 tasks: T x S per site.
    assert by_name["poly-r8"]["params"] == 8 * by_name["lora-r8"]["params"] + 2 * 2 * 2 * 8

    # Each task is evaluated with its own id: the recorded accuracy is the one under that id,
    # and the trained routed adapter scores differently under the swapped ids.
    poly = trained["poly-r8"]
    site = next(m for m in poly.modules() if isinstance(m, tensorft.adapters.task_routed.RoutedSite))
    seen = []
    handle = site.register_forward_pre_hook(lambda mod, args: seen.append(args[1].task_ids.tolist()))
    accs = core.evaluate_tasks(poly, {t: data[t]["test"] for t in TASKS}, _pad(tok), bench.task_ids)
    handle.remove()
    assert accs == by_name["poly-r8"]["test_acc"]
    assert {ids[0] for ids in seen} == {0, 1} and seen[0] == [0] and seen[-1] == [1]
    for name, tid in bench.task_ids.items():
        with tensorft.task_context(poly, torch.tensor([tid])):
            own = engine.option_scores(poly, data[name]["test"], _pad(tok))
        with tensorft.task_context(poly, torch.tensor([1 - tid])):
            swapped = engine.option_scores(poly, data[name]["test"], _pad(tok))
        assert engine.accuracy(own, data[name]["test"]) == accs[name]
        assert not torch.allclose(torch.tensor(own), torch.tensor(swapped), atol=1e-5)

    # Resume: finished runs are read back, never trained again.
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert [bench.run(spec) for spec in specs] == results and bench.zero_shot() == zero
    # A folder of another setup is refused, not mixed into one table.
    other = core.MultiTaskBench(model, tok, data, engine.TrainSettings(steps=5, batch=4, warmup=1), out, "tiny")
    with pytest.raises(core.SetupMismatch):
        other.run(specs[0])

    selected = core.write_report(out, "settings")
    assert {s.method for s in selected} == {"zero-shot", "lora-r8", "poly-r8", "tlora-r8", "tensorpoly1-r8"}
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| poly-r8 | lora-r8 | qv |" in summary and "| tensorpoly1-r8 | tlora-r8 | qv |" in summary
    mean = sum(by_name["poly-r8"]["test_acc"].values()) / 2
    assert f"| poly-r8 | qv | {by_name['poly-r8']['params']:,} | 0.01 |" in summary and f"{mean:.3f}" in summary
    assert os.path.getsize(os.path.join(out, "report.png")) > 0


def test_routed_kinds_come_from_the_registry():
    assert [m for m in core.METHODS if core.is_routed(core.METHODS[m].kind)] == [
        "poly-r8", "mhr-r8", "tensorpoly1-r8", "tensorpoly2-r8"]
    assert core.for_tasks(core.METHODS["lora-r8"], TASKS) is core.METHODS["lora-r8"]
    assert core.for_tasks(core.METHODS["mhr-r8"], TASKS).options == {"n_tasks": 2, "tasks": TASKS}


# --------------------------------------------------------------------------- T-REX and TT-LoRA MoE rows

TREX_SMALL = core.Method("trex-2x2", "tensorft", "trex", 2, {"rank_out": 2})  # K = 4 <= 24 training rows


def prompted_splits(tok):
    """``splits`` through ``core.encode``: the same token ids, each row with its prompt text."""
    out = {}
    for t, name in enumerate(TASKS):
        rows = task_rows(t, 20)
        out[name] = {"train": core.encode(tok, rows[:12]), "test": core.encode(tok, rows[12:])}
    return out


def test_encode_keeps_engine_ids_and_the_prompt_text(tiny):
    _, tok = tiny
    rows = task_rows(1, 4)
    for mine, theirs, row in zip(core.encode(tok, rows), engine.encode(tok, rows), rows):
        assert (mine.options, mine.starts, mine.gold) == (theirs.options, theirs.starts, theirs.gold)
        assert mine.prompt == row["prompt"] == core.prompt_of(mine, tok)
        assert tok.decode(core.prompt_ids(mine)) == row["prompt"]


def test_trex_and_ttmoe_rows_intuition_experts_router_resume(tiny, tmp_path, monkeypatch):
    from tensorft.intuition import Encoder, similarity

    model, tok = tiny
    data = prompted_splits(tok)
    out = str(tmp_path / "mt")
    bench = core.MultiTaskBench(model, tok, data, engine.TrainSettings(steps=4, batch=4, warmup=1), out, "tiny")
    specs = core.grid([TREX_SMALL, core.METHODS["ttmoe-tt4"], core.METHODS["lora-r8"]], ["qv"], 1e-2, "defaults", [0])

    # T-REX: every training forward gets its rows' intuition (the mixture rows' scores against
    # the centroids compute() clustered), every evaluation forward its rows' prompt intuition.
    seen, trained = [], {}
    real_attach = core.attach

    def keep(*args, **kwargs):
        m, groups, params = real_attach(*args, **kwargs)
        trained[args[1].name] = m
        if args[1].kind == "trex":  # per forward: its input ids, then the intuition the first layer reads
            def record(mod, a, kw):  # a forward after a cached prefix reads the options' rests only
                cache = kw.get("past_key_values")
                seen.append([mod.training, kw["input_ids"], None, cache is not None and cache.get_seq_length() > 0])

            m.register_forward_pre_hook(record, with_kwargs=True)
            site = next(layer.adapter for layer in m.tensorft.layers.values())

            def read(mod, a):
                if seen[-1][2] is None:
                    seen[-1][2] = a[1].frame.inputs.get("intuition")

            site.register_forward_pre_hook(read)
        return m, groups, params

    monkeypatch.setattr(core, "attach", keep)
    trex, moe, lora = (bench.run(s) for s in specs)
    monkeypatch.setattr(core, "attach", real_attach)

    rows = core.mixture({t: data[t]["train"] for t in TASKS})
    intuition = trex["intuition"]
    assert intuition["examples"] == 24 and intuition["centroids"] == 4 and not intuition["cached"]
    encoder = Encoder("all-MiniLM-L6-v2")
    centroids = trained["trex-2x2"].tensorft.shared.centroids
    assert centroids.abs().sum() > 0  # the clustered centroids were copied into the adapter
    by_prompt = {}
    for r in rows + [r for t in TASKS for r in data[t]["test"]]:
        by_prompt[r.prompt] = similarity(encoder.embed([r.prompt]), centroids)[0]
    train_calls = [c for c in seen if c[0]]
    eval_calls = [c for c in seen if not c[0]]
    assert len(train_calls) == 4 and eval_calls
    assert any(rest for *_, rest in eval_calls)  # evaluation read each prompt once, then its options
    for k, (training, ids, scores, rest) in enumerate(seen):
        assert scores is not None and scores.shape == (ids.shape[0], 4)
        if rest:  # each option's rest: the intuition of one of the prompts its prefix forward read
            assert all(any(torch.equal(s, p) for p in seen[k - 1][2]) for s in scores) and not seen[k - 1][3]
            continue
        for row_ids, s in zip(ids, scores):  # each row's own prompt's intuition (left padding: pad id first)
            text = tok.decode(row_ids.tolist(), skip_special_tokens=True)
            if training:  # prompt + gold option
                prompts = [p for p in by_prompt if text.startswith(p)]
            else:  # the prefix the options share: the prompt up to its last token
                prompts = [p for p in by_prompt if p.startswith(text)]
            assert prompts and any(torch.allclose(s, by_prompt[p], atol=1e-5) for p in prompts)
    assert trex["params"] == tensorft.count_parameters(trained["trex-2x2"]) > 0
    assert set(trex["test_acc"]) == set(TASKS)

    # TT-LoRA MoE: one tt expert per task, saved as a normal adapter named by its task, trained
    # on its own rows only; the MoE's experts are those adapters, unchanged; router accuracy recorded.
    experts = {t: bench.expert_dir(specs[1], t) for t in TASKS}
    for t, d in experts.items():
        cfg, _, _ = tensorft.saving.read_adapter_config(d)
        assert cfg.kind == "tt" and cfg.tasks == [t]
    expert_run = json.load(open(os.path.join(out, "runs", "tt-experts-r4@qv", "lr0.01-seed0.json")))
    assert moe["kind"] == "ttmoe" and moe["experts"] == TASKS and moe["router_steps"] == 5 * 4
    assert moe["params"] == 2 * moe["params_per_expert"] + moe["params_trainable_stage2"]
    assert moe["params_trainable_stage2"] == 2 * (tiny[0].config.hidden_size + 1) * 2  # gate + noise, E = 2
    assert expert_run["params"] == 2 * moe["params_per_expert"] and set(expert_run["test_acc"]) == set(TASKS)
    report = moe["router"]["test"]
    assert report["rows"] == 16 and sum(report["usage"].values()) == 16 and 0 <= report["accuracy"] <= 1
    for t in TASKS:  # a task whose rows all go to its own expert scores exactly as that expert
        if report["per_task"][t] == 1.0:
            assert moe["test_acc"][t] == expert_run["test_acc"][t]
    # a routed forward with the expert ids equals the chosen expert alone
    model_moe = tensorft.attach(engine.fresh_copy(model), {"kind": "ttmoe", "experts": list(experts.values())})
    alone = tensorft.saving.load_adapter_weights(
        tensorft.attach(engine.fresh_copy(model), tensorft.saving.read_adapter_config(experts["inverse"])[0]),
        experts["inverse"])
    inputs = engine._left_padded([r.options[0] for r in data["inverse"]["test"][:3]], _pad(tok))
    assert torch.allclose(model_moe(**inputs, expert_ids=torch.tensor([1, 1, 1])).logits, alone(**inputs).logits, atol=1e-5)

    # resume: nothing trains again, the intuition comes from the cache
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert [bench.run(s) for s in specs] == [trex, moe, lora]
    assert os.listdir(os.path.join(out, "intuition"))

    core.write_report(out, "settings")
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| ttmoe-tt4 | tt-experts-r4 | qv |" in summary and "| ttmoe-tt4 | lora-r8 | qv |" in summary
    assert "| trex-2x2 | lora-r8 | qv |" in summary and "Router accuracy" in summary
