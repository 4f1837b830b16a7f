"""The training launcher, single process: SFT and DPO through trl, checkpoints, resume, signals,
and bad input. Runs ``launcher/train.py`` as users do, on a tiny Llama with a real tokenizer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_chat_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launcher", "train.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama (SmolLM2's tokenizer and chat template) and small data sets in every format."""
    work = tmp_path_factory.mktemp("train")
    save_tiny_chat_llama(work / "tiny")
    words = ["red", "green", "blue", "black", "white", "pink", "gray", "brown"]
    alpaca = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in words]
    _jsonl(work / "alpaca.jsonl", alpaca)
    _jsonl(work / "messages.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]} for w in words
    ])
    # shaped like the orca DPO pairs: the question is in `input` (mapped by data.columns)
    _jsonl(work / "pairs.jsonl", [
        {"system": "", "input": f"Colour: {w}?", "chosen": f" {w}", "rejected": f" {words[(i + 1) % 8]}"}
        for i, w in enumerate(words)
    ] * 2)
    return work


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_config(workdir, name, **sections):
    cfg = {
        "model": {"name_or_path": str(workdir / "tiny")},
        # lr_scale 1: one lr for every factor, as these tests were tuned (the kinds' own scales
        # are tested in test_learning_defaults.py; here a fast, stable loss is what matters).
        "adapter": {"kind": "cp", "rank": 4, "alpha": 8, "lr_scale": 1.0,
                    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": str(workdir / "alpaca.jsonl"), "format": "alpaca"},
        "train": {"output_dir": str(workdir / name), "max_steps": 8, "batch_size": 8, "lr": 0.01,
                  "logging_steps": 1, "save_steps": 4, "max_length": 64},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train(config, *extra, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, TRAIN, "--config", config, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_sft_loss_falls_and_only_the_adapter_changes(workdir):
    import tensorft

    p = train(write_config(workdir, "sft"))
    assert p.returncode == 0, p.stderr[-2000:]
    out = workdir / "sft"
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["learning_rate"] is not None for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.15  # the same 8 rows every step
    assert os.listdir(out / "tensorboard")
    assert yaml.safe_load((out / "config.yaml").read_text())["adapter"]["kind"] == "cp"
    assert os.listdir(out / "checkpoints") and not (out / "checkpoints" / "README.md").exists()  # no trl card
    model = tensorft.from_pretrained(str(out))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    for name, p_base in base.named_parameters():  # the base weights are untouched
        trained_name = name if name in dict(model.named_parameters()) else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(dict(model.named_parameters())[trained_name], p_base), name
    factors = load_file(out / "adapter_model.safetensors")
    assert factors["tensorft.shared.attention.B"].abs().max() > 0  # B starts at zero: it learned


@pytest.mark.parametrize("kind", ["lora", "tt"])
def test_every_registered_kind_trains_through_the_launcher(workdir, kind):
    p = train(write_config(workdir, f"sft-{kind}", adapter={"kind": kind}, train={"max_steps": 5, "save_steps": 10}))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = metrics(workdir / f"sft-{kind}")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert json.loads((workdir / f"sft-{kind}" / "adapter_config.json").read_text())["kind"] == kind


def test_finished_run_is_not_overwritten(workdir):
    before = (workdir / "sft" / "adapter_model.safetensors").read_bytes()
    p = train(str(workdir / "sft.yaml"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("tensorft: error: train.output_dir:")
    assert "already holds a finished run" in p.stderr and "Traceback" not in p.stderr
    assert (workdir / "sft" / "adapter_model.safetensors").read_bytes() == before


def test_sigkill_then_resume_equals_uninterrupted_run(workdir):
    config = write_config(workdir, "resumed", train={"save_steps": 2})
    proc = train(config, wait=False)
    marker = workdir / "resumed" / "checkpoints" / "checkpoint-4" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "resumed" / "adapter_model.safetensors").exists()
    p = train(config)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming from" in p.stderr and "checkpoint-" in p.stderr
    uninterrupted = load_file(workdir / "sft" / "adapter_model.safetensors")
    resumed = load_file(workdir / "resumed" / "adapter_model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6)


def test_sigterm_writes_a_checkpoint_before_exit(workdir):
    config = write_config(workdir, "preempted", train={"max_steps": 400, "save_steps": 1000})
    proc = train(config, wait=False)
    metrics_file = workdir / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics_file.exists() or metrics_file.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    from tensorft.trainers import complete_checkpoints

    done = complete_checkpoints(str(workdir / "preempted" / "checkpoints"))
    assert len(done) == 1
    step = int(os.path.basename(done[0]).split("-")[1])
    assert 1 <= step < 400
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(done[0])
    )


def test_messages_format_and_dpo(workdir):
    p = train(write_config(workdir, "chat", data={"train": str(workdir / "messages.jsonl"), "format": "messages"},
                           train={"max_steps": 4}))
    assert p.returncode == 0, p.stderr[-2000:]
    config = write_config(
        workdir, "dpo",
        data={"train": str(workdir / "pairs.jsonl"), "format": "preference", "columns": {"prompt": "input"}},
        train={"objective": "dpo", "max_steps": 6, "dpo_beta": 0.1, "lr": 0.02},
    )
    p = train(config)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = metrics(workdir / "dpo")
    # DPO's loss starts at log 2 exactly when the reference is the policy with adapters off
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3
    assert rows[-1]["loss"] < rows[0]["loss"]


BAD_INPUT = [
    ({"adapter": {"rnak": 4}}, "adapter.rnak: unknown key"),
    ({"data": {"train": "no/such/file.jsonl"}}, "data.train: no/such/file.jsonl: no such file"),
    ({"data": {"train": "BROKEN_ROW"}}, "broken.jsonl: row 3: missing field 'output' (data.format: alpaca)"),
    ({"train": {"objective": "dpo"}}, "data.format: dpo needs preference data"),
    ({"train": {"batch_size": 0}}, "train.batch_size: must be at least 1"),
    ({"data": {"columns": {"question": "input"}}}, "data.columns.question: not a field of data.format alpaca"),
    ({"data": {"columns": {"output": "answer"}}}, "alpaca.jsonl: row 1: no column 'answer' (data.columns.output)"),
]


@pytest.mark.parametrize("sections,message", BAD_INPUT, ids=[m.split(":")[0] for _, m in BAD_INPUT])
def test_bad_input_one_line_exit_2_nothing_written(workdir, sections, message):
    if sections.get("data", {}).get("train") == "BROKEN_ROW":
        rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
        _jsonl(workdir / "broken.jsonl", rows)
        sections = {"data": {"train": str(workdir / "broken.jsonl")}}
    name = "bad-" + message.split(":")[0].replace(".", "-")
    p = train(write_config(workdir, name, **sections))
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("tensorft: error: ")
    assert "Traceback" not in p.stderr
    assert not (workdir / name).exists()


SLURM_RUNS = {  # script -> the tiny config it runs here (each script's own default is a 7B model)
    "lorta_alpaca.sh": {"distributed": {"strategy": "ddp"}},
    "lorta_dpo.sh": {"distributed": {"strategy": "ddp"}, "train": {"objective": "dpo"},
                     "data": {"format": "preference", "columns": {"prompt": "input"}}},
    "zero3_multinode.sh": {"distributed": {"strategy": "deepspeed", "zero_stage": 3}},
}


@pytest.mark.parametrize("script", sorted(SLURM_RUNS))
def test_slurm_script_trains_two_local_ranks(workdir, tmp_path, script):
    """Each sbatch script run as SLURM would, with a stand-in srun that runs the task locally."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    for f in ("srun", "scontrol"):
        os.chmod(bin_dir / f, 0o755)
    sections = SLURM_RUNS[script]
    name = "slurm-" + script.split(".")[0]
    data = {**({"train": str(workdir / "pairs.jsonl")} if "columns" in sections.get("data", {}) else {}),
            **sections.get("data", {})}
    config = write_config(workdir, name, distributed=sections["distributed"], data=data,
                          train={"max_steps": 2, "save_steps": 10, "batch_size": 4, **sections.get("train", {})})
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[01]",
        "SLURM_SUBMIT_DIR": ROOT, "GPUS_PER_NODE": "2", "CONFIG": config, "PYTHON": sys.executable,
    }
    p = subprocess.run(["bash", os.path.join(ROOT, "slurm", script)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 node(s) x 2 process(es), rendezvous localhost:" in p.stdout
    info = json.loads((workdir / name / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["process_group"] == 2 and info["backend"] == "gloo"
    assert [r["step"] for r in metrics(workdir / name)] == [1, 2]
    assert (workdir / name / "FINISHED").exists()


def torchrun(config, *extra, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", TRAIN, "--config", config, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_run(workdir):
    """One process, global batch 8, 4 steps: what every 2-rank launch (4 rows each) must reproduce.
    Evaluated at the end on 6 held-out rows (``EVAL``): 2 ranks hold 4 and 2 (+ 2 repeated)."""
    words = ["red", "green", "blue", "black", "white", "pink"]
    _jsonl(workdir / "alpaca_dev.jsonl", [{"instruction": f"Say the word {w} twice.", "input": "",
                                            "output": f"{w} {w}" + " again" * i} for i, w in enumerate(words)])
    p = train(write_config(workdir, "single", data=EVAL(workdir), train={"max_steps": 4, "batch_size": 8, "save_steps": 10}))
    assert p.returncode == 0, p.stderr[-2000:]
    return workdir / "single"


def EVAL(workdir):
    return {"eval": str(workdir / "alpaca_dev.jsonl")}


def assert_same_eval_loss(run, reference, tol=1e-5):
    """The held-out loss of the end-of-training evaluation: the data set's, whatever the ranks
    (not each rank's batch loss repeated and cut to the real rows, which kept rank 0's alone)."""
    got, want = ([r["eval_loss"] for r in metrics(out) if "eval_loss" in r] for out in (run, reference))
    assert len(got) == len(want) == 1, (got, want)
    assert got[0] == pytest.approx(want[0], abs=tol), (got, want)


def assert_same_run(run, reference, loss_tol, weight_tol):
    """Same losses step by step (a resumed run logs each step once) and the same final adapter."""
    logged = [r["step"] for r in metrics(run) if "loss" in r]
    assert logged == sorted(set(logged)), logged
    by_step = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    ref = {r["step"]: r["loss"] for r in metrics(reference) if "loss" in r}
    assert sorted(by_step) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert abs(by_step[step] - ref[step]) < loss_tol, (step, by_step, ref)
    a, b = load_file(run / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=weight_tol)


def run_info(run):
    return json.loads((run / "run_info.json").read_text())


def test_ddp_two_ranks_matches_single_process_loss_curve(workdir, reference_run):
    """torchrun DDP: really two ranks (not a silent one-process fallback), same losses as one
    process with the same global batch."""
    ddp = write_config(workdir, "ddp", data=EVAL(workdir), train={"max_steps": 4, "batch_size": 4, "save_steps": 10},
                       distributed={"strategy": "ddp"})
    p = torchrun(ddp)
    assert p.returncode == 0, p.stderr[-2000:]
    info = run_info(workdir / "ddp")
    assert info["world_size"] == 2 and info["process_group"] == 2
    assert info["adapter"]["local"] == info["adapter"]["full"]  # DDP replicates
    assert_same_run(workdir / "ddp", reference_run, loss_tol=2e-3, weight_tol=1e-4)
    assert_same_eval_loss(workdir / "ddp", reference_run)


def test_deepspeed_zero2_two_ranks_matches_single_process(workdir, reference_run):
    """Started by DeepSpeed's own launcher (`deepspeed --num_gpus 2`, two CPU ranks here)."""
    config = write_config(workdir, "zero2", train={"max_steps": 4, "batch_size": 4, "save_steps": 2},
                          distributed={"strategy": "deepspeed", "zero_stage": 2})
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    p = subprocess.run([launcher, "--num_gpus", "2", TRAIN, "--config", config], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    info = run_info(workdir / "zero2")
    assert info["strategy"] == "deepspeed" and info["world_size"] == 2 and info["process_group"] == 2
    # ZeRO-2 partitions optimizer state and gradients; parameters stay whole on every rank
    assert info["adapter"]["local"] == info["adapter"]["full"]
    checkpoint = workdir / "zero2" / "checkpoints" / "checkpoint-4"
    assert os.path.isdir(checkpoint / "global_step4")
    assert_same_run(workdir / "zero2", reference_run, loss_tol=1e-4, weight_tol=1e-5)
    # no file of the checkpoint holds the frozen base (DeepSpeed writes the whole module by default)
    from transformers import AutoModelForCausalLM

    base_bytes = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(workdir / "tiny").parameters())
    files = [f for f in checkpoint.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < base_bytes / 4, sorted((f.stat().st_size, f.name) for f in files)[-3:]
    # ... and resuming from such a checkpoint (the state a kill after checkpoint-2 leaves) ends
    # where the uninterrupted run did
    resumed = workdir / "zero2-resumed"
    shutil.copytree(workdir / "zero2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("FINISHED", "adapter_model.safetensors", "adapter_config.json"):
        (resumed / name).unlink()
    config = write_config(workdir, "zero2-resumed", train={"max_steps": 4, "batch_size": 4, "save_steps": 2},
                          distributed={"strategy": "deepspeed", "zero_stage": 2})
    p = subprocess.run([launcher, "--num_gpus", "2", TRAIN, "--config", config], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and "resuming from" in p.stderr, p.stderr[-2000:]
    assert_same_run(resumed, reference_run, loss_tol=1e-4, weight_tol=1e-5)


def kill_after_first_checkpoint(config, out):
    proc = torchrun(config, wait=False)
    marker = out / "checkpoints" / "checkpoint-1" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the whole tree, ranks first
    import psutil

    launcher = psutil.Process(proc.pid)
    for p in launcher.children(recursive=True) + [launcher]:
        p.kill()
    _, err = proc.communicate()
    assert marker.exists(), err[-3000:]
    assert not (out / "FINISHED").exists()


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_signal_to_one_rank_checkpoints_and_stops_every_rank(workdir, strategy):
    """SIGUSR1 delivered to rank 1 only (rank 0 writes the checkpoint's marker): the ranks agree
    at a step boundary, write one complete checkpoint together and all exit as stopped by it,
    instead of one rank waiting forever in collectives the others never enter."""
    import psutil

    dist = {"strategy": "fsdp"} if strategy == "fsdp" else {"strategy": "deepspeed", "zero_stage": 3}
    config = write_config(workdir, f"signal-{strategy}", distributed=dist,
                          train={"max_steps": 400, "batch_size": 4, "save_steps": 1000, "logging_steps": 1})
    out = workdir / f"signal-{strategy}"
    proc = torchrun(config, wait=False)
    deadline = time.time() + 400
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if TRAIN in " ".join(p.cmdline())]
    (rank1,) = [p for p in workers if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGUSR1)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            p.kill()
        raise AssertionError("the ranks did not stop together after a signal to one of them (hang)") from None
    from tensorft.trainers import complete_checkpoints

    (checkpoint,) = complete_checkpoints(str(out / "checkpoints"))
    assert err.count("tensorft: stopped by SIGUSR1") == 2, err[-3000:]  # both ranks, the same step
    # torchrun prints its own summary of ranks that exited non-zero; no rank raised
    assert 'tensorft/' not in "".join(line for line in err.splitlines(True) if line.lstrip().startswith('File "'))
    assert not (out / "FINISHED").exists()
    assert int(checkpoint.rsplit("-", 1)[1]) < 400


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_run_killed_then_resumed_equals_single_process(workdir, reference_run, strategy):
    """FSDP2 and ZeRO-3 really partition every parameter, the CP tensor's shared factors
    included, over 2 ranks; a run SIGKILLed after its first checkpoint and started again
    resumes from it and ends where one process does (same loss curve, same adapter)."""
    dist = {"strategy": "fsdp"} if strategy == "fsdp" else {"strategy": "deepspeed", "zero_stage": 3}
    config = write_config(workdir, strategy, train={"max_steps": 4, "batch_size": 4, "save_steps": 1},
                          distributed=dist)
    out = workdir / strategy
    kill_after_first_checkpoint(config, out)
    p = torchrun(config)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr
    info = run_info(out)
    assert info["world_size"] == 2 and info["process_group"] == 2 and info["backend"] == "gloo"
    for part in ("adapter", "base"):
        assert info[part]["sharded_tensors"] == info[part]["tensors"] > 0, info
        assert info[part]["local"] <= info[part]["full"] // 2 + 64, info  # about half on each rank
    shared = load_file(out / "adapter_model.safetensors")["tensorft.shared.attention.A"]
    assert shared.shape == (64, 4)  # saved whole, gathered from the shards
    assert_same_run(out, reference_run, loss_tol=1e-4, weight_tol=1e-5)


def test_dpo_on_two_fsdp_ranks_matches_single_process(workdir):
    """DPO with its reference log-probs precomputed (adapters off) on sharded ranks: the cache
    the main process writes is found by the other rank, and the losses are one process's."""
    dpo = {"data": {"train": str(workdir / "pairs.jsonl"), "format": "preference", "columns": {"prompt": "input"}},
           "train": {"objective": "dpo", "max_steps": 3, "lr": 0.02, "save_steps": 10}}
    one = write_config(workdir, "dpo-one", data=dpo["data"], train={**dpo["train"], "batch_size": 8})
    two = write_config(workdir, "dpo-fsdp", data=dpo["data"], train={**dpo["train"], "batch_size": 4},
                       distributed={"strategy": "fsdp"})
    assert train(one).returncode == 0
    p = torchrun(two)
    assert p.returncode == 0, p.stderr[-3000:]
    assert run_info(workdir / "dpo-fsdp")["adapter"]["sharded_tensors"] > 0
    a, b = metrics(workdir / "dpo-one"), metrics(workdir / "dpo-fsdp")
    assert abs(b[0]["loss"] - 0.6931) < 1e-3
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (a, b)


def test_nf4_base_sft(workdir):
    """A 4-bit (bitsandbytes nf4) base trains through the launcher, and the adapter reloads
    onto a 4-bit base."""
    import tensorft

    config = write_config(workdir, "nf4", model={"quantization": "nf4"}, train={"max_steps": 6, "save_steps": 10})
    p = train(config)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = metrics(workdir / "nf4")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    model = tensorft.from_pretrained(str(workdir / "nf4"))
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_packing_fills_sequences(workdir):
    """Packing (trl's best-fit) puts two ~40-token examples into each 128-token row: half the
    steps per epoch of the unpacked run, and the loss still falls."""
    common = {"max_steps": -1, "epochs": 3, "batch_size": 2, "max_length": 128, "save_steps": 100}
    for name, packing in (("packed", True), ("unpacked", False)):
        p = train(write_config(workdir, name, train={**common, "packing": packing}))
        assert p.returncode == 0, p.stderr[-2000:]
    packed, unpacked = metrics(workdir / "packed"), metrics(workdir / "unpacked")
    assert len(unpacked) == 12 and len(packed) == 6
    assert packed[-1]["loss"] < packed[0]["loss"]


def test_strategy_must_match_the_launch(workdir):
    p = train(write_config(workdir, "bad-fsdp", distributed={"strategy": "fsdp"}))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "distributed.strategy: fsdp needs a distributed launch" in p.stderr.strip().splitlines()[-1]
    p = train(write_config(workdir, "bad-fsdp-int8", distributed={"strategy": "fsdp"}, model={"quantization": "int8"}))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "model.quantization: int8 bases cannot be sharded by FSDP2" in p.stderr.strip().splitlines()[-1]
    assert not (workdir / "bad-fsdp").exists() and not (workdir / "bad-fsdp-int8").exists()


def test_activation_checkpointing_trains_the_same_adapter(workdir):
    """Non-reentrant activation checkpointing with no input gradient forced (tensorft does not
    call enable_input_require_grads): every checkpointed block's adapter still gets its
    gradient, so the run equals one without checkpointing."""
    for name, on in (("ckpt-on", True), ("ckpt-off", False)):
        p = train(write_config(workdir, name, train={"max_steps": 3, "save_steps": 10, "gradient_checkpointing": on}))
        assert p.returncode == 0, p.stderr[-2000:]
    on, off = metrics(workdir / "ckpt-on"), metrics(workdir / "ckpt-off")
    assert [r["loss"] for r in on if "loss" in r] == pytest.approx([r["loss"] for r in off if "loss" in r], abs=1e-5)
    a, b = load_file(workdir / "ckpt-on" / "adapter_model.safetensors"), load_file(workdir / "ckpt-off" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    losses = [r["loss"] for r in on if "loss" in r]
    assert losses[-1] < losses[0], losses  # it trained (not two runs that both stood still)


def test_a_failing_rank_names_its_error_in_torchruns_summary(workdir):
    """torchrun ends with its own failure summary; it must carry the rank's one-line error, not
    "error_file: <N/A>" and a link to its docs (the line was 40 lines up, above a traceback)."""
    p = torchrun(write_config(workdir, "ddp-missing-data", distributed={"strategy": "ddp"},
                              data={"train": str(workdir / "no-such-file.jsonl"), "format": "alpaca"}))
    assert p.returncode != 0
    summary = p.stderr[p.stderr.index("Root Cause"):]
    assert "traceback : tensorft: error: data.train:" in summary and "no-such-file.jsonl" in summary, summary
    assert not (workdir / "ddp-missing-data").exists()
    # DeepSpeed's launcher prints the ranks' stderr as it comes and passes the exit code on: the
    # line must be among its last lines, not buried above a traceback
    config = write_config(workdir, "zero2-missing-data", distributed={"strategy": "deepspeed", "zero_stage": 2},
                          data={"train": str(workdir / "no-such-file.jsonl"), "format": "alpaca"})
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    p = subprocess.run([launcher, "--num_gpus", "2", TRAIN, "--config", config], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2
    last = (p.stdout + p.stderr).strip().splitlines()[-6:]
    assert any(line.startswith("tensorft: error: data.train:") for line in last), last
    assert "Traceback" not in p.stdout + p.stderr


def test_atomic_writes_are_durable_before_and_after_the_rename(tmp_path, monkeypatch):
    """The file's data is synced before the rename and its directory after (a rename alone can
    survive a crash pointing at data that never reached the disk); a checkpoint-like tree is
    synced file by file before its marker."""
    from tensorft import saving

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out" / "config.yaml"
    saving.write_text(str(target), "a: 1\n")
    (synced_tmp, rename, synced_dir) = events
    assert synced_tmp[0] == "fsync" and synced_tmp[1].startswith(str(tmp_path / "out" / ".config.yaml."))
    assert rename == ("rename", str(target)) and synced_dir == ("fsync", str(tmp_path / "out"))
    events.clear()
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for name in ("ckpt/a.pt", "ckpt/sub/b.pt"):
        (tmp_path / name).write_bytes(b"x")
    saving.fsync_tree(str(tmp_path / "ckpt"))
    assert [path for _, path in events] == [str(tmp_path / p) for p in ("ckpt/sub/b.pt", "ckpt/sub", "ckpt/a.pt", "ckpt")]


def test_a_new_classification_head_is_seeded_by_train_seed(tmp_path):
    """A seq-cls base loaded from a causal-LM checkpoint gets a new head, drawn while loading:
    from train.seed, not from whatever the process's RNG held (same config, same head)."""
    from conftest import save_tiny_chat_llama
    from tensorft.config import parse_config
    from tensorft.train import build_model

    save_tiny_chat_llama(tmp_path / "tiny")
    cfg = parse_config({"model": {"name_or_path": str(tmp_path / "tiny"), "task": "seq-cls", "num_labels": 3},
                        "adapter": {"kind": "lora", "rank": 2, "targets": ["q_proj"]},
                        "data": {"train": "rows.jsonl", "format": "classification"},
                        "train": {"output_dir": str(tmp_path / "out"), "seed": 7}})
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # what earlier work left in the global RNG
        model, _ = build_model(cfg)
        heads.append(model.score.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
