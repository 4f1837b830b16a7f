"""A task-routed kind (TensorPoly-I) on a 2-task config through the launcher: one process and
2-rank DDP, ZeRO-2, ZeRO-3 and FSDP2 (killed after its first checkpoint and resumed) give the
same loss curve and adapter; the saved adapter reloads to the trained model's logits per task.

Routing is ``sigmoid`` here: relaxed-Bernoulli routing draws noise per row from each rank's
RNG, so one process (8 rows from one stream) and 2 ranks (4 rows each, from two streams seeded
alike) would train on different noise and only the deterministic routing is comparable.

The data make DDP reduce a gradient that one rank did not produce: 7 rows of task ``alpha``
and 1 of ``beta``, and the global batch (8) is the whole set, so at every step one rank's 4
rows are all ``alpha`` and its gradient for ``beta``'s routing row is zero, while the other
rank's is not.

Launches: one in-process run (the reference, also the model whose logits are compared), one
torchrun each for DDP, ZeRO-2 and ZeRO-3, two for FSDP2 (killed, resumed)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_chat_llama
from test_train import assert_same_run, kill_after_first_checkpoint, metrics, run_info, torchrun

WORDS = ["red", "green", "blue", "black", "white", "pink", "gray"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("routed-dist")
    save_tiny_chat_llama(work / "tiny")
    rows = {
        "alpha": [{"prompt": f"Alpha: say {w}.", "completion": f" {w} {w}"} for w in WORDS],  # 7 rows
        "beta": [{"prompt": "Beta: count to three.", "completion": " one two three"}],  # 1 row
    }
    for task, task_rows in rows.items():
        (work / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    return work


def write_config(work, name, batch_size, save_steps=10, distributed=None):
    cfg = {
        "model": {"name_or_path": str(work / "tiny")},
        "adapter": {"kind": "tensorpoly1", "rank": 4, "alpha": 8, "targets": TARGETS, "order": 2,
                    "tensor_rank": 2, "routing": "sigmoid"},
        "data": {"tasks": {t: {"train": str(work / f"{t}.jsonl")} for t in ("alpha", "beta")},
                 "format": "prompt-completion", "mixing": "proportional"},
        "train": {"output_dir": str(work / name), "max_steps": 4, "batch_size": batch_size, "lr": 0.01,
                  "logging_steps": 1, "save_steps": save_steps, "max_length": 64},
        **({"distributed": distributed} if distributed else {}),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def reference(work):
    """One process, global batch 8, 4 steps, run in this process through the launcher's
    ``main``; returns its output directory and the trained model."""
    from tensorft import train as recipe

    trainers = []

    def keep(*args, **kwargs):
        trainers.append(make_trainer(*args, **kwargs))
        return trainers[-1]

    make_trainer = recipe.make_trainer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "make_trainer", keep)
        assert recipe.main(["--config", write_config(work, "single", batch_size=8)]) == 0
    out = work / "single"
    assert json.loads((out / "tasks.json").read_text())["tasks"] == {
        "alpha": {"id": 0, "rows": 7, "mixed": 7}, "beta": {"id": 1, "rows": 1, "mixed": 1}}
    return out, trainers[0].model.eval()


def differences(run, reference):
    """(max loss difference over the steps, max adapter difference): reported by ``pytest -s``."""
    ref = {r["step"]: r["loss"] for r in metrics(reference) if "loss" in r}
    got = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}  # a resumed run logs each step once
    a, b = load_file(run / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    loss = max(abs(got[s] - ref[s]) for s in ref if s in got)
    weight = max((a[k] - b[k]).abs().max().item() for k in a if k in b)
    print(f"\n{run.name}: max loss difference {loss:.2e}, max adapter difference {weight:.2e}")
    return loss, weight


def assert_routing_trained_per_task(run):
    """Both tasks' losses are logged at every step, and each task's routing row left its init
    (U(-1e-3, 1e-3)) differently: the rare task's row was trained too."""
    assert all({"loss/alpha", "loss/beta"} <= set(r) for r in metrics(run))
    Z = {k: v for k, v in load_file(run / "adapter_model.safetensors").items() if k.endswith("routing_logits")}
    assert len(Z) == 14 and all(z.shape == (2, 2) for z in Z.values())
    assert max(z[1].abs().max().item() for z in Z.values()) > 0.1
    assert max((z[0] - z[1]).abs().max().item() for z in Z.values()) > 0.1


