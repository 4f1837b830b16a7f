#!/usr/bin/env python
"""SFT throughput and peak memory: tensorft lora / cp / tt vs PEFT LoRA + trl, same settings.

Every configuration trains SmolLM2-135M-Instruct (the real model, ``tensorft.pretrained``) for
``--steps`` optimizer steps on the same Alpaca-format rows, in a fresh subprocess each:

* tensorft kinds run the launcher's own code (``tensorft.train.run``), so the number is what
  ``python launcher/train.py`` gives;
* the baseline is trl's ``SFTTrainer`` with a ``peft.LoraConfig`` at the same rank, alpha and
  targets, built with the *same* ``SFTConfig`` (``tensorft.train.training_arguments``) and the
  same metrics callback.

Reported: median tokens/s over the steps after ``--warmup`` (non-padding tokens, as the Trainer
counts them), the process's peak RSS (CPU) or ``max_memory_allocated`` (CUDA), and the
trainable parameter count.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_sft.py                      # CPU
    HF_HUB_OFFLINE=1 python bench/train_sft.py --quantization nf4 --batch 16 --seq 512   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KINDS = ("peft-lora", "lora", "cp", "tt")
WORDS = ("the model learns a small update for every layer while the base stays frozen and the "
         "optimizer keeps two moments per trainable parameter so fewer parameters mean less state").split()


def write_rows(path: str, n: int, words_per_row: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            out = " ".join(rng.choice(WORDS) for _ in range(words_per_row))
            f.write(json.dumps({"instruction": f"Write sentence number {i}.", "input": "", "output": out}) + "\n")


def config(args, kind: str, work: str) -> dict:
    adapter = {"kind": "lora" if kind == "peft-lora" else kind, "rank": args.rank, "alpha": 2 * args.rank,
               "targets": args.targets.split(",")}
    return {
        "model": {"name_or_path": args.model, "quantization": args.quantization,
                  "dtype": "bfloat16" if args.bf16 else "float32"},
        "adapter": adapter,
        "data": {"train": os.path.join(work, "rows.jsonl"), "format": "alpaca"},
        "train": {"output_dir": os.path.join(work, kind), "max_steps": args.steps, "batch_size": args.batch,
                  "max_length": args.seq, "lr": 1e-4, "logging_steps": 1, "save_steps": 10**6,
                  "bf16": args.bf16, "seed": 0},
    }


def run_one(args, kind: str, work: str) -> dict:
    """In this (fresh) process: train, then summarise metrics.jsonl."""
    import time

    import torch

    import tensorft.trainers
    from tensorft.config import load_config

    cfg_path = os.path.join(work, f"{kind}.yaml")
    import yaml

    with open(cfg_path, "w") as f:
        yaml.safe_dump(config(args, kind, work), f)
    cfg = load_config(cfg_path)
    out = cfg.train.output_dir
    if kind == "peft-lora":
        trainable = train_peft(cfg)
    else:
        from tensorft.train import run

        assert run(cfg) == 0
        trainable = json.load(open(os.path.join(out, "run_info.json")))["adapter"]["full"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = rows[args.warmup:]
    return {
        "kind": kind,
        "trainable_parameters": trainable,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "steps_timed": len(timed),
        # what the timing really used in this process (not what was asked for)
        "clock": "cpu" if tensorft.trainers.time.perf_counter is time.process_time else "wall",
        "torch_threads": torch.get_num_threads(),
    }


def train_peft(cfg) -> int:
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from tensorft.loading import load_base_model
    from tensorft.train import load_data, training_arguments
    from tensorft.trainers import MetricsCallback

    out = cfg.train.output_dir
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    model = load_base_model(cfg.model)
    train_ds, _ = load_data(cfg)
    peft_config = LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, target_modules=cfg.adapter.targets,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=training_arguments(cfg, os.path.join(out, "checkpoints")),
                         train_dataset=train_ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[MetricsCallback(os.path.join(out, "metrics.jsonl"))])
    trainer.train()
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct, converted offline)")
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep, kinds interleaved")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: tokens per CPU second of the training process, one torch thread (a shared "
                             "machine: other processes barely move it; wall time there is noise)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, ROOT)  # scripts/ (the demo's model) from the checkout
        from scripts.demo_assets import smollm2_135m_instruct

        args.model = smollm2_135m_instruct()
    if args.one:
        if args.clock == "cpu":
            import time
            import types

            import tensorft.trainers

            # The same MetricsCallback times both the launcher's runs and the PEFT + trl baseline:
            # give it the process's CPU clock instead of the wall clock.
            tensorft.trainers.time = types.SimpleNamespace(perf_counter=time.process_time)
        print("RESULT " + json.dumps(run_one(args, args.one, args.work)), flush=True)
        return

    results = []
    for r in range(args.rounds):
        for kind in args.kinds.split(","):
            work = tempfile.mkdtemp(prefix=f"tensorft-bench-{kind}-")
            write_rows(os.path.join(work, "rows.jsonl"), n=args.batch * args.steps, words_per_row=args.seq // 2)
            cmd = [sys.executable, __file__, "--one", kind, "--work", work, "--model", args.model,
                   "--quantization", args.quantization, "--rank", str(args.rank), "--targets", args.targets,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--clock", args.clock] + (["--bf16"] if args.bf16 else [])
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            if args.clock == "cpu":
                env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"{kind} failed:\n{p.stderr[-3000:]}")
            res = {**json.loads(line[0][7:]), "round": r}
            results.append(res)
            print(json.dumps(res), flush=True)

    base = {k: statistics.median(x["tokens_per_s"] for x in results if x["kind"] == k) for k in args.kinds.split(",")}
    mem = {k: statistics.median(x["peak_memory_mb"] for x in results if x["kind"] == k) for k in args.kinds.split(",")}
    ref = "peft-lora" if "peft-lora" in base else None
    threads = 1 if args.clock == "cpu" else os.cpu_count()
    print(f"\n{platform.processor() or platform.machine()}, torch threads {threads}, clock {args.clock}; batch {args.batch} x "
          f"seq {args.seq}, rank {args.rank}, targets {args.targets}, quantization {args.quantization}")
    print("| kind | trainable params | tokens/s | vs PEFT LoRA | peak memory MB | vs PEFT LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in args.kinds.split(","):
        n = next(x["trainable_parameters"] for x in results if x["kind"] == k)
        rel_t = f"{base[k] / base[ref]:.3f}" if ref else "-"
        rel_m = f"{mem[k] / mem[ref]:.3f}" if ref else "-"
        print(f"| {k} | {n:,} | {base[k]:.1f} | {rel_t} | {mem[k]:.0f} | {rel_m} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
