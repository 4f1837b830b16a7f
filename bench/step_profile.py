#!/usr/bin/env python
"""Where a training step's time goes: an op-level CPU profile of whole steps, adapters vs the floor.

adapter_step.py times whole steps; on a shared 2-core machine its wall-clock rows cannot
separate the few percent an adapter costs. This file runs the same models and adapters
(adapter_step.py's ``build_model`` and ``add_adapter``: SmolLM2-135M dims or a Llama-2-7B block,
random weights, the same ``floor`` definition) under ``torch.profiler`` on one thread and
reports, per configuration:

* ``step CPU ms``: this process's CPU time per profiled step (profiler overhead included: a few
  microseconds per op, i.e. some ms per step at these op counts, small beside seconds);
* ``vs floor``: that over the floor's in the same round (configurations interleaved, each in a
  fresh process), and the median over rounds;
* ``op deltas``: self CPU ms per step of each op minus the floor's, largest first: what the
  adapter adds (its thin matmuls show in ``aten::mm``/``aten::addmm``, building factors in
  ``mul``/``copy_``/``add_``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_profile.py --rounds 3 --json bench/_out/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import adapter_step  # noqa: E402

ADAPTERS = ("floor", "peft-lora", "lora", "cp", "tt-factors")


def worker(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(spec["threads"])
    args = dict(rank=spec["rank"], alpha=spec["alpha"], targets=spec["targets"], checkpointing=False,
                block_vocab=1024, dtype="float32", device="cpu", quantization="none")
    overrides = {}
    if spec["layers"]:
        overrides["num_hidden_layers"] = spec["layers"]
    if spec["vocab"]:
        overrides["vocab_size"] = spec["vocab"]
    model = adapter_step.build_model(spec["model"], args, **overrides)
    vocab = model.config.vocab_size
    model = adapter_step.add_adapter(model, spec["adapter"], args)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]),
                        generator=torch.Generator().manual_seed(0))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.process_time()
        for _ in range(spec["steps"]):
            step()
        cpu_s = time.process_time() - t0
    ops = {e.key: e.self_cpu_time_total / spec["steps"] / 1000 for e in prof.key_averages()}
    return {"adapter": spec["adapter"], "step_cpu_ms": 1000 * cpu_s / spec["steps"], "ops_ms": ops,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_config(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"step_profile: {spec['adapter']} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(rounds: list[list[dict]], adapters: list[str], top: int) -> dict:
    floors = [next(r for r in rnd if r["adapter"] == "floor") for rnd in rounds]
    rows = []
    for a in adapters:
        per_round = [next(r for r in rnd if r["adapter"] == a) for rnd in rounds]
        ratios = [r["step_cpu_ms"] / f["step_cpu_ms"] for r, f in zip(per_round, floors)]
        deltas = {}
        for r, f in zip(per_round, floors):
            for op in set(r["ops_ms"]) | set(f["ops_ms"]):
                deltas.setdefault(op, []).append(r["ops_ms"].get(op, 0.0) - f["ops_ms"].get(op, 0.0))
        med = {op: statistics.median(v) for op, v in deltas.items()}
        rows.append({
            "adapter": a, "trainable": per_round[0]["trainable"],
            "step_cpu_ms": [round(r["step_cpu_ms"], 1) for r in per_round],
            "ratio_to_floor": [round(x, 3) for x in ratios], "median_ratio_to_floor": round(statistics.median(ratios), 3),
            "op_deltas_ms": {op: round(v, 3) for op, v in sorted(med.items(), key=lambda kv: -abs(kv[1]))[:top]},
        })
    return {"rows": rows}


def markdown(summary: dict) -> str:
    lines = ["| adapter | trainable | step CPU ms per round | vs floor per round | median vs floor | largest op deltas vs floor (ms/step) |",
             "|---|---:|---|---|---:|---|"]
    for r in summary["rows"]:
        deltas = ", ".join(f"{op.replace('aten::', '')} {d:+.1f}" for op, d in list(r["op_deltas_ms"].items())[:4])
        lines.append(f"| {r['adapter']} | {r['trainable']:,} | {', '.join(map(str, r['step_cpu_ms']))} | "
                     f"{', '.join(map(str, r['ratio_to_floor']))} | {r['median_ratio_to_floor']} | "
                     f"{deltas if r['adapter'] != 'floor' else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=adapter_step.MODELS)
    p.add_argument("--adapters", default=",".join(ADAPTERS))
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=0, help="override the model's layer count (0: keep)")
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary size (0: keep)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per configuration")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats, order rotated each round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8, help="op deltas kept per row")
    p.add_argument("--json", default="", help="also write the summary and every round here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    adapters = args.adapters.split(",")
    if "floor" not in adapters:
        adapters.insert(0, "floor")
    spec = {k: getattr(args, k) for k in ("model", "rank", "alpha", "batch", "seq", "layers", "vocab", "warmup",
                                          "steps", "threads")}
    spec["targets"] = args.targets.split(",")
    rounds = []
    for i in range(args.rounds):
        order = adapters[i % len(adapters):] + adapters[: i % len(adapters)]
        rnd = []
        for a in order:
            row = run_config({**spec, "adapter": a})
            print(f"[round {i + 1}/{args.rounds}] {a:11s} step CPU {row['step_cpu_ms']:9.1f} ms", flush=True)
            rnd.append(row)
        rounds.append(rnd)
    summary = summarize(rounds, adapters, args.top)
    summary["command"] = "bench/step_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary["settings"] = spec
    print(markdown(summary))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**summary, "rounds": rounds}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
