"""Naming tasks wherever a routed adapter meets a user: per-task merge and PEFT export (exact),
lm-eval routing by task name and per lm-eval task, few-shot adaptation through the launcher
(which parameters each mode changes), ``tensorft params`` with the real task count, the
routing heatmap; bad input is one line, exit 2, nothing written."""

import json
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tensorft
from conftest import randomize_adapters, save_tiny_chat_llama
from tensorft.cli import run as tensorft_cli
from test_multitask import launch, tasks, work, write_config  # noqa: F401  (work: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the evaluation package lives at the repository root

from evaluation import lm_eval as wrapper, routing_plot  # noqa: E402
from test_lm_eval import SST2, _jsonl, loglikelihoods, outputs  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
NAMES = ["alpha", "beta", "gamma"]
ROUTED = {
    "poly": {"n_skills": 3},
    "mhr": {"n_skills": 2, "n_splits": 2},
    "tensorpoly1": {"order": 2, "tensor_rank": 3},
    "tensorpoly2": {"order": 2, "tensor_rank": 2},
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny chat Llama; per routed kind an adapter with tasks alpha, beta, gamma (random
    weights); a poly adapter without task names; a lora adapter."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("routing_tools")
    base = save_tiny_chat_llama(root / "tiny")
    specs = {kind: {"kind": kind, "n_tasks": 3, "tasks": NAMES, **extra} for kind, extra in ROUTED.items()}
    specs["unnamed"] = {"kind": "poly", "n_tasks": 3, "n_skills": 3}
    specs["lora"] = {"kind": "lora"}
    for name, spec in specs.items():
        model = LlamaForCausalLM.from_pretrained(base)
        tensorft.attach(model, {"rank": 4, "alpha": 8, "targets": TARGETS, **spec})
        randomize_adapters(model, seed=1, scale=0.3)
        tensorft.save(model, str(root / name))
    return root


def ids(n=2, seq=9):
    return torch.randint(0, 1000, (n, seq), generator=torch.Generator().manual_seed(0))


def native_logits(model, task_id):
    with torch.no_grad():
        return model(ids(), task_ids=torch.full((2,), task_id)).logits


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("tensorft: error: ") and "\n" not in err, err
    assert all(w in err for w in words), err


# --------------------------------------------------------------------------- per-task merge / export


@pytest.mark.parametrize("kind", list(ROUTED))
def test_per_task_export_and_merge_are_exact(adapters, tmp_path, kind):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = tensorft.from_pretrained(str(adapters / kind)).eval()
    native = {t: native_logits(model, t) for t in (1, 2)}
    assert (native[1] - native[2]).abs().max() > 1e-3  # the tasks really differ
    tensorft.export_peft(model, str(tmp_path / "peft"), task="beta")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(adapters / "tiny")), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(ids()).logits, native[1], rtol=0, atol=1e-5)
    tensorft.merge(model, task="gamma")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, native[2], rtol=0, atol=1e-5)  # no task ids needed
    tensorft.unmerge(model)
    torch.testing.assert_close(native_logits(model, 1), native[1], rtol=0, atol=1e-5)


