#!/usr/bin/env python
"""Training-step cost of tensorft adapters vs PEFT LoRA on Llama-shaped models.

For each model x adapter configuration this times forward + backward of one training step
(causal-LM loss on random token ids, ``loss.backward()``, then ``zero_grad``) and measures the
step's peak memory. Every configuration runs in its own fresh Python subprocess so that
configurations do not pollute each other's memory (or allocator / thread-pool state);
``--rounds`` repeats the whole sweep with the configurations interleaved (and the order
rotated) so that slow drift of the machine hits every configuration alike.

Models are built in code with random weights (no downloads):

* ``smollm2-135m``: SmolLM2-135M dims (hidden 576, ffn 1536, 30 layers, 9 heads, 3 kv heads,
  vocab 49152, tied embeddings);
* ``llama2-7b-block``: ONE Llama-2-7B decoder block (hidden 4096, ffn 11008, 32 heads, 32 kv
  heads) with a small vocabulary (``--block-vocab``, default 1024: the real model's lm_head is
  32000 x 4096 shared by 32 blocks, so ~1000 vocabulary rows per block keeps the head's share
  of the step close to what it is in the full model).

Adapters: ``floor`` (the frozen base doing only what any adapter on these targets needs: a
zero bias parameter added to every target's output, so backward computes each target's output
gradient and nothing else: no input gradient of the first block, no adapter math), ``none``
(frozen base with ``enable_input_require_grads``, the older reference: it pays for the first
block's input gradient, which no adapter needs), ``peft-lora`` (``peft.get_peft_model``), and
tensorft ``lora``, ``cp``, ``tt-factors``, ``tt-cores``, all at the same rank, alpha and
targets.

Training settings (``--checkpointing``, ``--autocast``): non-reentrant activation
checkpointing of every decoder block, and bf16 autocast around the forward (with ``--dtype
float32`` or an nf4 base: the QLoRA setting). Each library runs as its trainer does: PEFT as
trl sets it up (``enable_input_require_grads`` with checkpointing), tensorft as its launcher
does (no input gradient; under autocast the adapters take the bf16 input as it is).

Clock (``--clock``): ``wall`` with the shared-machine step filtering below, or ``cpu``: the
process's CPU time per step (``time.process_time``; use ``--threads 1``), which a busy
neighbour barely moves, so no idle wait and no step filtering.

Memory, three views of the same thing (the extra memory a step needs: activations kept for
backward, gradients, temporaries, factors built on the fly):

* step peak tensor: the live-tensor high-water mark of one extra untimed step above what was live
  before it, replayed from ``torch.profiler``'s allocation events (``profile_memory=True``).
  Exact and deterministic, so it is what the ratio against PEFT LoRA uses; "+ adapter state" adds
  12 bytes per trainable parameter (fp32 weight + Adam's two moments, kept between steps).
* CUDA: ``torch.cuda.max_memory_allocated`` during the timed steps minus ``memory_allocated``
  before them (and the absolute peak).
* CPU: the process's peak RSS during the timed steps (VmHWM, reset through
  ``/proc/self/clear_refs`` after the warm-up) minus its RSS just before them (after
  ``gc.collect()`` and ``malloc_trim(0)``): real, but with some +-20 MB of allocator noise.

Timing on a shared CPU machine: every timed step also records how much CPU other processes used
meanwhile (``/proc/stat`` minus this process). With 2 threads on 2 cores one busy neighbour
slows a step 2-3x, so such steps are discarded and replaced (``--step-max-foreign``), and the
sweep waits for the machine to be idle before starting each configuration (``--wait-idle``).

No ``prepare_model_for_kbit_training`` / gradient checkpointing for either library, so that
PEFT and tensorft run the same base computation.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/adapter_step.py                # CPU, both models
    HF_HUB_OFFLINE=1 python bench/adapter_step.py --device cuda --quantization nf4 \\
        --smollm-batch 16 --smollm-seq 512 --block-batch 4 --block-seq 1024 --block-vocab 32000
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# fp32 parameter + Adam's two moments, kept between steps (gradients live inside the step).
ADAM_STATE_BYTES = 12
ADAPTERS = ("floor", "none", "peft-lora", "lora", "cp", "tt-factors", "tt-cores")
MODELS = ("smollm2-135m", "llama2-7b-block")


# --------------------------------------------------------------------------- model building


def model_config_kwargs(name: str, args) -> dict:
    if name == "smollm2-135m":
        return dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
        )
    if name == "llama2-7b-block":
        return dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=1,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=args["block_vocab"],
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
    raise ValueError(name)


def batch_shape(name: str, args) -> tuple[int, int]:
    if name == "smollm2-135m":
        return args["smollm_batch"], args["smollm_seq"]
    return args["block_batch"], args["block_seq"]


def resolve_dtype(args):
    import torch

    name = args["dtype"]
    if name == "auto":
        name = "bfloat16" if args["device"] == "cuda" else "float32"
    return getattr(torch, name)


def build_model(name: str, args, **config_overrides):
    """``name``'s model with random weights; ``config_overrides`` replace its config values
    (step_profile.py's toy sizes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = resolve_dtype(args)
    cfg = LlamaConfig(**{**model_config_kwargs(name, args), **config_overrides})
    cfg.use_cache = False
    torch.manual_seed(0)
    if args["quantization"] == "nf4":
        from transformers import BitsAndBytesConfig

        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with tempfile.TemporaryDirectory(prefix="tensorft_bench_") as tmp:
            base.save_pretrained(tmp)
            del base
            gc.collect()
            qcfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            device_map = {"": 0} if args["device"] == "cuda" else {"": "cpu"}
            model = LlamaForCausalLM.from_pretrained(
                tmp, quantization_config=qcfg, dtype=torch.bfloat16, device_map=device_map
            )
    else:
        model = LlamaForCausalLM(cfg).to(device=args["device"], dtype=dtype)
    model.config.use_cache = False
    model.train()  # dropout is 0 everywhere; train() as in a real training step
    return model


def add_adapter(model, adapter: str, args):
    """Freeze the base and inject ``adapter``; returns the (possibly wrapped) model."""
    import torch

    targets = args["targets"]
    rank, alpha = args["rank"], args["alpha"]
    checkpointing = args.get("checkpointing", False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter == "none":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # so backward runs through the whole network
        return model
    if adapter == "floor":
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.split(".")[-1] in targets and hasattr(module, "out_features"):
                module.register_parameter("bench_probe", torch.nn.Parameter(torch.zeros(module.out_features)))
                module.register_forward_hook(lambda mod, inp, out: out + mod.bench_probe.to(out.dtype))
        return model
    if adapter == "peft-lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        if checkpointing:
            model.enable_input_require_grads()  # what trl's SFTTrainer does for a PEFT model
        return model
    import tensorft

    spec = {"kind": adapter.split("-")[0], "rank": rank, "alpha": alpha, "targets": targets}
    if adapter.startswith("tt-"):
        spec["tt_path"] = adapter.split("-", 1)[1]
    return tensorft.attach(model, spec)


# --------------------------------------------------------------------------- memory helpers


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _cpu_snapshot() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process incl. its threads)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    vals = [int(x) for x in fields]
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    own = int(rest[11]) + int(rest[12])  # utime + stime
    return busy, own


def _foreign_cpu(before, after, wall_s: float) -> float:
    """CPU time other processes used during the step, in cores (jiffy resolution)."""
    hz = os.sysconf("SC_CLK_TCK")
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / hz / wall_s) if wall_s > 0 else 0.0


