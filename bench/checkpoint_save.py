#!/usr/bin/env python
"""Size and write time of a training checkpoint of a 7B adapter run: how long a preempted job
needs between the signal and the kill.

A tensorft checkpoint holds the adapter (safetensors) and the optimizer state (AdamW: two fp32
moments per trainable parameter), written through the same atomic, fsynced writers the
trainers use (``tensorft.saving``), never the frozen base. This builds the adapter tensors of a
Llama-2-7B adapter at their real shapes (``--kind lora``: A r x d_in and B d_out x r per adapted
matrix; the shapes follow the model's dims, no download) with an AdamW state of the same shapes,
and times writing them. Run it on the cluster's checkpoint filesystem (``--dir``); here it ran
on the sandbox's local disk.

    python bench/checkpoint_save.py --rank 32 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --dir /scratch/$USER
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

LLAMA2_7B = {"hidden": 4096, "ffn": 11008, "layers": 32}
SHAPES = {  # (d_in, d_out) per projection
    "q_proj": ("hidden", "hidden"), "k_proj": ("hidden", "hidden"), "v_proj": ("hidden", "hidden"),
    "o_proj": ("hidden", "hidden"), "gate_proj": ("hidden", "ffn"), "up_proj": ("hidden", "ffn"),
    "down_proj": ("ffn", "hidden"),
}


def adapter_tensors(rank: int, targets: list[str], dims: dict) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(dims["layers"]):
        for t in targets:
            d_in, d_out = (dims[k] for k in SHAPES[t])
            out[f"model.layers.{layer}.{t}.adapter.lora_A"] = torch.randn(rank, d_in)
            out[f"model.layers.{layer}.{t}.adapter.lora_B"] = torch.randn(d_out, rank)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from tensorft.saving import atomic_file, save_safetensors

    tensors = adapter_tensors(args.rank, args.targets.split(","), LLAMA2_7B)
    n = sum(t.numel() for t in tensors.values())
    state = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
                       for i, t in enumerate(tensors.values())},
             "param_groups": [{"lr": 1e-4, "params": list(range(len(tensors)))}]}
    times, size = [], 0
    for _ in range(args.repeats):
        folder = tempfile.mkdtemp(prefix="tensorft-ckpt-", dir=args.dir)
        try:
            start = time.perf_counter()
            save_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
            with atomic_file(os.path.join(folder, "optimizer.pt")) as tmp:
                torch.save(state, tmp)
            times.append(time.perf_counter() - start)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        finally:
            shutil.rmtree(folder)
    print(f"Llama-2-7B, lora r={args.rank} on {args.targets}: {n:,} trainable parameters, {len(tensors)} tensors")
    print(f"checkpoint {size / 2**20:,.0f} MiB (adapter + AdamW state), written and fsynced in "
          f"{min(times):.2f} s (best of {args.repeats}; all: {', '.join(f'{t:.2f}' for t in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