def test_ddp_with_a_rank_holding_one_task_matches_one_process(work, reference):
    """Every step, one DDP rank sees only task alpha (no gradient for beta's routing row on
    that rank): gradient reduction still works and the run is one process's."""
    single, _ = reference
    p = torchrun(write_config(work, "ddp", batch_size=4, distributed={"strategy": "ddp"}))
    assert p.returncode == 0, p.stderr[-3000:]
    info = run_info(work / "ddp")
    assert info["world_size"] == 2 and info["process_group"] == 2 and info["backend"] == "gloo"
    assert info["adapter"]["local"] == info["adapter"]["full"]  # DDP replicates
    differences(work / "ddp", single)
    assert_same_run(work / "ddp", single, loss_tol=2e-3, weight_tol=1e-4)
    assert_routing_trained_per_task(work / "ddp")


def assert_really_sharded(info):
    assert info["world_size"] == 2 and info["process_group"] == 2 and info["backend"] == "gloo"
    for part in ("adapter", "base"):
        assert info[part]["sharded_tensors"] == info[part]["tensors"] > 0, info
        assert info[part]["local"] <= info[part]["full"] // 2 + 64, info  # about half on each rank


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(work, reference, stage):
    """ZeRO-2 partitions gradients (the same one-task rank as under DDP), ZeRO-3 parameters too."""
    single, _ = reference
    name = f"zero{stage}"
    p = torchrun(write_config(work, name, batch_size=4, distributed={"strategy": "deepspeed", "zero_stage": stage}))
    assert p.returncode == 0, p.stderr[-3000:]
    info = run_info(work / name)
    assert info["strategy"] == "deepspeed"
    if stage == 3:
        assert_really_sharded(info)
    else:
        assert info["world_size"] == 2 and info["process_group"] == 2
        assert info["adapter"]["local"] == info["adapter"]["full"]  # ZeRO-2: parameters stay whole
    differences(work / name, single)
    assert_same_run(work / name, single, loss_tol=1e-4, weight_tol=1e-5)
    assert_routing_trained_per_task(work / name)


def test_fsdp2_killed_after_first_checkpoint_then_resumed_matches_one_process(work, reference):
    """SIGKILL after checkpoint-1 is complete, the same command again: it resumes (routing
    logits, their own learning rate's optimizer state, data position) and ends where the
    uninterrupted one-process run does."""
    single, _ = reference
    config = write_config(work, "fsdp", batch_size=4, save_steps=1, distributed={"strategy": "fsdp"})
    kill_after_first_checkpoint(config, work / "fsdp")
    p = torchrun(config)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr
    assert_really_sharded(run_info(work / "fsdp"))
    differences(work / "fsdp", single)
    assert_same_run(work / "fsdp", single, loss_tol=1e-4, weight_tol=1e-5)
    assert_routing_trained_per_task(work / "fsdp")
    assert_reloads_to(work / "fsdp", reference[1], atol=1e-4)  # the adapter gathered from the shards


def logits_per_task(model, tokenizer):
    prompts = [f"Alpha: say {w}." for w in WORDS[:3]] + ["Beta: count to three."]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return [model(**batch, task_ids=torch.full((len(prompts),), t)).logits for t in (0, 1)]


def assert_reloads_to(out, trained, atol):
    """``tensorft.from_pretrained(out)`` gives ``trained``'s logits for each task (evaluation
    routing), and the two tasks' logits differ."""
    import tensorft
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out.parent / "tiny")
    loaded = tensorft.from_pretrained(str(out)).eval()
    assert loaded.tensorft.config.tasks == ["alpha", "beta"]
    want, got = logits_per_task(trained, tokenizer), logits_per_task(loaded, tokenizer)
    for task in (0, 1):
        torch.testing.assert_close(got[task], want[task], rtol=0, atol=atol)
    assert (want[0] - want[1]).abs().max() > 1e-3  # the routing makes a difference


def test_from_pretrained_reproduces_the_trained_logits_per_task(reference):
    single, trained = reference
    assert_reloads_to(single, trained, atol=0)