def profiled_step_peak_mb(step, device: str) -> float:
    """Peak bytes of live tensors a step allocates on ``device`` above what was live before it.

    Exact and free of allocator noise: replays the allocation / free events that
    ``torch.profiler`` (profile_memory=True) records during one extra, untimed step.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    want = "CUDA" if device == "cuda" else "CPU"
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).rsplit(".", 1)[-1] == want
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


# --------------------------------------------------------------------------- one configuration


def run_one(spec: dict) -> dict:
    """Build, attach, warm up, time. Runs inside a fresh subprocess."""
    import resource

    import torch

    args = spec["args"]
    model_name, adapter = spec["model"], spec["adapter"]
    device = args["device"]
    if device == "cpu":
        torch.set_num_threads(args["threads"])
    torch.manual_seed(1234)

    rss_start_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    model = build_model(model_name, args)
    model = add_adapter(model, adapter, args)
    build_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    batch, seq = batch_shape(model_name, args)
    vocab = model.config.vocab_size if hasattr(model, "config") else None
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    import contextlib

    def forward_context():
        if args.get("autocast"):
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        with forward_context():
            out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.loss.detach()

    for _ in range(args["warmup"]):
        step()
    sync()

    # Memory baseline right before the timed steps.
    gc.collect()
    _malloc_trim()
    rss_before_kb = _status_kb("VmRSS")
    hwm_reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()

    # One untimed step absorbs the page faults of memory malloc_trim just gave back.
    step()
    sync()

    # Timed steps. On CPU, a step during which other processes used more than
    # ``step_max_foreign`` cores is kept in the raw data but not counted as clean; we go on
    # until ``iters`` clean steps (or ``max_steps_factor * iters`` steps in all).
    cpu_clock = args.get("clock") == "cpu"
    clock = time.process_time if cpu_clock else time.perf_counter
    filter_on = device == "cpu" and not cpu_clock
    times_ms, foreign, clean = [], [], []
    while len(clean) < args["iters"] and len(times_ms) < args["max_steps_factor"] * args["iters"]:
        sync()
        cpu0 = _cpu_snapshot()
        t = clock()
        step()
        sync()
        dt = clock() - t
        f = _foreign_cpu(cpu0, _cpu_snapshot(), dt)
        times_ms.append(dt * 1e3)
        foreign.append(f)
        if not filter_on or f <= args["step_max_foreign"]:
            clean.append(dt * 1e3)

    if cuda:
        cuda_peak = torch.cuda.max_memory_allocated()
    else:
        hwm_kb = _status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    tensor_peak_mb = profiled_step_peak_mb(step, device)

    result = {
        "model": model_name,
        "adapter": adapter,
        "batch": batch,
        "seq": seq,
        "trainable": trainable,
        "times_ms": times_ms,
        "foreign_cpu": foreign,
        "clean_times_ms": clean,
        "median_ms": statistics.median(clean) if len(clean) >= 3 else statistics.median(times_ms),
        "build_s": build_s,
        "tensor_peak_mb": tensor_peak_mb,
        "rss_start_mb": rss_start_kb / 1024,
        "rss_before_steps_mb": rss_before_kb / 1024,
    }
    if cuda:
        result["step_mem_mb"] = (cuda_peak - cuda_before) / 2**20
        result["peak_mem_mb"] = cuda_peak / 2**20
        result["mem_kind"] = "cuda max_memory_allocated"
    else:
        result["step_mem_mb"] = (hwm_kb - rss_before_kb) / 1024
        result["peak_mem_mb"] = hwm_kb / 1024
        result["mem_kind"] = "peak RSS (VmHWM)" if hwm_reset else "ru_maxrss (not reset)"
    return result


def worker_main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO))
    res = run_one(spec)
    Path(out_path).write_text(json.dumps(res))


def machine_busy_cores(sample_s: float = 2.0) -> float:
    """Cores' worth of CPU the whole machine used over ``sample_s`` (we are idle meanwhile)."""
    hz = os.sysconf("SC_CLK_TCK")
    a = _cpu_snapshot()[0]
    time.sleep(sample_s)
    return (_cpu_snapshot()[0] - a) / hz / sample_s


