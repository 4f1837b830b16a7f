#!/usr/bin/env python
"""The GPU check: one command, a few minutes on one lent GPU, every result written to bench/.

What it runs (each part in its own subprocess; a failing part is recorded with its last error
lines and the others still run):

1. ``bnb-cuda``: bitsandbytes' CUDA path: an nf4 ``Linear4bit`` on the GPU against its own
   dequantized weight (forward and backward).
2. ``sft``: nf4 QLoRA SFT of a Llama-2-7B-shaped model (7B dims, ``--layers`` decoder layers,
   random weights, bf16 compute) with tensorft lora, cp and tt against PEFT LoRA + trl at the
   same settings (``bench/train_sft.py``): tokens/s and peak memory.
3. ``launch``: the launcher on one GPU under each strategy: DDP and DeepSpeed ZeRO-2 with the
   nf4 base, ZeRO-3 and FSDP2 with the bf16 base and with the nf4 base (packed 4-bit weights
   sharded; cp, activation checkpointing), DPO with the
   nf4 base in one process and DPO under FSDP2: exit code, tokens/s, peak memory.

Results: ``--out`` (default bench/results/gpu_check/) gets ``results.json`` and ``summary.md``
(machine, command, a table per part). With ``--device cpu --layers 1 --tiny`` the same code runs
on a CPU machine with a tiny model (what the lead runs before a GPU is lent).

    HF_HUB_OFFLINE=1 python bench/gpu_check.py                    # on the GPU machine
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py --device cpu --tiny --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "launcher", "train.py")
sys.path.insert(0, HERE)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-5)


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def build_base(args, work: str) -> str:
    """A 7B-shaped (or tiny) Llama with SmolLM2's tokenizer, saved in bf16: random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, ROOT)  # scripts/ (the demo's model) from the checkout
    from scripts.demo_assets import smollm2_135m_instruct

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    dims = TINY if args.tiny else LLAMA2_7B
    torch.manual_seed(0)
    config = LlamaConfig(**dims, num_hidden_layers=args.layers, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = os.path.join(work, "base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def check_bnb_cuda(args) -> dict:
    """nf4 Linear4bit forward/backward on the device against the dequantized weight."""
    import bitsandbytes as bnb
    import torch

    d = 64 if args.tiny else 4096
    torch.manual_seed(0)
    dense = torch.nn.Linear(d, d, bias=False, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to(args.device)
    x = torch.randn(8, d, dtype=torch.bfloat16, device=args.device, requires_grad=True)
    y = layer(x)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    want = x @ w.t()
    y.float().sum().backward()
    return {
        "bitsandbytes": bnb.__version__,
        "weight_device": str(layer.weight.device),
        "max_abs_diff_vs_dequantized": (y - want).abs().max().item(),
        "input_grad_finite": bool(torch.isfinite(x.grad).all()),
        "ok": (y - want).abs().max().item() < 0.1 and bool(torch.isfinite(x.grad).all()),
    }


def run_sft_bench(args, base: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "train_sft.py"), "--model", base, "--quantization", "nf4", "--bf16",
           "--kinds", "peft-lora,lora,cp,tt", "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", "2", "--json", os.path.join(args.work, "sft.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=args.part_timeout)
    if p.returncode != 0:
        return {"ok": False, "error": tail(p.stderr)}
    with open(os.path.join(args.work, "sft.json")) as f:
        return {"ok": True, "results": json.load(f)["results"], "table": tail(p.stdout, 8)}


LAUNCHES = {  # name -> (distributed section, quantization, objective)
    "ddp-nf4": ({"strategy": "ddp"}, "nf4", "sft"),
    "zero2-nf4": ({"strategy": "deepspeed", "zero_stage": 2}, "nf4", "sft"),
    "zero3-bf16": ({"strategy": "deepspeed", "zero_stage": 3}, "none", "sft"),
    "fsdp2-bf16": ({"strategy": "fsdp"}, "none", "sft"),
    "zero3-nf4": ({"strategy": "deepspeed", "zero_stage": 3}, "nf4", "sft"),
    "fsdp2-nf4": ({"strategy": "fsdp"}, "nf4", "sft"),
    "dpo-nf4": ({"strategy": "none"}, "nf4", "dpo"),
    "dpo-fsdp2-bf16": ({"strategy": "fsdp"}, "none", "dpo"),
}


def write_data(work: str, rows: int) -> None:
    words = "the model learns a small update for every layer while the base stays frozen".split()
    with open(os.path.join(work, "sft.jsonl"), "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Write sentence {i}.", "input": "",
                                "output": " ".join(words[(i + j) % len(words)] for j in range(40))}) + "\n")
    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"Which word comes first in sentence {i}?",
                                "chosen": f" {words[i % len(words)]}", "rejected": f" {words[(i + 3) % len(words)]}"}) + "\n")