def test_cli_merge_and_export_by_task_name(adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = tensorft.from_pretrained(str(adapters / "tensorpoly2")).eval()
    assert tensorft_cli(["merge", str(adapters / "tensorpoly2"), str(tmp_path / "merged"), "--task", "alpha"]) == 0
    assert "merged model (task alpha) written to" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, native_logits(model, 0), rtol=0, atol=1e-5)
    # an adapter trained without names (Python API) takes the task id
    assert tensorft_cli(["export-peft", str(adapters / "unnamed"), str(tmp_path / "peft0"), "--task", "2"]) == 0
    assert (tmp_path / "peft0" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("adapter,task,words", [
    ("poly", None, ["'poly' is task-routed: name a task", "tasks: alpha, beta, gamma"]),
    ("poly", "delta", ["unknown task 'delta'", "tasks: alpha, beta, gamma"]),
    ("poly", "1", ["unknown task '1'", "tasks: alpha"]),  # names, not ids, when the adapter has names
    ("unnamed", "3", ["unknown task '3'", "no task names; its task ids are 0..2"]),
    ("lora", "alpha", ["kind lora is not task-routed"]),
])
@pytest.mark.parametrize("command", ["merge", "export-peft"])
def test_cli_task_errors_are_one_line_exit_2_nothing_written(adapters, tmp_path, capsys, command, adapter, task, words):
    argv = [command, str(adapters / adapter), str(tmp_path / "out")] + ([] if task is None else ["--task", task])
    assert tensorft_cli(argv) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_python_api_refuses_an_id_when_tasks_have_names(adapters, tmp_path):
    model = tensorft.from_pretrained(str(adapters / "poly"))
    with pytest.raises(tensorft.TensorftError, match=r"unknown task 0 \(tasks: alpha, beta, gamma\)"):
        tensorft.merge(model, task=0)
    with pytest.raises(tensorft.TensorftError, match="name a task"):
        tensorft.export_peft(model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists() and not any(layer.merged for layer in model.tensorft.layers.values())


# --------------------------------------------------------------------------- tensorft params


def test_params_counts_the_routing_rows_of_every_task(adapters, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    cfg = {"model": {"name_or_path": str(adapters / "tiny")},
           "adapter": {"kind": "tensorpoly1", "rank": 4, "alpha": 8, "targets": TARGETS, "order": 2, "tensor_rank": 3},
           "data": {"tasks": {name: {"train": "unread.jsonl"} for name in ["a", "b", "c", "d", "e"]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert tensorft_cli(["params", "--config", str(tmp_path / "c.yaml")]) == 0
    printed = int(capsys.readouterr().out.strip().splitlines()[-1].split(":")[-1])
    model = tensorft.attach(LlamaForCausalLM.from_pretrained(str(adapters / "tiny")), {**cfg["adapter"], "n_tasks": 5})
    assert printed == tensorft.count_parameters(model)
    assert printed - 6 * 3 * 4 == tensorft.count_parameters(  # 6 matrices x R=3 x 4 tasks more than 1 task
        tensorft.attach(LlamaForCausalLM.from_pretrained(str(adapters / "tiny")), cfg["adapter"]))


# --------------------------------------------------------------------------- routing heatmap


def test_routing_heatmap_plots_the_adapters_weights(adapters, tmp_path, capsys):
    from PIL import Image

    assert routing_plot.main([str(adapters / "mhr"), "--out", str(tmp_path / "mhr.png")]) == 0
    assert Image.open(tmp_path / "mhr.png").format == "PNG"
    model = tensorft.from_pretrained(str(adapters / "mhr"))
    routing = routing_plot.routing_weights(str(adapters / "mhr"))
    assert routing.tasks == NAMES and routing.experts == ["0.e0", "0.e1", "1.e0", "1.e1"]
    layers = model.tensorft.layers
    assert routing.matrices == list(layers)  # model order
    for m, layer in enumerate(layers.values()):
        z = torch.sigmoid(layer.adapter.routing_logits.detach())  # (tasks, heads, skills)
        expected = (z / z.sum(-1, keepdim=True)).reshape(3, -1)
        torch.testing.assert_close(routing.weights[:, :, m], expected, rtol=0, atol=1e-6)
    fig = routing_plot.draw(routing)  # what the panels show
    for t, ax in enumerate(fig.axes[:3]):
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), routing.weights[t])
    capsys.readouterr()
    assert routing_plot.main([str(adapters / "lora"), "--out", str(tmp_path / "lora.png")]) == 2
    one_line_error(capsys, "kind lora is not task-routed")
    assert not (tmp_path / "lora.png").exists()


# --------------------------------------------------------------------------- lm-eval by task name


def _tiny_tasks(directory, data):
    """Two lm-eval tasks on one local sst2-style file: sent_a and sent_b."""
    for name in ("sent_a", "sent_b"):
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{sentence}}\nQuestion: Is this sentence positive or negative?\nAnswer:",
            "doc_to_choice": ["negative", "positive"], "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}],
        }))


def test_lm_eval_routes_by_task_name_and_per_lm_eval_task(adapters, tmp_path, capsys):
    include = tmp_path / "tasks"
    include.mkdir()
    data = tmp_path / "sst2.jsonl"
    _jsonl(str(data), [{"sentence": s, "label": l} for s, l in SST2])
    _tiny_tasks(include, data)
    common = ["--adapter", str(adapters / "poly"), "--tasks", "sent_a,sent_b", "--include_path", str(include),
              "--device", "cpu", "--batch_size", "4", "--log_samples"]
    for name in ("alpha", "beta"):
        assert wrapper.main([*common, "--task-name", name, "--output_path", str(tmp_path / name)]) == 0
    assert wrapper.main([*common, "--task-map", "sent_a=alpha,sent_b=beta", "--output_path", str(tmp_path / "map")]) == 0
    lls = {run: {t: loglikelihoods(s) for t, s in outputs(tmp_path / run)[1].items()} for run in ("alpha", "beta", "map")}
    assert (lls["alpha"]["sent_a"] - lls["beta"]["sent_a"]).abs().max() > 1e-3  # the two tasks score differently
    torch.testing.assert_close(lls["map"]["sent_a"], lls["alpha"]["sent_a"], rtol=0, atol=1e-6)
    torch.testing.assert_close(lls["map"]["sent_b"], lls["beta"]["sent_b"], rtol=0, atol=1e-6)
    results, _, results_file = outputs(tmp_path / "map")
    assert results["config"]["tensorft"]["task_map"] == {"sent_a": "alpha", "sent_b": "beta"}
    assert "sent_a -> alpha" in open(results_file[: -len(".json")] + ".md").read()
    capsys.readouterr()
    for extra, words in [
        (["--task-name", "delta"], ["unknown task 'delta'", "tasks: alpha, beta, gamma"]),
        (["--task-map", "sent_a=alpha,sent_b"], ["--task-map", "expected lmeval_task=adapter_task"]),
        (["--task-name", "alpha", "--task-id", "0"], ["not both"]),
    ]:
        assert wrapper.main([*common, *extra, "--output_path", str(tmp_path / "bad")]) == 2
        one_line_error(capsys, *words)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- few-shot adaptation


