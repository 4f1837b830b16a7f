#!/usr/bin/env python
"""Training-step cost of the task-routed kinds on a mixed-task batch, against tensorft lora.

Every routed kind (poly, mhr, tensorpoly1, tensorpoly2) and tlora runs forward + backward of
one causal-LM training step on a batch whose rows belong to different tasks (row i has task
``i % tasks``), at the same rank, alpha and targets as the lora row. The routed kinds form each
row's mixed factors and run two batched matmuls (``tensorft/adapters/task_routed.py``); the
claim checked here is that this costs about what one shared LoRA costs (issue target: within
1.10x).

Timing under contention: all models live in one process and the kinds are timed round-robin,
one step each per round, so a busy neighbour slows every kind alike; the table reports the
median per kind and the ratio of medians to lora, plus each round's ratio spread (min..max).
Use ``OMP_NUM_THREADS`` equal to the cores you have to yourself.

Peak memory: the live-tensor high-water mark of one extra step above what was live before it,
replayed from ``torch.profiler`` allocation events (bench/adapter_step.py's function).

Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/routed_step.py --layers 30 --rounds 8
    python bench/routed_step.py --device cuda --batch 16 --seq 512   # a GPU row
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import adapter_step  # noqa: E402  (model dims and the memory replay are shared with that bench)

import tensorft  # noqa: E402

KINDS = ("lora", "tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2")
UNROUTED = ("lora", "tlora")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(kind: str, args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = adapter_step.model_config_kwargs("smollm2-135m", {})
    dims.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims)).to(args.device)
    model.config.use_cache = False
    model.train()
    spec = {"kind": kind, "rank": args.rank, "alpha": 2 * args.rank, "targets": list(args.targets)}
    if kind not in UNROUTED:
        spec["n_tasks"] = args.tasks
    return tensorft.attach(model, spec)


def make_step(kind: str, model, batch: dict):
    routed = {} if kind in UNROUTED else {"task_ids": batch["task_ids"]}

    def step():
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"], **routed)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the SmolLM2-135M-shaped model")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=4, help="tasks in the mixed batch (row i has task i %% tasks)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=",".join(ALL_LINEAR))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(HERE / "results" / "routed_step.json"))
    args = parser.parse_args(argv)
    args.targets = args.targets.split(",")
    kinds = args.kinds.split(",")
    if kinds[0] != "lora":
        kinds = ["lora", *[k for k in kinds if k != "lora"]]

    torch.manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device),
        "task_ids": torch.arange(args.batch) % args.tasks,
    }
    models = {k: build(k, args) for k in kinds}
    steps = {k: make_step(k, models[k], batch) for k in kinds}
    params = {k: tensorft.count_parameters(models[k]) for k in kinds}
    for k in kinds:  # warm-up
        steps[k]()
    peaks = {k: adapter_step.profiled_step_peak_mb(steps[k], args.device) for k in kinds}

    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]  # rotate: no kind always first
        for k in order:
            start = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - start)

    lora = statistics.median(times["lora"])
    rows = []
    for k in kinds:
        per_round = [t / base for t, base in zip(times[k], times["lora"])]
        rows.append({
            "kind": k,
            "params": params[k],
            "median_s": statistics.median(times[k]),
            "ratio_to_lora": statistics.median(times[k]) / lora,
            "round_ratio_min": min(per_round),
            "round_ratio_max": max(per_round),
            "step_peak_mb": peaks[k],
            "peak_ratio_to_lora": peaks[k] / peaks["lora"],
        })
    info = adapter_step.machine_info(args.device)
    machine = f"{info.get('gpu') or info['cpu']}, {info['usable_cores']} usable cores, {torch.get_num_threads()} threads, torch {info['torch']}"
    command = "python bench/routed_step.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "command": command, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows}
    print(f"# {machine}\n# {command}\n# batch {args.batch} x {args.seq}, {args.tasks} tasks per batch, "
          f"rank {args.rank}, targets {','.join(args.targets)}, {args.layers} layers, {args.rounds} rounds")
    print("| kind | trainable params | step (median) | vs lora | per-round range | step peak | vs lora |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kind']} | {row['params']:,} | {row['median_s']:.3f} s | {row['ratio_to_lora']:.3f}x | "
              f"{row['round_ratio_min']:.2f}-{row['round_ratio_max']:.2f} | {row['step_peak_mb']:.0f} MB | "
              f"{row['peak_ratio_to_lora']:.3f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
