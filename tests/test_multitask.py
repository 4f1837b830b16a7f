"""Multi-task data and training: data.tasks configs, mixing, the multiple-choice format, task
ids through trl's SFT and DPO collators into the model, per-task losses, routed and dense kinds
through the launcher (run in-process), and bad input."""

import collections
import json
import os

import pytest
import torch
import yaml

from conftest import save_tiny_chat_llama
from tensorft.config import load_config
from tensorft.data import load_tasks, mix_counts, read_rows, sample_indices
from tensorft.errors import ConfigError, TensorftError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "brown"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama with a real tokenizer; task "alpha" (prompt-completion, 8 rows), task "beta"
    (multiple-choice with its question in a `question` column, 4 rows), preference pairs per task."""
    work = tmp_path_factory.mktemp("multitask")
    save_tiny_chat_llama(work / "tiny")
    _jsonl(work / "alpha.jsonl", [{"prompt": f"Alpha: say {w}.", "completion": f" {w} {w}"} for w in WORDS])
    _jsonl(work / "alpha_dev.jsonl", [{"prompt": f"Alpha: say {w}.", "completion": f" {w} {w}"} for w in WORDS[:2]])
    _jsonl(work / "beta.jsonl", [
        {"question": f"Beta: which is {w}?", "options": [" yes", " no"], "gold": i % 2} for i, w in enumerate(WORDS[:4])
    ])
    for task, n in (("alpha", 6), ("beta", 3)):
        _jsonl(work / f"{task}_pairs.jsonl", [
            {"prompt": f"{task.title()}: colour {w}?", "chosen": f" {w}", "rejected": f" {WORDS[(i + 1) % 8]}"}
            for i, w in enumerate(WORDS[:n])
        ])
    return work


def tasks(work, **extra):
    return {
        "alpha": {"train": str(work / "alpha.jsonl"), "eval": str(work / "alpha_dev.jsonl"),
                  "format": "prompt-completion"},
        "beta": {"train": str(work / "beta.jsonl"), "format": "multiple-choice", "columns": {"prompt": "question"}},
        **extra,
    }


def write_config(work, name, adapter=None, data=None, train=None):
    cfg = {
        "model": {"name_or_path": str(work / "tiny")},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"],
                    **(adapter or {})},
        "data": data if data is not None else {"tasks": tasks(work)},
        "train": {"output_dir": str(work / name), "max_steps": 6, "batch_size": 6, "lr": 0.01, "logging_steps": 2,
                  "save_steps": 100, "max_length": 64, **(train or {})},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# --------------------------------------------------------------------------- config


def test_tasks_config_parses_in_order_with_defaults(work):
    cfg = load_config(write_config(work, "parse", data={"tasks": tasks(work), "format": "prompt-completion",
                                                          "mixing": "temperature", "max_per_task": 3}))
    assert list(cfg.data.tasks) == ["alpha", "beta"]  # config order = task ids
    assert cfg.data.tasks["alpha"].format == "prompt-completion" and cfg.data.tasks["alpha"].columns == {}
    assert cfg.data.tasks["beta"].columns == {"prompt": "question"}
    reloaded = load_config(write_config(work, "reparse", data=cfg.to_dict()["data"]))  # config.yaml round trip
    assert reloaded.data == cfg.data


BAD_CONFIGS = [
    ({"train": "x.jsonl"}, "data.train: not with data.tasks"),
    ({"eval": "x.jsonl"}, "data.eval: not with data.tasks (give each task its own eval)"),
    ({"max_train_samples": 4}, "data.max_train_samples: not with data.tasks (data.max_per_task caps each task)"),
    ({"tasks": {"gamma": {"trian": "x.jsonl"}}}, "data.tasks.gamma.trian: unknown key"),
    ({"tasks": {"gamma": {"format": "text"}}}, "data.tasks.gamma.train: missing"),
    ({"tasks": {"gamma": {"train": "x", "format": "csv"}}}, "data.tasks.gamma.format: 'csv' is not one of"),
    ({"tasks": {"gamma": {"train": "x", "columns": {"answer": "a"}}}},
     "data.tasks.gamma.columns.answer: not a field of data.tasks.gamma.format alpaca"),
    ({"tasks": {"gamma": {"train": "x", "format": "preference"}}},
     "data.tasks.gamma.format: preference data is for train.objective: dpo"),
    ({"tasks": {"a b": {"train": "x"}}}, "data.tasks.a b: a task name is letters"),
    ({"mixing_temperature": 0}, "data.mixing_temperature: must be positive, got 0.0"),
    ({"mixing": "random"}, "data.mixing: 'random' is not one of proportional, equal, temperature"),
    ({"max_per_task": 0}, "data.max_per_task: must be at least 1, got 0"),
]


@pytest.mark.parametrize("data,message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_tasks_config_is_one_line_naming_the_key(work, data, message):
    data = {**data, "tasks": {**tasks(work), **data.get("tasks", {})}}
    with pytest.raises(ConfigError) as e:
        load_config(write_config(work, "bad", data=data))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("adapter,train,message", [
    ({}, {"packing": True}, "train.packing: not with data.tasks"),
    ({"kind": "poly", "n_tasks": 3}, {}, "adapter.n_tasks: 3, but data.tasks lists 2 tasks"),
    ({"tasks": ["beta", "alpha"]}, {}, "adapter.tasks: ['beta', 'alpha'] differs from the names of data.tasks"),
    ({}, {"objective": "dpo"}, "data.tasks.alpha.format: dpo needs preference data"),
])
def test_tasks_config_against_adapter_and_train(work, adapter, train, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write_config(work, "bad", adapter=adapter, train=train))


def test_example_config_loads():
    cfg = load_config(os.path.join(ROOT, "configs", "multitask_tensorpoly.yaml"))
    assert cfg.adapter.kind == "tensorpoly1" and list(cfg.data.tasks) == ["sentiment", "arith", "summaries"]
    assert cfg.data.tasks["arith"].format == "multiple-choice"


# --------------------------------------------------------------------------- mixing


def test_mix_counts_follow_the_rule_and_keep_the_total():
    sizes = {"a": 900, "b": 90, "c": 10}
    assert mix_counts(sizes, "proportional") == sizes
    assert mix_counts(sizes, "equal") == {"a": 334, "b": 333, "c": 333}
    # p_i ~ n_i^(1/2) = 30, 9.49, 3.16: 703.4, 222.4, 74.1 rows; the one left over goes to b (.44 > .40)
    assert mix_counts(sizes, "temperature", 2.0) == {"a": 703, "b": 223, "c": 74}
    assert mix_counts(sizes, "temperature", 1.0) == sizes
    assert sum(mix_counts(sizes, "temperature", 3.7).values()) == 1000


def test_sampling_repeats_a_small_task_evenly_and_is_seeded():
    import numpy as np

    picks = sample_indices(10, 33, np.random.default_rng(0))
    assert sorted(collections.Counter(picks).values()) == [3] * 7 + [4] * 3  # floor or ceil, never more
    assert picks == sample_indices(10, 33, np.random.default_rng(0))
    assert len(set(sample_indices(10, 4, np.random.default_rng(1)))) == 4  # a bigger task: no repeats


def test_load_tasks_caps_first_then_mixes_deterministically(work):
    cfg = load_config(write_config(work, "mix", data={"tasks": tasks(work), "mixing": "equal", "max_per_task": 6}))
    train, evaluation, info = load_tasks(cfg.data, seed=3)
    assert info["tasks"] == {"alpha": {"id": 0, "rows": 6, "mixed": 5}, "beta": {"id": 1, "rows": 4, "mixed": 5}}
    assert collections.Counter(train["task_ids"]) == {0: 5, 1: 5}
    beta = [r for r in train if r["task_ids"] == 1]
    assert all(r["prompt"].startswith("Beta") and r["completion"] in (" yes", " no") for r in beta)
    assert {r["prompt"] for r in train if r["task_ids"] == 0} <= {f"Alpha: say {w}." for w in WORDS[:6]}  # capped
    assert list(evaluation) == ["alpha"] and set(evaluation["alpha"]["task_ids"]) == {0}
    again, _, _ = load_tasks(cfg.data, seed=3)
    assert again.to_list() == train.to_list()
    assert load_tasks(cfg.data, seed=4)[0].to_list() != train.to_list()


def test_tasks_must_give_the_trainer_the_same_columns(work):
    _jsonl(work / "text.jsonl", [{"text": "plain"}])
    cfg = load_config(write_config(work, "shape", data={"tasks": tasks(work, gamma={
        "train": str(work / "text.jsonl"), "format": "text"})}))
    with pytest.raises(TensorftError, match=r"data.tasks.gamma: its rows give the trainer text \(string\), but "
                                            r"data.tasks.alpha's give completion \(string\), prompt \(string\)"):
        load_tasks(cfg.data, seed=0)


# --------------------------------------------------------------------------- multiple-choice


def test_multiple_choice_trains_on_the_gold_option(work):
    rows = read_rows(str(work / "beta.jsonl"), "multiple-choice", columns={"prompt": "question"})
    assert rows[1] == {"prompt": "Beta: which is green?", "completion": " no"}


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "options": [" a"], "gold": 0}, "field 'options' must be a list of at least two non-empty strings"),
    ({"prompt": "p", "options": [" a", " b"], "gold": 2}, "field 'gold' must be an index into options (0..1), got 2"),
    ({"prompt": "p", "options": [" a", " b"], "gold": True}, "field 'gold' must be an index"),
    ({"options": [" a", " b"], "gold": 0}, "missing field 'prompt'"),
])
def test_malformed_multiple_choice_row_names_file_and_row(work, row, message):
    path = _jsonl(work / "mc_bad.jsonl", [{"prompt": "ok", "options": [" a", " b"], "gold": 1}, row])
    with pytest.raises(TensorftError) as e:
        read_rows(path, "multiple-choice", key="data.tasks.beta.train")
    assert str(e.value).startswith(f"{path}: row 2: {message}")
    assert str(e.value).endswith("(data.tasks.beta.format: multiple-choice)")


# --------------------------------------------------------------------------- task ids reach the model


def trainer_for(config):
    """The launcher's trainer for ``config``, with a record of what every forward receives:
    (input_ids, the task ids the adapters read)."""
    from tensorft import train as recipe

    cfg = load_config(config)
    recipe.resolve_tasks(cfg)
    train_ds, eval_ds = recipe.load_data(cfg)
    model, tokenizer = recipe.build_model(cfg)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["input_ids"].cpu(), m.tensorft.state.task_ids)), with_kwargs=True
    )
    args = recipe.training_arguments(cfg, os.path.join(cfg.train.output_dir, "checkpoints"))
    return recipe.make_trainer(cfg, model, tokenizer, args, train_ds, eval_ds, []), tokenizer, seen


def assert_rows_match_tasks(seen, tokenizer, rows_per_example=1):
    names = ("Alpha", "Beta")
    checked = collections.Counter()
    for input_ids, task_ids in seen:
        assert task_ids is not None and task_ids.shape == (input_ids.shape[0],)
        for row, task in zip(input_ids, task_ids.tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True).lstrip()
            assert text.startswith(names[task]), (text, task)
            checked[task] += 1
    assert checked[0] and checked[1]


def test_task_ids_survive_the_sft_collator_and_per_task_losses_are_logged(work):
    from tensorft.trainers import MetricsCallback

    trainer, tokenizer, seen = trainer_for(write_config(work, "sft-ids", train={"max_steps": 2, "logging_steps": 1}))
    trainer.add_callback(MetricsCallback(str(work / "sft-ids.jsonl")))
    trainer.train()
    assert len(seen) == 2
    assert_rows_match_tasks(seen, tokenizer)
    logged = [json.loads(line) for line in open(work / "sft-ids.jsonl")]
    assert [r["step"] for r in logged] == [1, 2]
    for row in logged:  # the batch holds both tasks: each has its loss, near the overall loss
        assert {"loss/alpha", "loss/beta"} <= set(row)
        assert min(row["loss/alpha"], row["loss/beta"]) <= row["loss"] + 1e-4
        assert max(row["loss/alpha"], row["loss/beta"]) >= row["loss"] - 1e-4
    seen.clear()
    assert "eval_alpha_loss" in trainer.evaluate()  # one held-out set per task that has one
    assert seen and all(set(task_ids.tolist()) == {0} for _, task_ids in seen)


def test_task_ids_survive_the_dpo_collator_for_chosen_and_rejected(work):
    data = {"tasks": {t: {"train": str(work / f"{t}_pairs.jsonl"), "format": "preference"} for t in ("alpha", "beta")},
            "mixing": "equal"}
    from tensorft.trainers import MetricsCallback

    trainer, tokenizer, seen = trainer_for(write_config(
        work, "dpo-ids", data=data, train={"objective": "dpo", "max_steps": 2, "batch_size": 4, "logging_steps": 1}))
    precomputed = len(seen)  # the reference log-probs (adapters off) see the ids too
    assert precomputed == 3  # 9 pairs in batches of 4
    trainer.add_callback(MetricsCallback(str(work / "dpo-ids.jsonl")))
    trainer.train()
    assert len(seen) == precomputed + 2
    for input_ids, task_ids in seen:
        chosen, rejected = task_ids.chunk(2)  # trl's batch: every chosen row, then every rejected row
        assert torch.equal(chosen, rejected)
    assert_rows_match_tasks(seen, tokenizer)
    first = json.loads(open(work / "dpo-ids.jsonl").readline())
    # step 1: the policy is the reference, so every pair's DPO loss is log 2
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    present = [first[k] for k in ("loss/alpha", "loss/beta") if k in first]
    assert present and all(v == pytest.approx(0.693147, abs=1e-4) for v in present)


# --------------------------------------------------------------------------- through the launcher


def launch(config, *extra):
    from tensorft.train import main

    return main(["--config", config, *extra])


def test_poly_trains_through_the_launcher_on_two_tasks(work, capsys):
    import tensorft

    config = write_config(work, "poly", adapter={"kind": "poly", "n_skills": 2},
                          data={"tasks": tasks(work), "mixing": "equal"}, train={"max_steps": 8, "lr": 0.02})
    assert launch(config) == 0, capsys.readouterr().err[-2000:]
    assert "training rows per task after equal mixing: alpha 6 (of 8), beta 6 (of 4)" in capsys.readouterr().err
    out = work / "poly"
    rows = [r for r in metrics(out) if "loss" in r]  # training rows (alpha's eval set is scored at the end)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert all({"loss/alpha", "loss/beta"} <= set(r) for r in rows)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["tasks"] == ["alpha", "beta"] and saved["n_tasks"] == 2
    assert json.loads((out / "tasks.json").read_text())["tasks"]["beta"] == {"id": 1, "rows": 4, "mixed": 6}
    model = tensorft.from_pretrained(str(out))
    assert model.tensorft.config.tasks == ["alpha", "beta"]


def test_lora_trains_on_the_same_multitask_config(work, capsys):
    config = write_config(work, "lora-mt", data={"tasks": tasks(work), "mixing": "equal"}, train={"lr": 0.02})
    assert launch(config) == 0, capsys.readouterr().err[-2000:]
    rows = [r for r in metrics(work / "lora-mt") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1 and "loss/beta" in rows[-1]
    assert json.loads((work / "lora-mt" / "adapter_config.json").read_text())["tasks"] == ["alpha", "beta"]


@pytest.mark.parametrize("adapter,data,message", [
    ({"kind": "poly"}, "SINGLE", "adapter.kind: poly routes each row by its task; list the tasks under data.tasks"),
    ({}, {"gamma": {"format": "text"}}, "data.tasks.gamma.train: missing"),
    ({}, {"gamma": {"train": "no/such.jsonl", "format": "prompt-completion"}},
     "data.tasks.gamma.train: no/such.jsonl: no such file"),
    ({"kind": "poly", "tasks": ["alpha", "gamma"]}, {}, "adapter.tasks: ['alpha', 'gamma'] differs"),
])
def test_bad_input_one_line_exit_2_nothing_written(work, capsys, adapter, data, message):
    if data == "SINGLE":
        data = {"train": str(work / "alpha.jsonl"), "format": "prompt-completion"}
    else:
        data = {"tasks": tasks(work, **data)}
    name = "bad-run"
    assert launch(write_config(work, name, adapter=adapter, data=data)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("tensorft: error: ") and message in lines[-1], lines
    assert not (work / name).exists()


# --------------------------------------------------------------------------- held-out accuracy


def naive_option_scores(model, tokenizer, rows, task_id):
    """Each option alone, unpadded: the mean log-probability of its tokens after the prompt."""
    from tensorft.choice_eval import encode_options

    out = []
    with torch.no_grad():
        for row in rows:
            scores = []
            for ids, start in encode_options(tokenizer, row["prompt"], row["options"]):
                logits = model(input_ids=torch.tensor([ids]), task_ids=torch.tensor([task_id])).logits[0]
                lp = torch.log_softmax(logits.float(), -1)[start - 1:-1].gather(-1, torch.tensor(ids[start:])[:, None])
                scores.append(lp.mean().item())
            out.append(scores)
    return out


CHOICE_ROWS = [
    {"prompt": "Beta: which is red?", "options": [" yes", " no, it is a much longer answer"], "gold": 0},
    {"prompt": "Beta: is the sky, on a clear day, green?", "options": [" yes", " no", " maybe"], "gold": 1},
    {"prompt": "Q", "options": [" blue green", " white"], "gold": 1},
]


def test_batched_rank_classification_equals_a_per_option_loop_and_uses_the_task(work):
    """Left padding, position ids and logits_to_keep change nothing; each task's routing is used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tensorft
    from tensorft.choice_eval import ChoiceSet, evaluate_choices, option_scores

    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    model = tensorft.attach(AutoModelForCausalLM.from_pretrained(work / "tiny"),
                            {"kind": "poly", "rank": 4, "n_skills": 2, "n_tasks": 2, "targets": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "routing_logits" in name:
                p.normal_(0, 3.0)  # a trained-looking adapter whose tasks differ
    model.train()  # evaluation switches to eval mode (sigmoid routing) and back
    for task in (0, 1):
        batched = option_scores(model.eval(), tokenizer, CHOICE_ROWS, task, batch_size=4)
        naive = naive_option_scores(model, tokenizer, CHOICE_ROWS, task)
        assert [len(s) for s in batched] == [2, 3, 2]
        assert torch.allclose(torch.tensor(sum(batched, [])), torch.tensor(sum(naive, [])), atol=1e-5)
    assert option_scores(model, tokenizer, CHOICE_ROWS, 0) != option_scores(model, tokenizer, CHOICE_ROWS, 1)
    model.train()
    result = evaluate_choices(model, tokenizer, [ChoiceSet("beta", 1, CHOICE_ROWS), ChoiceSet("b2", 0, CHOICE_ROWS)])
    assert model.training and set(result) == {"eval_beta_accuracy", "eval_b2_accuracy"}
    expected = sum(max(range(len(s)), key=s.__getitem__) == r["gold"]
                   for s, r in zip(naive_option_scores(model, tokenizer, CHOICE_ROWS, 1), CHOICE_ROWS)) / 3
    assert result["eval_beta_accuracy"] == pytest.approx(expected)


def test_multiple_choice_tasks_report_held_out_accuracy_per_task(work, capsys):
    """eval_<task>_accuracy at every evaluation (metrics.jsonl) and at the end (eval_results.json),
    equal to scoring the saved adapter again; a non-choice task gets its loss only."""
    from transformers import AutoTokenizer

    import tensorft

    beta_dev = _jsonl(work / "beta_dev.jsonl", [
        {"question": row["prompt"], "options": row["options"], "gold": row["gold"]} for row in CHOICE_ROWS])
    data = {"tasks": tasks(work, beta={"train": str(work / "beta.jsonl"), "eval": beta_dev,
                                       "format": "multiple-choice", "columns": {"prompt": "question"}})}
    config = write_config(work, "poly-acc", adapter={"kind": "poly", "n_skills": 2}, data=data,
                          train={"max_steps": 4, "eval_steps": 2, "lr": 0.02})
    assert launch(config) == 0, capsys.readouterr().err[-2000:]
    err = capsys.readouterr().err
    out = work / "poly-acc"
    evals = [r for r in metrics(out) if "eval_beta_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert [r["step"] for r in metrics(out) if "eval_alpha_loss" in r] == [2, 4]  # eval losses reach it too
    assert not any("eval_alpha_accuracy" in r for r in metrics(out))
    final = json.loads((out / "eval_results.json").read_text())
    assert set(final) == {"step", "eval_beta_accuracy"} and final["step"] == 4
    model = tensorft.from_pretrained(str(out)).eval()
    scores = naive_option_scores(model, AutoTokenizer.from_pretrained(work / "tiny"), CHOICE_ROWS, 1)
    right = sum(max(range(len(s)), key=s.__getitem__) == r["gold"] for s, r in zip(scores, CHOICE_ROWS))
    assert final["eval_beta_accuracy"] == pytest.approx(right / 3)
    assert f"held-out accuracy (rank classification): beta {right / 3:.4f}" in err


def test_relaxed_bernoulli_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(work, capsys):
    """The routing noise of the resumed steps is the noise the uninterrupted run drew: the
    checkpoint's RNG state is restored. Without it (rng_state.pth removed) the run ends elsewhere,
    so the comparison is sensitive to the noise."""
    import shutil

    from safetensors.torch import load_file

    def config(name):
        return write_config(work, name, adapter={"kind": "tensorpoly1", "tensor_rank": 2},  # relaxed-bernoulli
                            data={"tasks": tasks(work), "mixing": "equal"},
                            train={"max_steps": 4, "save_steps": 2, "logging_steps": 1, "lr": 0.02})

    assert launch(config("rb-full")) == 0, capsys.readouterr().err[-2000:]
    full = load_file(work / "rb-full" / "adapter_model.safetensors")

    def interrupted_after_step_2(name, keep_rng=True):
        """The output directory as a run killed after checkpoint-2 leaves it."""
        out = work / name
        shutil.copytree(work / "rb-full", out)
        for leftover in ("FINISHED", "adapter_model.safetensors", "adapter_config.json", "checkpoints/checkpoint-4"):
            path = out / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not keep_rng:
            (out / "checkpoints" / "checkpoint-2" / "rng_state.pth").unlink()
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss": 1.2')  # a line cut short by the kill
        assert launch(config(name)) == 0, capsys.readouterr().err[-2000:]
        assert "resuming from" in capsys.readouterr().err
        return load_file(out / "adapter_model.safetensors")

    resumed = interrupted_after_step_2("rb-resumed")
    logged = [r["step"] for r in metrics(work / "rb-resumed") if "loss" in r]
    assert logged == [1, 2, 3, 4]  # the steps after the checkpoint are not logged twice
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
    other_noise = interrupted_after_step_2("rb-fresh-noise", keep_rng=False)
    assert max((other_noise[k] - full[k]).abs().max().item() for k in full) > 1e-4