def wait_for_idle(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` cores."""
    t0 = time.perf_counter()
    busy = machine_busy_cores()
    while busy > threshold and time.perf_counter() - t0 < max_wait_s:
        print(f"  machine busy ({busy:.2f} cores used by other processes); waiting", flush=True)
        time.sleep(10)
        busy = machine_busy_cores()
    return busy


def run_in_subprocess(spec: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tensorft_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if spec["args"]["device"] == "cpu":
            t = str(spec["args"]["threads"])
            env.setdefault("OMP_NUM_THREADS", t)
            env.setdefault("MKL_NUM_THREADS", t)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path), str(out_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(
                f"{spec['model']} / {spec['adapter']} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- report


def machine_info(device: str) -> dict:
    import torch

    info = {"cpu": platform.processor() or "unknown"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["logical_cores"] = os.cpu_count()
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = os.cpu_count()
    info["torch"] = torch.__version__
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = "n/a"
    info["python"] = platform.python_version()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarize(results: list[dict]) -> dict:
    """Pool the rounds of each (model, adapter)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["adapter"]), []).append(r)
    summary = {}
    for key, rs in groups.items():
        clean = [t for r in rs for t in r["clean_times_ms"]]
        every = [t for r in rs for t in r["times_ms"]]
        summary[key] = {
            "trainable": rs[0]["trainable"],
            "batch": rs[0]["batch"],
            "seq": rs[0]["seq"],
            "median_ms": statistics.median(clean) if len(clean) >= 3 else statistics.median(every),
            "round_medians": [r["median_ms"] for r in rs],
            "n_clean": len(clean),
            "n_all": len(every),
            "step_mem_mb": statistics.median(r["step_mem_mb"] for r in rs),
            "tensor_peak_mb": statistics.median(r["tensor_peak_mb"] for r in rs),
            "step_mem_rounds": [r["step_mem_mb"] for r in rs],
            "peak_mem_mb": statistics.median(r["peak_mem_mb"] for r in rs),
            "foreign": statistics.fmean(f for r in rs for f in r["foreign_cpu"]),
        }
    return summary


def markdown_table(summary: dict, models, adapters, device: str) -> str:
    mem2 = "step peak alloc MB" if device == "cuda" else "step peak RSS MB"
    lines = [
        "| model (batch x seq) | adapter | trainable params | step ms (median) | per-round medians ms "
        f"| time vs PEFT LoRA | time vs floor | step peak tensor MB | mem vs PEFT LoRA | + adapter state MB | vs PEFT "
        f"| {mem2} | {mem2.split()[-2]} vs PEFT | process peak MB | clean / all steps | other load |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def train_mem(s):  # step peak + what the adapter keeps between steps with Adam
        return s["tensor_peak_mb"] + ADAM_STATE_BYTES * s["trainable"] / 2**20

    def ratio(a, b):
        return f"{a / b:.3f}" if b else "-"

    for m in models:
        ref = summary.get((m, "peft-lora"))
        floor = summary.get((m, "floor"))
        for a in adapters:
            s = summary.get((m, a))
            if s is None:
                continue
            rounds = ", ".join(f"{x:.0f}" for x in s["round_medians"])
            lines.append(
                f"| {m} ({s['batch']}x{s['seq']}) | {a} | {s['trainable']:,} | {s['median_ms']:.1f} | {rounds} "
                f"| {ratio(s['median_ms'], ref['median_ms']) if ref else '-'} "
                f"| {ratio(s['median_ms'], floor['median_ms']) if floor else '-'} "
                f"| {s['tensor_peak_mb']:.1f} | {ratio(s['tensor_peak_mb'], ref['tensor_peak_mb']) if ref else '-'} "
                f"| {train_mem(s):.1f} | {ratio(train_mem(s), train_mem(ref)) if ref else '-'} "
                f"| {s['step_mem_mb']:.0f} | {ratio(s['step_mem_mb'], ref['step_mem_mb']) if ref else '-'} "
                f"| {s['peak_mem_mb']:.0f} | {s['n_clean']}/{s['n_all']} | {s['foreign']:.2f} |"
            )
    return "\n".join(lines)


def report_block(args: dict, info: dict, table: str, command: str, started: str, wall_s: float) -> str:
    dev = args["device"]
    dtype = args["dtype"] if args["dtype"] != "auto" else ("bfloat16" if dev == "cuda" else "float32")
    mem_note = (
        "step peak tensor = peak of the live tensor bytes a step allocates above those live before "
        "it, replayed from torch.profiler's allocation events (profile_memory=True) on one extra "
        "untimed step: exact, no allocator noise; "
        + (
            "step peak alloc = `torch.cuda.max_memory_allocated()` during the timed steps minus "
            "`memory_allocated()` before them; process peak = max_memory_allocated"
            if dev == "cuda"
            else "step peak RSS = peak RSS (VmHWM, reset after the warm-up) during the timed steps minus "
            "RSS just before them (after gc + malloc_trim); real but +-20 MB allocator noise; "
            "process peak = that VmHWM (includes the model weights); each configuration runs in a "
            "fresh subprocess"
        )
        + "; + adapter state = step peak tensor + 12 B per trainable parameter (fp32 weight and "
        "Adam's two moments, which persist between steps), i.e. everything in a training step's "
        "memory that depends on the adapter"
    )
    lines = [
        f"## Run {started}",
        "",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['usable_cores']} usable / {info['logical_cores']} logical cores"
        + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        f"- software: torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"bitsandbytes {info['bitsandbytes']}, python {info['python']}",
        f"- device {dev}, base dtype {dtype}, quantization {args['quantization']}"
        + (f", torch threads {args['threads']}" if dev == "cpu" else ""),
        f"- adapters: rank {args['rank']}, alpha {args['alpha']}, targets {','.join(args['targets'])} "
        "(TT: tensorft's default balanced mode factorisation, scale = alpha / r as every kind)",
        f"- models: smollm2-135m = SmolLM2-135M dims, random weights; llama2-7b-block = 1 Llama-2-7B "
        f"decoder block with vocab {args['block_vocab']}",
        f"- training settings: activation checkpointing {'on (non-reentrant)' if args.get('checkpointing') else 'off'}, "
        f"bf16 autocast {'on' if args.get('autocast') else 'off'}; clock: "
        + ("process CPU time per step (time.process_time)" if args.get("clock") == "cpu" else "wall time"),
        f"- timing: {args['warmup']} warm-up + {args['iters']} timed steps per process, {args['rounds']} "
        "round(s) interleaved (order rotated each round); step ms = median over the clean timed steps "
        "of all rounds; a step = forward + causal-LM loss + backward + zero_grad(set_to_none=True) "
        "(no optimizer)",
        f"- memory: {mem_note}",
        (
            "- clean steps: the machine is shared, so every timed step records the CPU other processes "
            "used meanwhile (/proc/stat minus this process); a step where they used more than "
            f"{args['step_max_foreign']} cores is discarded and another one run; `other load` = mean "
            "over all timed steps (clean or not) in cores"
        ) if dev == "cpu" else None,
        f"- total wall time {wall_s / 60:.1f} min",
        "",
        table,
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma list of {', '.join(ADAPTERS)}")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--smollm-batch", type=int, default=4)
    p.add_argument("--smollm-seq", type=int, default=128)
    p.add_argument("--block-batch", type=int, default=1)
    p.add_argument("--block-seq", type=int, default=256)
    p.add_argument("--block-vocab", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of the whole sweep")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="base weights dtype (auto: float32 on cpu, bfloat16 on cuda); adapters stay fp32")
    p.add_argument("--quantization", default="none", choices=("none", "nf4"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on cpu")
    p.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: process CPU time per step (use --threads 1); no idle wait, no step filtering")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file the run is appended to")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to --out")
    p.add_argument("--json", default=str(HERE / "_out" / "adapter_step.json"),
                   help="raw per-process results (all step times)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration process")
    p.add_argument("--wait-idle", type=float, default=600,
                   help="cpu: before each configuration wait up to this many seconds for other "
                        "processes to leave the machine idle (0: do not wait)")
    p.add_argument("--step-max-foreign", type=float, default=0.05,
                   help="cpu: a timed step during which other processes used more than this many cores "
                        "(from /proc/stat) is not counted; steps go on until --iters clean ones")
    p.add_argument("--max-steps-factor", type=int, default=3,
                   help="cpu: at most this many times --iters timed steps per process")
    p.add_argument("--retries", type=int, default=2,
                   help="cpu: reruns of a configuration process that got fewer than --iters clean steps")
    return p.parse_args(argv)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        worker_main(sys.argv[2], sys.argv[3])
        return
    ns = parse_args(argv)
    args = vars(ns).copy()
    args["targets"] = [t for t in ns.targets.split(",") if t]
    models = [m for m in ns.models.split(",") if m]
    adapters = [a for a in ns.adapters.split(",") if a]
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for a in adapters:
        if a not in ADAPTERS:
            sys.exit(f"unknown adapter {a!r}; choose from {', '.join(ADAPTERS)}")
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda but torch.cuda.is_available() is False")

    command = "HF_HUB_OFFLINE=1 " + shlex.join(
        [os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd()) else sys.executable]
        + sys.argv
    )
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t_start = time.perf_counter()
    worker_args = {k: args[k] for k in (
        "targets", "rank", "alpha", "smollm_batch", "smollm_seq", "block_batch", "block_seq", "block_vocab",
        "warmup", "iters", "device", "dtype", "quantization", "threads", "step_max_foreign",
        "max_steps_factor", "checkpointing", "autocast", "clock",
    )}
    results = []
    for rnd in range(ns.rounds):
        for m in models:
            # Rotate the order each round so drift does not always favour the same adapter.
            k = rnd % len(adapters)
            order = adapters[k:] + adapters[:k]
            for a in order:
                spec = {"model": m, "adapter": a, "args": worker_args}
                best = None
                for attempt in range(ns.retries + 1):
                    if ns.device == "cpu" and ns.wait_idle > 0 and ns.clock == "wall":
                        wait_for_idle(ns.wait_idle)
                    t = time.perf_counter()
                    r = run_in_subprocess(spec, ns.timeout)
                    r["round"], r["attempt"] = rnd, attempt
                    n_clean, n_all = len(r["clean_times_ms"]), len(r["times_ms"])
                    print(
                        f"[round {rnd + 1}/{ns.rounds}] {m:16s} {a:10s} median {r['median_ms']:9.1f} ms  "
                        f"(clean steps {n_clean}/{n_all}, min {min(r['times_ms']):.1f}, "
                        f"max {max(r['times_ms']):.1f})  tensor peak {r['tensor_peak_mb']:7.1f} MB  "
                        f"RSS step {r['step_mem_mb']:6.0f} MB  peak {r['peak_mem_mb']:6.0f} MB  "
                        f"trainable {r['trainable']:,}  other-load {statistics.fmean(r['foreign_cpu']):.2f} cores  "
                        f"[{time.perf_counter() - t:.0f} s]",
                        flush=True,
                    )
                    if best is None or n_clean > len(best["clean_times_ms"]):
                        best = r
                    if ns.device != "cpu" or n_clean >= ns.iters:
                        break
                    print("  too few clean steps (other processes were busy); repeating this configuration",
                          flush=True)
                results.append(best)
    wall = time.perf_counter() - t_start
    info = machine_info(ns.device)
    table = markdown_table(summarize(results), models, adapters, ns.device)
    block = report_block(args, info, table, command, started, wall)
    print()
    print(block)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"args": args, "machine": info, "command": command,
                                             "started": started, "results": results}, indent=1))
    if not ns.no_write:
        out = Path(ns.out)
        if not out.exists():
            out.write_text("# Adapter training-step benchmark (`bench/adapter_step.py`)\n\n")
        with out.open("a") as f:
            f.write("\n" + block)
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
