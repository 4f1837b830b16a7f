#!/usr/bin/env python
"""One adapted projection's training step, in isolation: where an adapter's own cost shows.

A frozen ``d_in -> d_out`` linear layer of a real Hugging Face Llama (q_proj of a one-layer model
built in code) runs forward + backward (input gradient, as inside a network) on ``tokens``
tokens, as:

* ``floor``: the frozen layer plus a zero bias parameter on its output (what any adapter needs:
  the output's gradient reaches a trainable parameter), the same definition as adapter_step.py;
* ``peft-lora``: PEFT's LoRA layer;
* ``lora``, ``cp``, ``tt``: tensorft's kinds through ``tensorft.attach``.

Reported: per-step CPU time of this thread (``time.thread_time``, one torch thread), median
over rounds of the mean of ``--iters`` steps, kinds interleaved in every round; and the ratio to
the floor. The CPU clock makes the numbers usable on a shared machine (a busy neighbour costs
wall time, not this thread's CPU time; it still costs some through shared caches, hence the
interleaving). Compare two versions of tensorft by running this file with ``PYTHONPATH`` set
to each checkout.

    OMP_NUM_THREADS=1 .venv/bin/python bench/adapter_layer.py                        # SmolLM2 q_proj, 4 x 128
    OMP_NUM_THREADS=1 .venv/bin/python bench/adapter_layer.py --d 4096 --tokens 256 --iters 3   # Llama-2-7B q_proj
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

KINDS = ("floor", "peft-lora", "lora", "cp", "tt")


def build(kind: str, d: int, heads: int, rank: int, alpha: float):
    """The q_proj of a one-layer Llama with ``kind`` on it: a callable x -> y."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=64,  # the MLP never runs here
                       num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=1, vocab_size=256, head_dim=d // heads)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    if kind == "floor":
        q = model.model.layers[0].self_attn.q_proj
        probe = torch.nn.Parameter(torch.zeros(d))
        return lambda x: q(x) + probe
    if kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj"],
                                                      lora_dropout=0.0))
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    else:
        import tensorft

        tensorft.attach(model, {"kind": kind, "rank": rank, "alpha": alpha, "targets": ["q_proj"]})
        layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # nonzero factors: a zero B would let nothing special happen
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return layer


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--d", type=int, default=576, help="d_in = d_out (SmolLM2-135M: 576, Llama-2-7B: 4096)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--tokens", type=int, default=512, help="batch x sequence")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=20, help="steps per kind per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kinds = args.kinds.split(",")
    layers = {k: build(k, args.d, args.heads, args.rank, args.alpha) for k in kinds}
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    grad = torch.randn(args.tokens, args.d)

    def step(layer):
        layer(x).backward(grad)
        x.grad = None

    for k in kinds:  # warm-up
        step(layers[k])
    per_round = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            t = time.thread_time()
            for _ in range(args.iters):
                step(layers[k])
            per_round[k].append((time.thread_time() - t) / args.iters * 1e3)
    floor = statistics.median(per_round["floor"]) if "floor" in kinds else None
    rows = []
    print(f"q_proj {args.d} -> {args.d}, {args.tokens} tokens, rank {args.rank}, fp32, 1 thread, CPU ms per step "
          f"(median of {args.rounds} interleaved rounds x {args.iters} steps)")
    print("| kind | ms | vs floor | adapter's own ms (over the floor) |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        ms = statistics.median(per_round[k])
        rows.append({"kind": k, "ms": ms, "rounds_ms": per_round[k]})
        vs = f"{ms / floor:.3f}" if floor else "-"
        own = f"{ms - floor:.2f}" if floor else "-"
        print(f"| {k} | {ms:.2f} | {vs} | {own} |")
    result = {"command": " ".join(["bench/adapter_layer.py", *(argv if argv is not None else sys.argv[1:])]),
              "args": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