def launch_config(args, base: str, name: str) -> str:
    import yaml

    distributed, quantization, objective = LAUNCHES[name]
    cfg = {
        "model": {"name_or_path": base, "quantization": quantization, "dtype": "bfloat16"},
        "adapter": {"kind": "cp", "rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"train": os.path.join(args.work, "pairs.jsonl" if objective == "dpo" else "sft.jsonl"),
                 "format": "preference" if objective == "dpo" else "alpaca"},
        "train": {"output_dir": os.path.join(args.work, name), "objective": objective, "max_steps": args.steps,
                  "batch_size": args.batch, "max_length": args.seq, "lr": 1e-4, "logging_steps": 1,
                  "save_steps": args.steps, "bf16": args.device == "cuda",  # CPU runs keep fp32 compute
                  "gradient_checkpointing": True},
        "distributed": distributed,
    }
    path = os.path.join(args.work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_launch(args, base: str, name: str) -> dict:
    config = launch_config(args, base, name)
    distributed = LAUNCHES[name][0]
    if distributed["strategy"] == "none":
        cmd = [sys.executable, TRAIN, "--config", config]
    else:  # one process per GPU: here one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", TRAIN,
               "--config", config]
    start = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=args.part_timeout)
    out = os.path.join(args.work, name)
    result = {"exit_code": p.returncode, "wall_s": round(time.time() - start, 1), "ok": p.returncode == 0}
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics):
        rows = [json.loads(line) for line in open(metrics) if '"loss"' in line]
        timed = rows[2:] or rows
        if rows:
            result.update(tokens_per_s=sorted(r["tokens_per_s"] for r in timed)[len(timed) // 2],
                          peak_memory_mb=max(r["peak_memory_mb"] for r in rows),
                          first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
    info = os.path.join(out, "run_info.json")
    if os.path.isfile(info):
        result["run_info"] = json.load(open(info))
    if p.returncode != 0:
        result["error"] = tail(p.stderr, 60)  # torchrun's own summary is the last ~15 lines
    return result


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def machine(args) -> str:
    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def summary(results: dict) -> str:
    lines = [f"# GPU check ({results['date']})", "", f"Machine: {results['machine']}", "",
             f"    {results['command']}", "", f"Settings: {results['settings']}", ""]
    bnb = results["parts"].get("bnb-cuda", {})
    lines += ["## bitsandbytes nf4 on the device", "", f"`{json.dumps(bnb)}`", ""]
    sft = results["parts"].get("sft", {})
    lines += ["## nf4 QLoRA SFT, tensorft vs PEFT LoRA + trl", ""]
    lines += [sft.get("table") or f"FAILED:\n\n```\n{sft.get('error')}\n```", ""]
    lines += ["## The launcher under each strategy (cp r=16, q,k,v,o, activation checkpointing)", "",
              "| run | exit | tokens/s | peak MB | loss first -> last | world size |", "|---|---:|---:|---:|---|---:|"]
    for name in LAUNCHES:
        r = results["parts"].get(name)
        if r is None:
            continue
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "first_loss" in r else "-"
        lines.append(f"| {name} | {r['exit_code']} | {r.get('tokens_per_s', '-')} | {r.get('peak_memory_mb', '-')} | "
                     f"{loss} | {(r.get('run_info') or {}).get('world_size', '-')} |")
    failed = [n for n, r in results["parts"].items() if not r.get("ok")]
    lines += ["", "Failed parts: " + (", ".join(failed) if failed else "none")]
    for name in failed:
        lines += ["", f"### {name}", "", "```", str(results["parts"][name].get("error")), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of 7B dims (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--parts", default="bnb-cuda,sft," + ",".join(LAUNCHES))
    parser.add_argument("--part-timeout", type=int, default=900)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check"))
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --tiny for a smoke run)", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(args), "command": "python bench/gpu_check.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
               "settings": f"layers {args.layers}{' (tiny dims)' if args.tiny else ' of Llama-2-7B dims'}, batch "
                           f"{args.batch} x seq {args.seq}, {args.steps} steps", "parts": {}}
    with tempfile.TemporaryDirectory(prefix="tensorft-gpu-check-") as work:
        args.work = work
        write_data(work, args.batch * args.steps * 2)
        base = build_base(args, work)
        for part in parts:
            started = time.time()
            try:
                if part == "bnb-cuda":
                    result = check_bnb_cuda(args)
                elif part == "sft":
                    result = run_sft_bench(args, base)
                else:
                    result = run_launch(args, base, part)
            except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            results["parts"][part] = result
            print(f"gpu_check: {part}: {'ok' if result.get('ok') else 'FAILED'} ({time.time() - started:.0f} s)",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = summary(results)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r.get("ok") for r in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
