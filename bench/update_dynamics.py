"""How fast each adapter kind's update moves under AdamW, against LoRA's (issue 8's diagnosis).

For each variant (kind, rank, alpha, lr, lr scales) it trains SmolLM2-135M-Instruct on the demo's
tweet-sentiment split for a few steps and records, per step:

* the loss;
* the gradient norm and the relative update ``||dp|| / ||p||`` of every factor group
  (LoRA A / B, CP A / B / C_heads / C_layers / C_matrices, TT input / middle / output cores);
* the effective update size ``||dW_t - dW_{t-1}||_F / ||W0||_F`` per adapted layer (mean over
  layers), from each layer's exact low-rank pair (only here, for measurement: training never
  builds a dense update).

Optionally (``--eval N``) the rank-classification accuracy on N held-out tweets after training.

    .venv/bin/python bench/update_dynamics.py --steps 20 \\
        --variant lora:r=8 --variant cp:r=64 --variant tt:r=5 [--eval 150] [--json out.json]

A variant is ``kind:key=value,...`` with keys r, alpha, lr (default --lr), targets (qv|all) and
lr_scale (a number overriding the kind's own scales).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = {"qv": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def parse_variant(text: str, default_lr: float) -> dict:
    kind, _, rest = text.partition(":")
    out = {"kind": kind, "r": 8, "alpha": 16.0, "lr": default_lr, "targets": "qv", "lr_scale": None}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise SystemExit(f"update_dynamics: unknown variant key {key!r} in {text!r}")
        out[key] = value if key == "targets" else (int(value) if key == "r" else float(value))
    out["name"] = text
    return out


def factor_group(name: str) -> str:
    """A readable group for a parameter name (the factor it is, not the layer it sits in)."""
    leaf = name.rsplit(".", 1)[-1]
    if ".cores." in name:
        index = int(leaf)
        return f"tt core {index}"
    if "tensorft.shared" in name:
        part = name.split("tensorft.shared.", 1)[1]
        return "cp " + part
    return leaf


def layer_pairs(model):
    from tensorft.model import adapted_layers

    out = {}
    for name, layer in adapted_layers(model).items():
        A, B, s = layer.adapter.lora_factors()
        out[name] = (A.detach().double(), B.detach().double() * s)
    return out


def train_variant(base_state, model_dir, tokenizer, rows, variant, steps, batch, seed):
    import torch
    from transformers import AutoModelForCausalLM

    import tensorft

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(base_state)
    cfg = {"kind": variant["kind"], "rank": variant["r"], "alpha": variant["alpha"], "targets": TARGETS[variant["targets"]]}
    if variant["lr_scale"] is not None:
        cfg["lr_scale"] = variant["lr_scale"]
    tensorft.attach(model, cfg)
    groups = tensorft.optimizer_groups(model, variant["lr"], 0.0)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    named = {n: p for n, p in tensorft.adapter_parameters(model).items() if p.requires_grad}
    w0 = {n: layer.base_layer.weight.detach().double().norm().item()
          for n, layer in tensorft.model.adapted_layers(model).items()}
    history = []
    prev = layer_pairs(model)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(rows), (batch,), generator=g).tolist()
        ids, labels, mask = collate([rows[i] for i in idx], tokenizer)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads, before = {}, {}
        for n, p in named.items():
            grp = factor_group(n)
            grads[grp] = grads.get(grp, 0.0) + p.grad.double().pow(2).sum().item()
            before[n] = p.detach().clone()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rel = {}
        for n, p in named.items():
            grp = factor_group(n)
            num, den = rel.get(grp, (0.0, 0.0))
            rel[grp] = (num + (p.detach() - before[n]).double().pow(2).sum().item(), den + before[n].double().pow(2).sum().item())
        now = layer_pairs(model)
        dws = []
        for name, (A, B) in now.items():
            A0, B0 = prev[name]
            dws.append((B @ A - B0 @ A0).norm().item() / w0[name])
        prev = now
        history.append({
            "step": step + 1,
            "loss": round(loss.item(), 4),
            "grad_norm": {k: math.sqrt(v) for k, v in grads.items()},
            "rel_update": {k: math.sqrt(n / d) if d > 0 else float("inf") for k, (n, d) in rel.items()},
            "dW_step": sum(dws) / len(dws),
        })
    total = [ (B @ A).norm().item() / w0[n] for n, (A, B) in prev.items()]
    return model, history, sum(total) / len(total), tensorft.count_parameters(model)


def collate(rows, tokenizer):
    import torch

    seqs, labels = [], []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        full = tokenizer(r["prompt"] + r["completion"])["input_ids"]
        seqs.append(full)
        labels.append([-100] * len(p) + full[len(p):])
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, lab, mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=0, help="held-out tweets to score after training (0: none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts.demo import build_data, evaluate, read_jsonl
    from scripts.demo_assets import smollm2_135m_instruct

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_dir = smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    train_path, heldout_path = build_data()
    rows, heldout = read_jsonl(train_path), read_jsonl(heldout_path)[: args.eval]
    results = []
    for text in args.variant:
        variant = parse_variant(text, args.lr)
        t0 = time.perf_counter()
        model, history, total_dw, n_params = train_variant(base_state, model_dir, tokenizer, rows, variant, args.steps, args.batch, args.seed)
        result = {"variant": text, "params": n_params, "history": history, "final_dW": total_dw,
                  "seconds": round(time.perf_counter() - t0, 1)}
        if heldout:
            result["heldout_accuracy"] = evaluate(model, tokenizer, heldout)["accuracy"]
        results.append(result)
        last = history[-5:]
        print(f"{text:40s} params {n_params:>8,d}  loss {history[0]['loss']:.3f} -> "
              f"{sum(h['loss'] for h in last) / len(last):.3f}  dW/step {sum(h['dW_step'] for h in history) / len(history):.2e}  "
              f"final dW {total_dw:.2e}" + (f"  acc {result['heldout_accuracy']:.3f}" if heldout else "")
              + f"  ({result['seconds']} s)", flush=True)
        mid = history[len(history) // 2]
        print("    rel update/step at mid-run: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(mid["rel_update"].items())), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
