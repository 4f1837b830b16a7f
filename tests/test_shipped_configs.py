"""What ships is what is tested: every config in configs/*.yaml runs a few steps through the
launcher, on a tiny stand-in model, with the config's own keys.

Each config is read as a dict and only what cannot run here is replaced: the model (a 2-layer
Llama with SmolLM2's tokenizer), the data (small local files in the config's format and column
names, per task for ``data.tasks``), ``output_dir`` and the run's length, batch size and
``max_length``. Everything else stays: the adapter section, quantization (bitsandbytes' CPU
backend), dtype / bf16, gradient checkpointing, grad_accum, objective, the multi-task layout and
the distributed strategy (none: in this process; ddp / fsdp / deepspeed: 2 ranks under torchrun).
A config found by the glob and not handled fails: configs that cannot run here are listed in
NOT_COVERED with the reason, tensorft bugs in KNOWN_BUGS (strict xfail), and configs that need a
GPU in REFUSED_ON_CPU: on a CPU machine they must end with their one-line refusal, and a
CPU_VARIANTS run covers the rest of their keys.

Also the combinations the README claims: an nf4 base under DDP, ZeRO-2, FSDP2 and ZeRO-3 (2
ranks; the last two shard the packed 4-bit weights) trains and matches one process.
"""

import contextlib
import copy
import glob
import io
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_chat_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
TRAIN = os.path.join(ROOT, "launcher", "train.py")
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))

# config -> why it cannot run here (a skip that says so); empty: every shipped config runs.
NOT_COVERED: dict[str, str] = {}
# config -> (a bug in tensorft that stops it, a line of its error): strict xfail, and only for
# that error (another failure fails); once fixed it XPASSes, and the entry goes with the fix.
KNOWN_BUGS: dict[str, tuple[str, str]] = {}
# config -> a line of the one-line refusal it gets on a CPU machine (exit 2, nothing written),
# because what it asks for needs a GPU; its CPU_VARIANTS run covers the rest of it.
REFUSED_ON_CPU: dict[str, str] = {
    "lorta_alpaca_zero3.yaml": "train.bf16: DeepSpeed with bf16 needs a GPU",
}


class KnownBug(AssertionError):
    """A KNOWN_BUGS config failed with its known error."""

# config -> (keys changed, why): a second run of a KNOWN_BUGS config without what the bug stops,
# so the rest of it (here ZeRO-3, activation checkpointing, bf16 weights, grad_accum) is covered.
CPU_VARIANTS: dict[str, tuple[dict, str]] = {
    "lorta_alpaca_zero3.yaml": ({"train": {"bf16": False}}, "bf16 under DeepSpeed needs a GPU (REFUSED_ON_CPU)"),
}

STEPS = 2
ROWS = 40  # >= T-REX's 32 k-means centroids; 2 steps x batch 2 x grad_accum 4 x 2 ranks = 32
# The stand-in (tests/conftest.py save_tiny_chat_llama): module dims, for keys fixed to a
# model's shapes (tt_shapes).
HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 64, 128, 4, 16
WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "brown"]


