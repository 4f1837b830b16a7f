"""TT-LoRA MoE (issue 11): frozen tt experts behind a noisy top-1 router.

In memory (tiny Llama built in code, three random tt experts saved to disk): a one-hot router
equals the chosen expert alone; a batch mixing all experts equals a per-row loop (and builds no
all-experts stack); noise only in training; a stage-2 step gives the experts no gradient and runs
no expert pass; generate routes once at prefill, holds the choice through the KV-cached decode
steps and equals each prompt alone with its expert; save / load without the expert directories.

Through the launchers (tiny Llama with a real tokenizer, three tasks told apart by their
prompts): stage 1 trains one expert per task, resumes by skipping finished experts; stage 2
trains the router (accuracy on held-out data > 0.9, logged usage), leaves the experts
unchanged, reloads with from_pretrained, exports one expert as PEFT LoRA, refuses a merge; bad
input stops with one line, exit 2, nothing written. Stage 2 on 2 ranks (DDP, FSDP2, ZeRO-3; the
seq-cls setting under ZeRO-3) equals one process, held-out losses included; so does plain seq-cls
(no router) on 2 DDP ranks with gradient accumulation."""

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tensorft
from conftest import ShapeRecorder, randomize_adapters, save_tiny_chat_llama, tiny_llama, tokens
from tensorft.errors import TensorftError
from tensorft.saving import load_adapter_weights, read_adapter_config

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TT = {"kind": "tt", "rank": 3, "alpha": 6, "targets": TARGETS}
NAMES = ["alpha", "beta", "gamma"]


