"""Run by tests/test_quantized_sharded.py under ``torchrun --nproc_per_node 2``: every adapter kind
on a 4-bit (nf4) base, sharded by FSDP2 and by DeepSpeed ZeRO-3, must give one process's loss
and adapter gradients on the whole batch (each rank holds half the rows).

Usage: torchrun --nproc_per_node 2 tests/sharded_quantized_kinds.py MODEL_DIR OUT_JSON KIND [KIND ...]
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorft  # noqa: E402
from tensorft.model import adapter_parameters  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS, SEQ = 4, 12


def spec_and_inputs(kind: str, vocab: int) -> tuple[dict, dict]:
    spec = {"kind": kind, "rank": 4, "alpha": 8, "targets": TARGETS}
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(0, vocab, (ROWS, SEQ), generator=g)}
    if kind == "trex":
        spec["rank_out"] = 2  # K = 2 x 4 experts, routed by per-row intuition scores
        inputs["intuition"] = torch.rand(ROWS, 8, generator=g) * 2 - 1
    elif kind in ("poly", "mhr", "tensorpoly1", "tensorpoly2"):
        spec.update(n_tasks=2, routing="sigmoid")  # relaxed-Bernoulli would draw per-rank noise
        if kind == "mhr":
            spec["n_splits"] = 2
        inputs["task_ids"] = torch.tensor([0, 1, 1, 0])
    return spec, inputs


def load(model_dir: str, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float32)
    spec, inputs = spec_and_inputs(kind, model.config.vocab_size)
    torch.manual_seed(0)
    model = tensorft.attach(model, spec)
    with torch.no_grad():  # every factor away from its init, so every gradient is non-trivial
        g = torch.Generator().manual_seed(5)
        for _, p in sorted(adapter_parameters(model).items()):
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, inputs


def half(inputs: dict, rank: int) -> dict:
    return {k: v[rank * ROWS // 2:(rank + 1) * ROWS // 2] for k, v in inputs.items()}


def loss_of(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def full_grads(model, get) -> dict:
    return {n: get(n, p).detach().float().clone() for n, p in sorted(adapter_parameters(model).items()) if p.requires_grad}


def compare(ref_loss, ref_grads, loss, grads) -> dict:
    assert ref_grads.keys() == grads.keys(), (sorted(ref_grads), sorted(grads))
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return {"loss_diff": abs(ref_loss - loss),
            "grad_diff": max((ref_grads[n] - grads[n]).abs().max().item() for n in grads) / scale,
            "grad_scale": scale, "tensors": len(grads)}


def run(model_dir: str, kind: str, rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    # one process on the whole batch (every rank computes it: no communication)
    model, inputs = load(model_dir, kind)
    loss = loss_of(model, inputs)
    loss.backward()
    ref_loss, ref_grads = loss.item(), full_grads(model, lambda n, p: p.grad)
    out = {}

    # FSDP2: each rank its half, gradients averaged by the reduce-scatter
    from tensorft.distributed import shard_fsdp2

    model, inputs = load(model_dir, kind)
    shard_fsdp2(model)
    base = [p for n, p in model.named_parameters() if "base_layer.weight" in n and isinstance(p, DTensor)]
    loss = loss_of(model, half(inputs, rank))
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = full_grads(model, lambda n, p: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
    out["fsdp2"] = {**compare(ref_loss, ref_grads, mean.item() / 2, grads),
                    "sharded_4bit": bool(base) and all(p.to_local().shape[0] < p.shape[0] for p in base)}

    # DeepSpeed ZeRO-3
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model, inputs = load(model_dir, kind)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config={"train_micro_batch_size_per_gpu": ROWS // 2, "gradient_accumulation_steps": 1,
                                              "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 0.0}}})
    loss = loss_of(engine, half(inputs, rank))
    engine.backward(loss)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    # ZeRO-3 averages gradients over ranks, as DDP does
    grads = full_grads(engine.module, lambda n, p: safe_get_full_grad(p))
    partitioned = [p for n, p in engine.module.named_parameters() if "base_layer.weight" in n]
    out["zero3"] = {**compare(ref_loss, ref_grads, mean.item() / 2, grads),
                    "sharded_4bit": bool(partitioned) and all(p.ds_tensor.numel() < p.ds_numel for p in partitioned)}
    engine.destroy()
    return out


def main() -> None:
    model_dir, out_path, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {kind: run(model_dir, kind, rank) for kind in kinds}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