def shipped(name: str) -> dict:
    with open(os.path.join(CONFIG_DIR, name), encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def entry_point(name: str) -> str:
    """The command a config documents for itself: stage 1 of TT-LoRA MoE runs through
    ``python -m tensorft.experts``, every other config through the launcher."""
    with open(os.path.join(CONFIG_DIR, name), encoding="utf-8") as f:
        header = "".join(line for line in f if line.startswith("#"))
    return "experts" if re.search(r"-m tensorft\.experts\b", header) else "launcher"


def original_output_dir(raw: dict) -> str:
    from tensorft.config import TrainConfig

    return os.path.normpath((raw.get("train") or {}).get("output_dir", TrainConfig().output_dir))


# --------------------------------------------------------------------------- stand-in data


ROW_BUILDERS = {  # (text tag, word, another word, row index) -> a row in the format's own field names
    "alpaca": lambda t, w, o, i: {"instruction": f"{t}: repeat the word {w}.", "input": "", "output": f"{w} {w}"},
    "messages": lambda t, w, o, i: {"messages": [{"role": "user", "content": f"{t}: say {w}"},
                                                 {"role": "assistant", "content": w}]},
    "prompt-completion": lambda t, w, o, i: {"prompt": f"{t}: colour {w}?", "completion": f" {w}"},
    "text": lambda t, w, o, i: {"text": f"{t}: {w} {w} {w}"},
    "preference": lambda t, w, o, i: {"prompt": f"{t}: colour {w}?", "chosen": f" {w}", "rejected": f" {o}"},
    "multiple-choice": lambda t, w, o, i: {"prompt": f"{t}: which is {w}?", "gold": i % 2,
                                           "options": [f" {w}", f" {o}"] if i % 2 == 0 else [f" {o}", f" {w}"]},
    "classification": lambda t, w, o, i: {"text": f"{t}: {w}", "label": i % 2},
}


def rows(fmt: str, tag: str) -> list[dict]:
    """ROWS short, distinct rows (T-REX clusters them) of format ``fmt``; ``tag`` tells tasks
    apart. A format without a builder raises KeyError: a new format fails until it has one."""
    build = ROW_BUILDERS[fmt]
    return [build(f"{tag} {i}", WORDS[i % 8], WORDS[(i + 3) % 8], i) for i in range(ROWS)]


def data_file(work, fmt: str, columns: dict | None, tag: str) -> str:
    """A jsonl in ``fmt`` whose columns carry the config's names (``data.columns``: field -> column)."""
    columns = columns or {}
    path = work / "data" / f"{tag}-{fmt}-{'-'.join(f'{k}.{v}' for k, v in sorted(columns.items()))}.jsonl"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        with open(path, "w") as f:
            for row in rows(fmt, tag):
                for field, column in columns.items():
                    row[column] = row.pop(field)
                f.write(json.dumps(row) + "\n")
    return str(path)


# --------------------------------------------------------------------------- the override


def site_dims(target: str, kv_heads: int) -> tuple[int, int]:
    q, kv = HEADS * HEAD_DIM, kv_heads * HEAD_DIM
    return {"q_proj": (HIDDEN, q), "k_proj": (HIDDEN, kv), "v_proj": (HIDDEN, kv), "o_proj": (q, HIDDEN),
            "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
            "down_proj": (INTERMEDIATE, HIDDEN)}[target]


def rescaled_tt_shapes(shapes: dict, targets: list[str], kv_heads: int) -> dict:
    """The same number of modes per side, factoring the stand-in's dims (a 7B's 4096 = 8^4
    becomes 64 = 4*4*2*2)."""
    from tensorft.adapters.tt import balanced_factors

    def rescale(spec, target_names):
        (dims,) = {site_dims(t, kv_heads) for t in target_names}  # one spec for all: equal dims
        new = {side: balanced_factors(dim, len(spec[side])) for side, dim in zip(("in", "out"), dims)}
        assert all(len(new[s]) == len(spec[s]) for s in new), (spec, new)
        return new

    if set(shapes) <= {"in", "out"}:
        return rescale(shapes, targets)
    return {target: rescale(spec, [target]) for target, spec in shapes.items()}


def stand_in(name: str, work, run_dependency, variant: dict | None = None) -> tuple[dict, int]:
    """(config dict, kv heads of the stand-in model) for shipped config ``name``."""
    from tensorft.config import DataConfig

    cfg = copy.deepcopy(shipped(name))
    for section, values in (variant or {}).items():
        cfg.setdefault(section, {}).update(values)
    adapter = cfg.get("adapter") or {}
    # One tt_shapes for every target (tt_llama2_7b: q and v) needs equal dims, as Llama-2-7B's
    # MHA has; SmolLM2-shaped GQA elsewhere.
    kv_heads = HEADS if isinstance(adapter.get("tt_shapes"), dict) and set(adapter["tt_shapes"]) <= {"in", "out"} else 2
    if "model" in cfg:  # no model section: it comes with the adapter (ttmoe: the experts' base)
        cfg["model"]["name_or_path"] = tiny_model(work, kv_heads)
    if adapter.get("tt_shapes"):
        adapter["tt_shapes"] = rescaled_tt_shapes(adapter["tt_shapes"], adapter["targets"], kv_heads)
    for key in ("experts", "init_from"):  # another shipped config's output (ttmoe stage 2: stage 1's)
        if isinstance(adapter.get(key), (str, list)):
            value = adapter[key]
            paths = [run_dependency(name, p) for p in ([value] if isinstance(value, str) else value)]
            adapter[key] = paths[0] if isinstance(value, str) else paths

    data = cfg.setdefault("data", {})  # the *_llama2_7b configs (parameter counts) have none
    fmt = data.get("format", DataConfig().format)
    if data.get("tasks"):
        for task, spec in data["tasks"].items():
            task_fmt, columns = spec.get("format", fmt), spec.get("columns", data.get("columns"))
            for split in ("train", "eval"):
                if spec.get(split):
                    spec[split] = data_file(work, task_fmt, columns, f"{task}-{split}")
    else:
        data["train"] = data_file(work, fmt, data.get("columns"), "train")
        if data.get("eval"):
            data["eval"] = data_file(work, fmt, data.get("columns"), "eval")

    train = cfg.setdefault("train", {})
    run = name.removesuffix(".yaml") + ("-variant" if variant else "")
    train.update(output_dir=str(work / "runs" / run), max_steps=STEPS, save_steps=STEPS,
                 logging_steps=1, batch_size=min(train.get("batch_size", 2), 2),
                 max_length=min(train.get("max_length", 64), 64))
    if train.get("eval_steps"):
        train["eval_steps"] = STEPS  # else 2 steps would never evaluate (and eval_steps skips the final one)
    return cfg, kv_heads


_TINY: dict = {}


def tiny_model(work, kv_heads: int) -> str:
    if kv_heads not in _TINY:
        _TINY[kv_heads] = save_tiny_chat_llama(work / f"tiny-kv{kv_heads}", kv_heads=kv_heads)
    return _TINY[kv_heads]


# --------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as s:  # other test runs share this machine: never torchrun's fixed 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: str, module_args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *module_args, "--config", config]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    return p.returncode, p.stderr


def in_process(config: str, entry: str) -> tuple[int, str]:
    if entry == "experts":
        from tensorft.experts import main
    else:
        from tensorft.train import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", config])
    return code, err.getvalue()


class Runs:
    """Each shipped config run once per module (stage 2 of ttmoe reuses stage 1's run)."""

    def __init__(self, work):
        self.work, self.done = work, {}

    def get(self, name: str, variant: bool = False) -> dict:
        key = (name, variant)
        if key not in self.done:
            self.done[key] = None  # a cycle of configs reading each other's output fails below
            self.done[key] = self._run(name, CPU_VARIANTS[name][0] if variant else None)
        assert self.done[key] is not None, f"{name}: depends on its own output"
        return self.done[key]

    def dependency(self, name: str, path: str) -> str:
        """``path`` as another shipped config's output_dir: that config's run here."""
        for other in CONFIGS:
            if other != name and original_output_dir(shipped(other)) == os.path.normpath(path):
                result = self.get(other)
                assert result["code"] == 0, f"{name} needs {other}, which failed:\n{result['stderr'][-3000:]}"
                return result["out"]
        raise AssertionError(f"{name}: {path} is no shipped config's output_dir; give it a stand-in here")

    def _run(self, name: str, variant: dict | None) -> dict:
        cfg, _ = stand_in(name, self.work, self.dependency, variant)
        path = self.work / (name.removesuffix(".yaml") + ("-variant" if variant else "") + ".yaml")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        entry = entry_point(name)
        strategy = (cfg.get("distributed") or {}).get("strategy", "none")
        start = time.monotonic()
        if strategy == "none":
            code, stderr = in_process(str(path), entry)
        else:
            code, stderr = torchrun(str(path), ["-m", "tensorft.experts"] if entry == "experts" else [TRAIN])
        seconds = time.monotonic() - start
        print(f"{name}: {strategy}, {seconds:.1f} s")
        return {"code": code, "stderr": stderr, "out": cfg["train"]["output_dir"], "cfg": cfg, "entry": entry,
                "strategy": strategy, "seconds": seconds}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("shipped"))


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_run(out: str, adapter: dict) -> None:
    with open(os.path.join(out, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["kind"] == adapter["kind"]
    if "targets" in adapter:  # the stand-in has every module the config names (else attach refuses)
        assert saved["targets"] == adapter["targets"]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert os.path.isfile(os.path.join(out, "FINISHED"))


def _params():
    out = []
    for name in CONFIGS:
        marks = []
        if name in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(strict=True, raises=KnownBug, reason=KNOWN_BUGS[name][0]))
        out.append(pytest.param(name, False, marks=marks, id=name.removesuffix(".yaml")))
        if name in CPU_VARIANTS:
            out.append(pytest.param(name, True, id=name.removesuffix(".yaml") + "-cpu-variant"))
    return out


def test_lists_name_shipped_configs():
    assert set(NOT_COVERED) | set(KNOWN_BUGS) | set(REFUSED_ON_CPU) <= set(CONFIGS), "stale entries"
    assert set(CPU_VARIANTS) <= set(KNOWN_BUGS) | set(REFUSED_ON_CPU), "a variant stands in for what cannot run here"
    assert CONFIGS, CONFIG_DIR


@pytest.mark.parametrize("name,variant", _params())
def test_shipped_config_runs(runs, name, variant):
    if name in NOT_COVERED:
        pytest.skip(f"{name}: {NOT_COVERED[name]}")
    result = runs.get(name, variant)
    if result["code"] != 0 and not variant and name in KNOWN_BUGS and KNOWN_BUGS[name][1] in result["stderr"]:
        raise KnownBug(KNOWN_BUGS[name][1])
    if name in REFUSED_ON_CPU and not variant and not torch.cuda.is_available():
        assert result["code"] != 0, "ran on CPU although REFUSED_ON_CPU says it cannot"
        frames = [line for line in result["stderr"].splitlines() if line.lstrip("[rank0123]: ").startswith('File "')]
        assert f"tensorft: error: {REFUSED_ON_CPU[name]}" in result["stderr"], result["stderr"][-3000:]
        assert not any("/tensorft/" in f or "launcher/train.py" in f for f in frames), frames  # no rank raised
        assert not os.path.exists(result["out"])
        return
    assert result["code"] == 0, result["stderr"][-4000:]
    cfg, out = result["cfg"], result["out"]
    if result["entry"] == "experts":  # stage 1: one adapter run per task, then the index
        with open(os.path.join(out, "experts.json")) as f:
            experts = json.load(f)["experts"]
        assert [e["name"] for e in experts] == list(cfg["data"]["tasks"])
        for e in experts:
            check_run(os.path.join(out, e["dir"]), cfg["adapter"])
        outs = [os.path.join(out, e["dir"]) for e in experts]
    else:
        check_run(out, cfg["adapter"])
        outs = [out]
    if result["strategy"] != "none":
        for o in outs:
            with open(os.path.join(o, "run_info.json")) as f:
                info = json.load(f)
            assert info["world_size"] == 2 and info["strategy"] == result["strategy"], info


# --------------------------------------------------------------------------- nf4 on 2 ranks

NF4_BASE = "lorta_alpaca.yaml"  # a shipped nf4 config (cp, the paper's uniform lr)


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    work = tmp_path_factory.mktemp("nf4")

    def config(run: str, batch_size: int, distributed: dict) -> str:
        cfg = copy.deepcopy(shipped(NF4_BASE))
        assert cfg["model"]["quantization"] == "nf4"
        # fp32 compute and no autocast: bf16 rounding would swamp what is compared; no warmup, so
        # the adapter moves in 4 steps; grad_accum 1: one process's batch of 8 is 2 ranks x 4
        cfg["model"].update(name_or_path=tiny_model(work, 2), dtype="float32")
        cfg["data"] = {"train": data_file(work, "alpaca", None, "nf4"), "format": "alpaca"}
        cfg["train"].update(output_dir=str(work / run), max_steps=4, batch_size=batch_size, grad_accum=1,
                            warmup_steps=0, bf16=False, save_steps=10, logging_steps=1, max_length=64)
        cfg["distributed"] = distributed
        path = work / f"{run}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return str(path)

    # one process, global batch 8: what 2 ranks of 4 rows each must reproduce
    code, err = in_process(config("single", 8, {"strategy": "none"}), "launcher")
    assert code == 0, err[-3000:]
    return work, config


# What one process and 2 ranks may differ by: (loss, adapter max, adapter mean), as fp32 DDP /
# ZeRO-2 in test_train.py (adapters train in float32 on a quantized base; measured with DDP:
# 1e-6 in the loss, 2.3e-7 in the adapter).
TOLERANCE = (1e-4, 1e-5, 1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp", "zero3"])
def test_nf4_base_on_two_ranks_matches_one_process(nf4, strategy):
    work, config = nf4
    dist = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
            "zero2": {"strategy": "deepspeed", "zero_stage": 2}, "zero3": {"strategy": "deepspeed", "zero_stage": 3}}[strategy]
    code, err = torchrun(config(strategy, 4, dist), [TRAIN])
    assert code == 0, err[-4000:]
    with open(work / strategy / "run_info.json") as f:
        info = json.load(f)
    assert info["world_size"] == 2 and info["process_group"] == 2
    if strategy in ("ddp", "zero2"):
        assert info["adapter"]["local"] == info["adapter"]["full"]  # neither shards parameters
    else:  # the packed 4-bit base weights too: each rank holds half
        assert info["base"]["sharded_tensors"] == info["base"]["tensors"], info
        assert info["base"]["local"] * 2 == info["base"]["full"], info
    ref = {r["step"]: r["loss"] for r in metrics(work / "single") if "loss" in r}
    got = {r["step"]: r["loss"] for r in metrics(work / strategy) if "loss" in r}
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    a = load_file(work / strategy / "adapter_model.safetensors")
    b = load_file(work / "single" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    loss_tol, max_tol, mean_tol = TOLERANCE
    loss_diff = max(abs(got[s] - ref[s]) for s in ref)
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    print(f"nf4 {strategy}: loss diff {loss_diff:.2e}, adapter diff max {diffs.max():.2e} "
          f"mean {diffs.mean():.2e}")
    assert max(b[k].abs().max().item() for k in b if k.endswith(".B")) > 1e-3  # B (zero at init) learned
    assert loss_diff < loss_tol, (got, ref)
    assert diffs.max() < max_tol and diffs.mean() < mean_tol


def test_nf4_adapter_trains_in_float32(nf4):
    """trl casts a quantized model's trainable parameters to bf16 (QLoRA's PEFT setting); tensorft
    keeps its adapters in float32 (with bf16 factors, cp's C factor updates at lr 1e-3 were all
    rounded away in 4 steps)."""
    work, _ = nf4
    saved = load_file(work / "single" / "adapter_model.safetensors")
    assert {k: str(t.dtype) for k, t in saved.items()} == {k: "torch.float32" for k in saved}