def save_experts(directory, names=NAMES, **tt):
    dirs = []
    for i, name in enumerate(names):
        model = tensorft.attach(tiny_llama(), {**TT, **tt, "tasks": [name]})
        randomize_adapters(model, seed=10 + i, scale=0.4)
        tensorft.save(model, str(directory / name))
        dirs.append(str(directory / name))
    return dirs


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three random tt experts of ``tiny_llama()``, each named by its one task."""
    return save_experts(tmp_path_factory.mktemp("experts"))


def moe(dirs, **options):
    return tensorft.attach(tiny_llama(), {"kind": "ttmoe", "experts": dirs, **options})


def expert_alone(directory):
    adapter, _, _ = read_adapter_config(directory)
    return load_adapter_weights(tensorft.attach(tiny_llama(), adapter), directory)


def one_hot_router(model, expert):
    """Router weights that send every row to ``expert``."""
    router = model.tensorft.shared
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.zero_()
        router.gate.bias[expert] = 10.0


# --------------------------------------------------------------------------- the layers


def test_one_hot_router_equals_the_chosen_expert_alone(experts):
    model = moe(experts)
    ids = tokens(batch=3, seq=6)
    logits = []
    for e, directory in enumerate(experts):
        one_hot_router(model, e)
        got = model(ids).logits
        # float32 rounding only: a tt expert alone adds its update inside one addmm (lora_update)
        torch.testing.assert_close(got, expert_alone(directory)(ids).logits, rtol=0, atol=1e-5)
        logits.append(got)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the experts differ
    assert model.tensorft.config.tasks == NAMES and tensorft.count_parameters(model) == 2 * 3 * 65


def test_grouped_inference_equals_a_per_row_loop_and_stacks_no_experts(experts):
    model = moe(experts)
    ids, chosen = tokens(batch=6, seq=7, seed=2), torch.tensor([0, 2, 1, 1, 0, 2])
    with ShapeRecorder() as rec:
        mixed = model(ids, expert_ids=chosen).logits
    for i in range(6):
        alone = model(ids[i : i + 1], expert_ids=chosen[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-6)
    # never a dense (E, ...) stack of every expert's cores or factors in a forward
    stacked = set()
    for layer in model.tensorft.layers.values():
        a = layer.adapter
        stacked |= {tuple(c.shape) for c in a.cores}
        stacked |= {(3, 3, a.in_features), (3, a.out_features, 3)}
    assert not rec.shapes & stacked


def test_noise_is_on_in_training_only(experts):
    model = moe(experts)
    router = model.tensorft.shared
    with torch.no_grad():
        router.noise.weight.mul_(50)  # noise far larger than the gate's logits
    ids, labels = tokens(batch=8, seq=6, seed=4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    kind = model.tensorft.kind
    model.eval()
    clean = kind.route(model, {"input_ids": ids})
    for _ in range(5):
        assert torch.equal(kind.route(model, {"input_ids": ids}), clean)
        with tensorft.collect_aux_losses(model) as aux:
            model(ids, task_ids=labels)
        assert not aux  # evaluation: routed by the clean router, no router loss
    model.train()
    losses = set()
    for _ in range(3):
        with tensorft.collect_aux_losses(model) as aux:
            model(ids, task_ids=labels)
        losses.add(round(aux["router_ce"].item(), 6))
    assert len(losses) == 3  # noisy

    quiet = moe(experts, noise=False).train()
    assert quiet.tensorft.shared.noise is None
    first = [None, None]
    for i in range(2):
        with tensorft.collect_aux_losses(quiet) as aux:
            quiet(ids, task_ids=labels)
        first[i] = aux["router_ce"].item()
    assert first[0] == first[1]


def test_a_stage_2_step_trains_the_router_only_with_no_expert_pass(experts):
    model = moe(experts).train()
    kind = model.tensorft.kind
    before = {n: p.clone() for n, p in tensorft.adapter_parameters(model).items()}
    trainable = tensorft.trainable_parameters(model)
    assert sorted(trainable) == sorted(
        f"tensorft.shared.{m}.{w}" for m in ("gate", "noise") for w in ("weight", "bias"))
    expert_calls = []
    for layer in model.tensorft.layers.values():
        layer.adapter.register_forward_hook(lambda *a: expert_calls.append(1))
    opt = torch.optim.AdamW(tensorft.optimizer_groups(model, lr=0.1))
    ids, labels = tokens(batch=6, seq=6, seed=5), torch.tensor([0, 1, 2, 2, 1, 0])
    kind.router_passes = 0
    for _ in range(3):
        with tensorft.collect_aux_losses(model) as aux:
            model(ids, labels=ids, task_ids=labels)
        aux["router_ce"].backward()
        for n, p in tensorft.adapter_parameters(model).items():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad()
    assert not expert_calls and kind.router_passes == 0  # one base pass per step: the step's own
    for n, p in tensorft.adapter_parameters(model).items():
        assert torch.equal(p, before[n]) == (n not in trainable), n
    assert kind.confusion["train"].sum() == 18


# --------------------------------------------------------------------------- generate


def test_generate_holds_the_prefill_choice_and_equals_each_prompt_alone(experts):
    model = moe(experts).eval()
    kind = model.tensorft.kind
    with torch.no_grad():  # a router that sends these prompts to every expert
        model.tensorft.shared.gate.weight.normal_(0, 3.0)
    prompts = next(
        p for p in (tokens(batch=6, seq=5, seed=s) for s in range(50))
        if len(set(kind.route(model, {"input_ids": p}).tolist())) == 3
    )
    chosen = kind.route(model, {"input_ids": prompts})
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(prompts)
    kind.router_passes = 0
    together = model.generate(prompts, attention_mask=mask, **kw)
    assert kind.router_passes == 1  # prefill only; decode steps keep its choice
    for i in range(6):
        alone = expert_alone(experts[int(chosen[i])]).generate(prompts[i : i + 1], attention_mask=mask[i : i + 1], **kw)
        assert torch.equal(together[i : i + 1], alone), i
        forced = model.generate(prompts[i : i + 1], attention_mask=mask[i : i + 1], expert_ids=chosen[i : i + 1], **kw)
        assert torch.equal(forced, alone), i

    # decode steps by hand: the prefill's choice, each row through its own expert's TT cores
    from transformers import DynamicCache

    def decode_steps(model, prompts, mask, expert_ids=None, steps=3):
        cache, kw = DynamicCache(), {} if expert_ids is None else {"expert_ids": expert_ids}
        with torch.no_grad():
            logits = model(prompts, attention_mask=mask, past_key_values=cache, use_cache=True, **kw).logits[:, -1]
            out, last = [logits], prompts[:, -1:]
            for _ in range(steps):
                last = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(last)], 1)
                logits = model(last, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
                out.append(logits)
        return torch.stack(out, 1), cache

    steps, cache = decode_steps(model, prompts, mask)
    memory = model.tensorft.state.generation_memory(cache)
    assert torch.equal(memory["expert_ids"], chosen)
    # kept for the call: each row's expert's TT cores (TT-sized), no expert's or row's dense factors
    held = memory["ttmoe_factors"]
    assert held and {k[1] for k in held} == {"row_cores"}
    for (layer, _), cores in held.items():  # row i: its expert's cores (laid out for batched products)
        assert [c.shape[0] for c in cores] == [6] * len(layer.cores)
        assert [c[0].numel() for c in cores] == [c[0].numel() for c in layer.cores]
        for i in range(6):
            assert all(torch.equal(c[i].flatten().sort().values, full[int(chosen[i])].flatten().sort().values)
                       for c, full in zip(cores, layer.cores))
    # grouped decode = a per-row loop (each row alone through the same MoE, its expert forced)
    for i in range(6):
        alone, _ = decode_steps(model, prompts[i : i + 1], mask[i : i + 1], expert_ids=chosen[i : i + 1])
        torch.testing.assert_close(steps[i : i + 1], alone, rtol=0, atol=1e-6)
    ref = expert_alone(experts[int(chosen[0])])
    full = torch.cat([prompts[:1], steps[:1, :-2].argmax(-1)], 1)
    torch.testing.assert_close(steps[0, -2], ref(full).logits[0, -1], rtol=0, atol=1e-5)
    # beam search: rows expanded per beam at prefill, reordered within a prompt at every step
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2)
    beams = model.generate(prompts, attention_mask=mask, **kw)
    for i in range(6):
        assert torch.equal(beams[2 * i : 2 * i + 2], model.generate(prompts[i : i + 1], attention_mask=mask[i : i + 1], **kw)), i


# --------------------------------------------------------------------------- save / load


def test_save_and_load_without_the_expert_directories(experts, tmp_path):
    copies = [shutil.copytree(d, tmp_path / "experts" / os.path.basename(d)) for d in experts]
    model = moe([str(c) for c in copies])
    with torch.no_grad():
        model.tensorft.shared.gate.weight.normal_(0, 3.0)
    tensorft.save(model, str(tmp_path / "moe"))
    shutil.rmtree(tmp_path / "experts")
    adapter, _, raw = read_adapter_config(str(tmp_path / "moe"))
    assert raw["expert_names"] == NAMES and raw["tasks"] == NAMES and raw["kind"] == "ttmoe"
    fresh = load_adapter_weights(tensorft.attach(tiny_llama(), adapter), str(tmp_path / "moe"))
    ids = tokens(batch=5, seq=6, seed=7)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    for name, p in tensorft.adapter_parameters(fresh).items():
        assert p.requires_grad == (".adapter.cores." not in name)
    with pytest.raises(TensorftError, match="cannot be merged: each sequence runs the expert its router picks"):
        tensorft.merge(fresh)


# --------------------------------------------------------------------------- through the launchers

WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "brown", "gold", "cyan", "lime", "navy"]
TEMPLATES = {  # three tasks told apart by their prompts
    "alpha": ("Repeat the colour {w} twice ->", " {w} {w}"),
    "beta": ("How many letters are in {w}? Answer =", " {n}"),
    "gamma": ("Write {w} backwards please :", " {r}"),
}


def rows(task, words):
    prompt, completion = TEMPLATES[task]
    return [{"prompt": prompt.format(w=w), "completion": completion.format(w=w, n=len(w), r=w[::-1])} for w in words]


def _jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("ttmoe")
    save_tiny_chat_llama(work / "tiny")
    for task in TEMPLATES:
        _jsonl(work / f"{task}.jsonl", rows(task, WORDS[:8]))
        _jsonl(work / f"{task}_dev.jsonl", rows(task, WORDS[8:]))
    return work


def task_data(work, names=tuple(TEMPLATES)):
    return {"tasks": {t: {"train": str(work / f"{t}.jsonl"), "eval": str(work / f"{t}_dev.jsonl")} for t in names},
            "format": "prompt-completion"}


def write_config(work, name, adapter, data=None, train=None, model=True):
    cfg = {
        **({"model": {"name_or_path": str(work / "tiny")}} if model else {}),
        "adapter": adapter,
        "data": data or task_data(work),
        "train": {"output_dir": str(work / name), "max_steps": 3, "batch_size": 8, "lr": 0.01, "logging_steps": 1,
                  "save_steps": 100, "max_length": 48, **(train or {})},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def stage1_config(work, name):
    return write_config(work, name, {**TT, "tt_shapes": None})


@pytest.fixture(scope="module")
def stage1(work):
    from tensorft.experts import main

    assert main(["--config", stage1_config(work, "stage1")]) == 0
    return work / "stage1"


@pytest.fixture(scope="module")
def stage2(work, stage1):
    from tensorft.train import main

    config = write_config(work, "stage2", {"kind": "ttmoe", "experts": str(stage1)}, model=False,
                          train={"max_steps": 30, "batch_size": 12, "lr": 0.02, "logging_steps": 10})
    assert main(["--config", config]) == 0
    return work / "stage2"


def test_stage1_trains_one_tt_expert_per_task_on_its_own_data(stage1):
    assert json.loads((stage1 / "experts.json").read_text())["experts"] == [{"name": t, "dir": t} for t in TEMPLATES]
    for task in TEMPLATES:
        saved = json.loads((stage1 / task / "adapter_config.json").read_text())
        assert saved["kind"] == "tt" and saved["tasks"] == [task]
        assert json.loads((stage1 / task / "tasks.json").read_text())["tasks"] == {
            task: {"id": 0, "rows": 8, "mixed": 8}}  # its own task's rows only


def test_stage1_resume_skips_finished_experts(work, stage1, capsys):
    from tensorft.experts import main

    resumed = work / "stage1-resumed"
    for task in ("alpha", "beta"):  # finished; gamma "was killed" before it started
        shutil.copytree(stage1 / task, resumed / task)
    stamps = {p: p.stat().st_mtime_ns for p in resumed.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--config", stage1_config(work, "stage1-resumed")]) == 0
    err = capsys.readouterr().err
    assert "expert alpha: already trained, skipped" in err and "expert beta: already trained, skipped" in err
    assert "expert gamma: training on its own data" in err
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished experts untouched
    assert (resumed / "gamma" / "FINISHED").exists() and (resumed / "experts.json").exists()


def test_stage2_router_learns_the_tasks_and_leaves_the_experts_unchanged(stage1, stage2):
    report = json.loads((stage2 / "router_eval.json").read_text())
    print(f"\nrouter on held-out data: {report}")
    assert report["rows"] == 12 and report["accuracy"] > 0.9
    assert sum(report["usage"].values()) == 12 and report["experts"] == list(TEMPLATES)
    rows_logged = [r for r in map(json.loads, open(stage2 / "metrics.jsonl")) if "loss" in r]  # training rows
    assert [r["step"] for r in rows_logged] == [10, 20, 30]
    assert all("aux/router_ce" in r and "router/accuracy" in r for r in rows_logged)
    assert rows_logged[-1]["aux/router_ce"] < rows_logged[0]["aux/router_ce"]
    assert rows_logged[-1]["loss"] == pytest.approx(rows_logged[-1]["aux/router_ce"], abs=1e-5)
    assert {f"router/usage/{t}" for t in TEMPLATES} <= set(rows_logged[-1])
    saved = load_file(stage2 / "adapter_model.safetensors")
    for e, task in enumerate(TEMPLATES):
        expert = load_file(stage1 / task / "adapter_model.safetensors")
        assert expert
        for key, core in expert.items():
            assert torch.equal(saved[key][e], core), key


def test_stage2_reloads_routes_and_exports_one_expert(work, stage1, stage2, capsys):
    from transformers import AutoTokenizer

    from tensorft.cli import run

    model = tensorft.from_pretrained(str(stage2)).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "tiny"))
    prompts = [rows(t, ["teal"])[0]["prompt"] for t in TEMPLATES]
    chosen = [model.tensorft.kind.route(model, {"input_ids": tok(p, return_tensors="pt").input_ids}).item()
              for p in prompts]
    assert chosen == [0, 1, 2]
    assert run(["export-peft", str(stage2), str(work / "peft-beta"), "--expert", "beta"]) == 0
    assert run(["export-peft", str(stage1 / "beta"), str(work / "peft-beta-alone")]) == 0
    a, b = load_file(work / "peft-beta" / "adapter_model.safetensors"), load_file(
        work / "peft-beta-alone" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run(["merge", str(stage2), str(work / "merged-beta"), "--expert", "beta"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(work / "merged-beta")).eval()
    ids = tok(prompts[1], return_tensors="pt").input_ids
    torch.testing.assert_close(merged(ids).logits, tensorft.from_pretrained(str(stage1 / "beta"))(ids).logits,
                               rtol=0, atol=1e-5)
    capsys.readouterr()
    for argv, message in (
        (["merge", str(stage2), str(work / "merged")], "cannot be merged: each sequence runs the expert its router picks"),
        (["export-peft", str(stage2), str(work / "peft-all")], "--expert NAME"),
        (["export-peft", str(stage2), str(work / "peft-x"), "--expert", "delta"], "unknown expert 'delta'"),
        (["merge", str(stage1 / "beta"), str(work / "merged-x"), "--expert", "beta"], "kind 'tt' has no experts"),
    ):
        assert run(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not any((work / d).exists() for d in ("merged", "peft-all", "peft-x", "merged-x"))


def bad_experts(work, stage1):
    """Expert directories that must be refused: another kind, another base, another shape."""
    from transformers import AutoModelForCausalLM

    base = str(work / "tiny")
    lora = tensorft.attach(AutoModelForCausalLM.from_pretrained(base), {"kind": "lora", "rank": 2, "targets": TARGETS})
    tensorft.save(lora, str(work / "bad" / "lora"))
    small = tensorft.attach(AutoModelForCausalLM.from_pretrained(base), {**TT, "rank": 2, "tasks": ["delta"]})
    tensorft.save(small, str(work / "bad" / "rank2"))
    other = shutil.copytree(stage1 / "gamma", work / "bad" / "other-base")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = cfg["model"]["name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    return work / "bad"


@pytest.mark.parametrize("case,message", [
    ("missing", "adapter.experts: {missing}: no such directory"),
    ("lora", "holds a lora adapter; experts are tt adapters"),
    ("other-base", "does not match {alpha}: base model: 'someone/another-model'"),
    ("rank2", "does not match {alpha}: rank: 2, the first has 3"),
    ("label", "data.tasks.delta: no expert for this task (experts: alpha, beta, gamma)"),
])
def test_bad_input_one_line_exit_2_nothing_written(work, stage1, capsys, case, message):
    from tensorft.train import main

    bad = work / "bad" if (work / "bad").exists() else bad_experts(work, stage1)
    experts = [str(stage1 / t) for t in TEMPLATES]
    data = None
    if case == "label":
        (work / "delta.jsonl").write_text((work / "alpha.jsonl").read_text())
        data = task_data(work)
        data["tasks"]["delta"] = {"train": str(work / "delta.jsonl")}
    elif case == "missing":
        experts[1] = str(work / "no-such-expert")
    else:
        experts[1] = str(bad / case)
    name = f"bad-{case}"
    assert main(["--config", write_config(work, name, {"kind": "ttmoe", "experts": experts}, data=data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = message.format(missing=work / "no-such-expert", alpha=stage1 / "alpha")
    assert lines[-1].startswith("tensorft: error: ") and expected in lines[-1], lines
    assert not (work / name).exists()


STAGE2_DISTRIBUTED = {
    "ddp": ["--set", "distributed.strategy=ddp"],
    "fsdp": ["--set", "distributed.strategy=fsdp"],
    "zero3": ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=3"],
}


@pytest.fixture(scope="module")
def stage2_single(work, stage1):
    """Stage 2 in one process, global batch 12, noise off (each rank draws its own noise, so
    only the deterministic router is comparable across launches)."""
    from tensorft.train import main

    single = write_config(work, "stage2-single", {"kind": "ttmoe", "experts": str(stage1), "noise": False},
                          model=False, train={"max_steps": 4, "lr": 0.02, "logging_steps": 1, "batch_size": 12})
    assert main(["--config", single]) == 0
    return work / "stage2-single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_stage2_on_two_ranks_equals_one_process(work, stage1, stage2_single, strategy):
    """2 ranks of 6 rows: DDP replicates, FSDP2 and ZeRO-3 shard the experts and the router
    (trained by its aux loss alone, which does not pass through the model's outputs); the same
    losses step by step, the same router, the same held-out report (the router's base passes
    after training run on every rank: collective under sharding)."""
    from test_train import run_info, torchrun

    name = f"stage2-{strategy}"
    config = write_config(work, name, {"kind": "ttmoe", "experts": str(stage1), "noise": False}, model=False,
                          train={"max_steps": 4, "lr": 0.02, "logging_steps": 1, "batch_size": 6})
    p = torchrun(config, *STAGE2_DISTRIBUTED[strategy])
    assert p.returncode == 0, p.stderr[-3000:]
    info = run_info(work / name)
    assert info["world_size"] == 2 and info["process_group"] == 2
    if strategy == "ddp":
        assert info["adapter"]["local"] == info["adapter"]["full"]
    else:  # every tensor split (the stacked cores on their expert axis: 3 experts give 2 + 1)
        assert info["adapter"]["sharded_tensors"] == info["adapter"]["tensors"] > 0, info
        assert info["base"]["local"] <= info["base"]["full"] // 2 + 64, info
    runs = (name, "stage2-single")
    losses = [{r["step"]: r["loss"] for r in map(json.loads, open(work / run / "metrics.jsonl")) if "loss" in r}
              for run in runs]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4]
    print(f"\nstage 2, {strategy} vs one process: losses {losses}")
    for step, loss in losses[1].items():
        assert losses[0][step] == pytest.approx(loss, abs=1e-5), step
    assert losses[1][4] < losses[1][1] - 0.1  # the router learned (a router never reduced would not match)
    a, b = (load_file(work / run / "adapter_model.safetensors") for run in runs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    a, b = (json.loads((work / run / "router_eval.json").read_text()) for run in runs)
    assert a["confusion"] == b["confusion"] and a["rows"] == 12
    assert_same_eval_loss(work, runs, a, b)


def assert_same_eval_loss(work, runs, *reports):
    """The held-out loss per task (metrics.jsonl's evaluation rows and router_eval.json) is one
    process's: ranks' losses are combined, not summed or scaled by the number of processes."""
    evaluated = [{k: v for r in map(json.loads, open(work / run / "metrics.jsonl")) if "loss" not in r
                  for k, v in r.items() if k.startswith("eval_") and k.endswith("_loss")} for run in runs]
    assert evaluated[0] and sorted(evaluated[0]) == sorted(evaluated[1])
    print(f"\neval losses, {runs[0]} vs {runs[1]}: {evaluated}")
    for key, loss in evaluated[1].items():
        assert evaluated[0][key] == pytest.approx(loss, abs=1e-5), (key, evaluated)
    if reports:
        a, b = (report["eval_loss"] for report in reports)
        assert a and sorted(a) == sorted(b)
        for key, loss in b.items():
            assert a[key] == pytest.approx(loss, abs=1e-5), (key, a, b)


def test_params_counts_the_router_as_trainable_and_the_experts_as_frozen(work, stage1, capsys):
    from tensorft.cli import run

    config = write_config(work, "stage2-params", {"kind": "ttmoe", "experts": str(stage1)}, model=False)
    capsys.readouterr()
    assert run(["params", "--config", config]) == 0
    out = capsys.readouterr().out
    experts = sum(t.numel() for task in TEMPLATES for t in load_file(stage1 / task / "adapter_model.safetensors").values())
    assert "trainable parameters: 390" in out  # gate and noise: 2 x (64 + 1) x 3
    assert f"kind ttmoe: {experts:,} of the parameters above are saved but frozen" in out


def test_example_configs_load(tmp_path, monkeypatch):
    from tensorft.config import load_config
    from tensorft.errors import ConfigError

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)  # the experts path is relative to where the command runs
    stage1 = load_config(os.path.join(root, "configs", "ttmoe_stage1.yaml"))
    assert stage1.adapter.kind == "tt" and list(stage1.data.tasks) == ["sentiment", "arith", "summaries"]
    with pytest.raises(ConfigError, match="adapter.experts: runs/ttmoe-experts: no such directory"):
        load_config(os.path.join(root, "configs", "ttmoe_stage2.yaml"))  # before stage 1 has run


# --------------------------------------------------------------------------- sequence classification


@pytest.fixture(scope="module")
def cls_runs(work):
    """The paper's setting: ``model.task: seq-cls``, each expert with its own head (``score``,
    modules_to_save); stage 1 then stage 2 through the launchers."""
    from tensorft.experts import main as stage1_main
    from tensorft.train import main as train_main

    labels = {"alpha": lambda w: len(w) % 2, "beta": lambda w: int("e" in w), "gamma": lambda w: int(w < "m")}
    for task, label in labels.items():
        for split, words in (("", WORDS[:8]), ("_dev", WORDS[8:])):
            _jsonl(work / f"cls_{task}{split}.jsonl",
                   [{"text": r["prompt"], "label": label(w)} for r, w in zip(rows(task, words), words)])
    data = {"tasks": {t: {"train": str(work / f"cls_{t}.jsonl"), "eval": str(work / f"cls_{t}_dev.jsonl")}
                      for t in labels}, "format": "classification"}
    stage1 = write_config(work, "cls-stage1", {**TT, "modules_to_save": ["score"]}, data=data,
                          train={"max_steps": 3, "lr": 0.02})
    text = yaml.safe_load(open(stage1))
    text["model"].update(task="seq-cls", num_labels=2)
    (work / "cls-stage1.yaml").write_text(yaml.safe_dump(text))
    assert stage1_main(["--config", stage1]) == 0
    stage2 = write_config(work, "cls-stage2", {"kind": "ttmoe", "experts": str(work / "cls-stage1")}, data=data,
                          model=False, train={"max_steps": 30, "batch_size": 12, "lr": 0.02, "logging_steps": 10})
    assert train_main(["--config", stage2]) == 0
    return work / "cls-stage1", work / "cls-stage2"


def test_seq_cls_experts_keep_their_own_heads_behind_the_router(work, cls_runs):
    from tensorft.cli import run

    stage1, stage2 = cls_runs
    report = json.loads((stage2 / "router_eval.json").read_text())
    print(f"\nseq-cls router on held-out data: {report}")
    assert report["accuracy"] > 0.9 and report["rows"] == 12
    evaluation = [r for r in map(json.loads, open(stage2 / "metrics.jsonl")) if "loss" not in r]
    assert {f"eval_{t}_accuracy" for t in TEMPLATES} <= set().union(*evaluation)
    moe_model = tensorft.from_pretrained(str(stage2)).eval()
    assert type(moe_model).__name__ == "LlamaForSequenceClassification"
    ids = tokens(batch=3, seq=6, vocab=1000, seed=3)
    for e, task in enumerate(TEMPLATES):
        alone = tensorft.from_pretrained(str(stage1 / task)).eval()
        assert "score.weight" in load_file(stage1 / task / "adapter_model.safetensors")
        got = moe_model(ids, expert_ids=torch.full((3,), e)).logits
        torch.testing.assert_close(got, alone(ids).logits, rtol=0, atol=1e-5)
    assert run(["merge", str(stage2), str(work / "cls-merged-beta"), "--expert", "beta"]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(work / "cls-merged-beta")).eval()
    torch.testing.assert_close(merged(ids).logits, tensorft.from_pretrained(str(stage1 / "beta"))(ids).logits,
                               rtol=0, atol=1e-5)
    assert run(["export-peft", str(stage2), str(work / "cls-peft-beta"), "--expert", "beta"]) == 0
    exported = load_file(work / "cls-peft-beta" / "adapter_model.safetensors")
    torch.testing.assert_close(exported["base_model.model.score.weight"],
                               load_file(stage1 / "beta" / "adapter_model.safetensors")["score.weight"])


def test_data_naming_some_experts_in_another_order_is_labelled_with_expert_ids(work, stage1):
    from tensorft.config import load_config
    from tensorft.train import load_data_and_tasks, resolve_tasks

    data = task_data(work, names=("gamma", "alpha"))
    cfg = load_config(write_config(work, "subset", {"kind": "ttmoe", "experts": str(stage1)}, data=data, model=False))
    resolve_tasks(cfg)
    assert cfg.adapter.tasks == list(TEMPLATES) and cfg.model.name_or_path == str(work / "tiny")
    train, evaluation, info = load_data_and_tasks(cfg)
    for row in train:
        assert row["prompt"].startswith({0: "Repeat", 2: "Write"}[row["task_ids"]])
    assert {name: set(ds["task_ids"]) for name, ds in evaluation.items()} == {"gamma": {2}, "alpha": {0}}
    assert {name: t["id"] for name, t in info["tasks"].items()} == {"gamma": 2, "alpha": 0}


def test_seq_cls_stage2_under_zero3_equals_one_process(work, cls_runs):
    """The experts' heads are the router's (stacked, frozen) and applied in a hook on the base's
    head: under ZeRO-3 they are partitioned like everything else and gathered for that head's
    forward. Noise off: the same router losses, router, held-out accuracy as one process."""
    from test_train import run_info, torchrun

    from tensorft.train import main

    stage1, _ = cls_runs
    data = {"tasks": {t: {"train": str(work / f"cls_{t}.jsonl"), "eval": str(work / f"cls_{t}_dev.jsonl")}
                      for t in TEMPLATES}, "format": "classification"}
    adapter = {"kind": "ttmoe", "experts": str(stage1), "noise": False}
    train = {"max_steps": 4, "lr": 0.02, "logging_steps": 1}
    single = write_config(work, "cls-s2-single", adapter, data=data, model=False, train={**train, "batch_size": 12})
    assert main(["--config", single]) == 0
    config = write_config(work, "cls-s2-zero3", adapter, data=data, model=False, train={**train, "batch_size": 6})
    p = torchrun(config, *STAGE2_DISTRIBUTED["zero3"])
    assert p.returncode == 0, p.stderr[-3000:]
    info = run_info(work / "cls-s2-zero3")
    assert info["adapter"]["sharded_tensors"] == info["adapter"]["tensors"] > 0, info
    runs = ("cls-s2-zero3", "cls-s2-single")
    logged = [[r for r in map(json.loads, open(work / run / "metrics.jsonl"))] for run in runs]
    losses = [{r["step"]: r["loss"] for r in rows if "loss" in r} for rows in logged]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4]
    for step, loss in losses[1].items():
        assert losses[0][step] == pytest.approx(loss, abs=1e-5), step
    a, b = (load_file(work / run / "adapter_model.safetensors") for run in runs)
    assert a.keys() == b.keys() and any(k.endswith("heads.score__weight") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    a, b = (json.loads((work / run / "router_eval.json").read_text()) for run in runs)
    assert a["confusion"] == b["confusion"] and a["rows"] == 12
    # each row's class from its expert's own head: the same held-out accuracy per task
    accuracy = [{k: v for r in rows for k, v in r.items() if k.endswith("_accuracy") and k.startswith("eval_")}
                for rows in logged]
    assert accuracy[0] and accuracy[0] == accuracy[1]
    # ... and the same held-out loss: the classification head's loss is a mean over each rank's
    # rows, which the trainer must not scale by the number of ranks (it read 2x before)
    assert_same_eval_loss(work, runs, a, b)


def test_seq_cls_on_two_ddp_ranks_with_accumulation_equals_one_process(work, cls_runs):
    """Plain sequence classification (a tt adapter and its own head, no router): 2 DDP ranks of
    3 rows with 2 accumulation steps equal one process with a batch of 12, step by step (the
    training loss and the update) and on the held-out sets. The head's loss is a mean over the
    micro-batch's rows: the trainer must average it over ranks and accumulation steps, not
    scale it by the number of ranks and skip the division by the accumulation steps."""
    from test_train import run_info, torchrun
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tensorft.train import main

    # a saved head: one the loader initializes is drawn from the process's random state, which
    # differs between a launch and this process
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(str(work / "tiny"), num_labels=2).save_pretrained(work / "tiny-cls")
    AutoTokenizer.from_pretrained(str(work / "tiny")).save_pretrained(work / "tiny-cls")
    data = {"tasks": {t: {"train": str(work / f"cls_{t}.jsonl"), "eval": str(work / f"cls_{t}_dev.jsonl")}
                      for t in TEMPLATES}, "format": "classification"}
    adapter = {**TT, "modules_to_save": ["score"]}
    train = {"max_steps": 3, "lr": 0.02, "logging_steps": 1}
    configs = {}
    for name, extra in (("cls-plain-single", {"batch_size": 12}), ("cls-plain-ddp", {"batch_size": 3, "grad_accum": 2})):
        configs[name] = write_config(work, name, adapter, data=data, train={**train, **extra})
        text = yaml.safe_load(open(configs[name]))
        text["model"].update(name_or_path=str(work / "tiny-cls"), task="seq-cls", num_labels=2)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(text))
    assert main(["--config", configs["cls-plain-single"]]) == 0
    p = torchrun(configs["cls-plain-ddp"], *STAGE2_DISTRIBUTED["ddp"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert run_info(work / "cls-plain-ddp")["world_size"] == 2
    runs = ("cls-plain-ddp", "cls-plain-single")
    losses = [{r["step"]: r["loss"] for r in map(json.loads, open(work / run / "metrics.jsonl")) if "loss" in r}
              for run in runs]
    print(f"\nseq-cls, 2 DDP ranks x 2 accumulation steps vs one process: losses {losses}")
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3]
    for step, loss in losses[1].items():
        assert losses[0][step] == pytest.approx(loss, abs=1e-5), step
    a, b = (load_file(work / run / "adapter_model.safetensors") for run in runs)
    assert a.keys() == b.keys() and "score.weight" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert_same_eval_loss(work, runs)