@pytest.fixture(scope="module")
def trained(work):
    """A poly adapter trained through the launcher on tasks alpha and beta."""
    config = write_config(work, "fewshot-src", adapter={"kind": "poly", "n_skills": 2},
                          data={"tasks": tasks(work), "mixing": "equal"}, train={"max_steps": 2})
    assert launch(config) == 0
    return work / "fewshot-src"


def fewshot_config(work, name, adapter, task="gamma"):
    data = {"tasks": {task: {"train": str(work / "alpha.jsonl"), "format": "prompt-completion"}}}
    return write_config(work, name, adapter=adapter, data=data, train={"max_steps": 2, "lr": 0.01})


@pytest.mark.parametrize("mode", ["full", "routing", "modules"])
def test_fewshot_modes_change_exactly_their_parameters(work, trained, capsys, mode):
    from tensorft import train as recipe
    from tensorft.config import load_config

    # write_config's adapter keys (kind lora: the default; rank, alpha, targets: the saved ones) are fine
    config = fewshot_config(work, f"fewshot-{mode}", {"init_from": str(trained), "fewshot": mode})
    cfg = load_config(config)
    recipe.resolve_tasks(cfg)
    model, _ = recipe.build_model(cfg)  # what the launcher trains: count, optimizer, saved set agree
    trainable = {n for n, p in tensorft.adapter_parameters(model).items() if p.requires_grad}
    grouped = {id(p) for g in tensorft.optimizer_groups(model, lr=1e-3) for p in g["params"]}
    assert set(tensorft.trainable_parameters(model)) == trainable
    assert grouped == {id(tensorft.adapter_parameters(model)[n]) for n in trainable}
    assert tensorft.count_parameters(model) == sum(tensorft.adapter_parameters(model)[n].numel() for n in trainable)
    capsys.readouterr()
    assert tensorft_cli(["params", "--config", config]) == 0  # counts as the launcher trains
    assert f"trainable parameters: {tensorft.count_parameters(model)}" in capsys.readouterr().out.splitlines()

    assert launch(config) == 0, capsys.readouterr().err[-2000:]
    out = work / f"fewshot-{mode}"
    before, after = load_file(str(trained / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert set(before) == set(after)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["tasks"] == ["alpha", "beta", "gamma"] and saved["n_tasks"] == 3 and saved["fewshot"] == mode
    logits = [n for n in before if n.endswith("routing_logits")]
    experts = [n for n in before if n not in logits]
    assert {n for n in trainable if n.endswith("routing_logits")} == (set() if mode == "modules" else set(logits))
    for n in logits:
        assert after[n].shape[0] == 3
        torch.testing.assert_close(after[n][:2], before[n], rtol=0, atol=0)  # the old tasks' rows
        new_row = after[n][2]
        if mode == "modules":  # -mu: the mean of the old rows, frozen
            torch.testing.assert_close(new_row, before[n].mean(0), rtol=0, atol=0)
        else:  # trained away from its U(-1e-3, 1e-3) init
            assert new_row.abs().max() > 1e-2
    changed = [n for n in experts if not torch.equal(before[n], after[n])]
    assert changed == ([] if mode == "routing" else experts)
    assert "loss/gamma" in json.loads(open(out / "metrics.jsonl").readline())
    reloaded = tensorft.from_pretrained(str(out)).eval()
    with torch.no_grad():  # the new task routes by its name's id
        reloaded(ids(seq=5), task_ids=torch.full((2,), 2))


@pytest.mark.parametrize("adapter,task,words", [
    ({"init_from": "NOT_AN_ADAPTER"}, "gamma", ["adapter.init_from: ", "no adapter_config.json here"]),
    ({"init_from": "LORA"}, "gamma", ["holds a lora adapter, which is not task-routed"]),
    ({"init_from": "TRAINED"}, "alpha", ["data.tasks.alpha: ", "already has this task (tasks: alpha, beta)"]),
    ({"init_from": "TRAINED", "rank": 2}, "gamma", ["adapter.rank: 2, but the adapter in"]),
    ({"fewshot": "routing"}, "gamma", ["adapter.fewshot: needs adapter.init_from"]),
])
def test_fewshot_bad_input_one_line_exit_2_nothing_written(work, trained, tmp_path, capsys, adapter, task, words):
    if adapter.get("init_from") == "LORA":
        from transformers import LlamaForCausalLM

        lora = LlamaForCausalLM.from_pretrained(str(work / "tiny"))
        tensorft.save(tensorft.attach(lora, {"kind": "lora", "targets": ["q_proj"]}), str(tmp_path / "lora"))
    paths = {"NOT_AN_ADAPTER": str(tmp_path), "LORA": str(tmp_path / "lora"), "TRAINED": str(trained)}
    if "init_from" in adapter:
        adapter = {**adapter, "init_from": paths[adapter["init_from"]]}
    config = fewshot_config(work, "fewshot-bad", adapter, task)
    capsys.readouterr()
    assert launch(config) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("tensorft: error: ") and all(w in lines[-1] for w in words), lines
    assert not (work / "fewshot-bad").exists()
