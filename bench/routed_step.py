#!/usr/bin/env python
"""Training-step cost of the task-routed kinds on a mixed-task batch, against tensorft lora.

Every routed kind (poly, mhr, tensorpoly1, tensorpoly2) and tlora runs forward + backward of
one causal-LM training step on a batch whose rows belong to different tasks (row i has task
``i % tasks``), at the same rank, alpha and targets as the lora row. The routed kinds form each
row's mixed factors and run two batched matmuls (``tensorft/adapters/task_routed.py``); the
claim checked here is that this costs about what one shared LoRA costs (issue target: within
1.10x).

``trex`` (T-REX, issue 10) runs with its per-row ``intuition`` routing input (random cosines in
[-1, 1), shape (batch, I*J)), ``--trex-i`` output vectors and ``--rank`` input vectors. Its
target is the same 1.10x, against lora at about equal trainable parameters:
``--lora-rank match`` gives lora the rank whose parameter count is nearest T-REX's
(``round(trex params / lora params at rank 1)``, both counted by ``tensorft.count_parameters``
on the same targets). The intuition encoder runs once per example before training (cached),
never in a step, so its cost is timed apart (``--encoder-examples``): all-MiniLM-L6-v2 through
``tensorft.intuition.Encoder`` on texts of about ``--seq`` tokens, reported per example.

Timing under contention: all models live in one process and the kinds are timed round-robin,
one step each per round, so a busy neighbour slows every kind alike; the table reports the
median per kind and the ratio of medians to lora, plus each round's ratio spread (min..max).
Use ``OMP_NUM_THREADS`` equal to the cores you have to yourself. On a shared CPU machine run
with one thread: each step's CPU time (``time.thread_time``: the work the step did, whatever
the neighbours take) is recorded next to its wall time, and the ratios of both are reported;
on a GPU only the wall time means anything.

Peak memory: the live-tensor high-water mark of one extra step above what was live before it,
replayed from ``torch.profiler`` allocation events (bench/adapter_step.py's function).

Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/routed_step.py --layers 30 --rounds 8
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/routed_step.py --kinds lora,trex \
        --lora-rank match --layers 4 --vocab 8192 --rounds 30 --out bench/results/trex_step_cpu.json
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
INTUITION_KINDS = ("trex",)  # routed per row by the example's intuition scores, not by task
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = adapter_step.model_config_kwargs("smollm2-135m", {})
    dims.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims)).to(args.device)
    model.config.use_cache = False
    model.train()
    return model


def spec_of(kind: str, args, rank: int | None = None) -> dict:
    rank = rank or args.rank
    spec = {"kind": kind, "rank": rank, "alpha": 2 * rank, "targets": list(args.targets)}
    if kind == "trex":
        spec["rank_out"] = args.trex_i
    elif kind not in UNROUTED:
        spec["n_tasks"] = args.tasks
    return spec


def build(kind: str, args, rank: int | None = None) -> torch.nn.Module:
    return tensorft.attach(base_model(args), spec_of(kind, args, rank))


def matched_lora_rank(args) -> int:
    """The lora rank whose trainable parameter count is nearest T-REX's on the same targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # meta device: only the shapes matter for counting
    dims = adapter_step.model_config_kwargs("smollm2-135m", {})
    dims.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    with torch.device("meta"):
        trex = tensorft.count_parameters(tensorft.attach(LlamaForCausalLM(LlamaConfig(**dims)), spec_of("trex", args)))
        per_rank = tensorft.count_parameters(
            tensorft.attach(LlamaForCausalLM(LlamaConfig(**dims)), spec_of("lora", args, rank=1)))
    return max(1, round(trex / per_rank))


def encoder_cost(args) -> dict:
    """all-MiniLM-L6-v2 embedding cost per example (what T-REX runs once per training example
    before training, and once per prompt per generate call), on texts of about ``--seq`` tokens
    (capped at the encoder's 256), batches of 32 as ``tensorft.intuition`` embeds them."""
    from tensorft.intuition import DEFAULT_ENCODER, MAX_ENCODER_TOKENS, Encoder

    encoder = Encoder(DEFAULT_ENCODER, args.device)
    tok = encoder.tokenizer
    g = torch.Generator().manual_seed(2)
    # random word pieces from the middle of the vocabulary (no special tokens); decoded and
    # re-tokenized, so the measured length is reported rather than assumed
    texts = [tok.decode(torch.randint(2000, 28000, (args.seq,), generator=g).tolist())
             for _ in range(args.encoder_examples)]
    lengths = [min(len(tok(t)["input_ids"]), MAX_ENCODER_TOKENS) for t in texts]
    encoder.embed(texts[:32])  # warm-up
    times = []
    for _ in range(args.encoder_repeats):
        start = time.perf_counter()
        emb = encoder.embed(texts)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    from tensorft.intuition import fit_centroids

    fit_centroids(emb, min(args.trex_i * args.rank, len(texts)))  # once per run, on every example
    kmeans_s = time.perf_counter() - start
    per_example = [t / len(texts) for t in times]
    return {
        "encoder": DEFAULT_ENCODER,
        "examples": len(texts),
        "mean_tokens": statistics.mean(lengths),
        "repeats": args.encoder_repeats,
        "per_example_ms_median": 1000 * statistics.median(per_example),
        "per_example_ms_min": 1000 * min(per_example),
        "per_example_ms_max": 1000 * max(per_example),
        "kmeans_s": kmeans_s,
    }


def make_step(kind: str, model, batch: dict):
    if kind in UNROUTED:
        routed = {}
    elif kind in INTUITION_KINDS:
        routed = {"intuition": batch["intuition"]}
    else:
        routed = {"task_ids": batch["task_ids"]}

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
    parser.add_argument("--rank", type=int, default=8, help="rank of every kind; for trex J, the input-side vectors")
    parser.add_argument("--trex-i", type=int, default=4, help="trex: I, the output-side vectors (K = I * rank)")
    parser.add_argument("--lora-rank", default=None,
                        help="lora's rank: an integer, or 'match' for the rank nearest trex's parameter count "
                             "(default: --rank)")
    parser.add_argument("--encoder-examples", type=int, default=256,
                        help="with trex: examples the intuition encoder is timed on (0: skip)")
    parser.add_argument("--encoder-repeats", type=int, default=3)
    parser.add_argument("--targets", default=",".join(ALL_LINEAR))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(HERE / "results" / "routed_step.json"))
    args = parser.parse_args(argv)
    args.targets = args.targets.split(",")
    kinds = args.kinds.split(",")
    if kinds[0] != "lora":
        kinds = ["lora", *[k for k in kinds if k != "lora"]]

    lora_rank = args.rank
    if args.lora_rank == "match":
        lora_rank = matched_lora_rank(args)
    elif args.lora_rank is not None:
        lora_rank = int(args.lora_rank)
    args.lora_rank_used = lora_rank

    torch.manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device),
        "task_ids": torch.arange(args.batch) % args.tasks,
        # random cosines to the K centroids (what the collator carries in training)
        "intuition": torch.rand(args.batch, args.trex_i * args.rank, device=args.device) * 2 - 1,
    }
    models = {k: build(k, args, lora_rank if k == "lora" else None) for k in kinds}
    steps = {k: make_step(k, models[k], batch) for k in kinds}
    params = {k: tensorft.count_parameters(models[k]) for k in kinds}
    for k in kinds:  # warm-up
        steps[k]()
    peaks = {k: adapter_step.profiled_step_peak_mb(steps[k], args.device) for k in kinds}

    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu_times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]  # rotate: no kind always first
        for k in order:
            start, cpu_start = time.perf_counter(), time.thread_time()
            steps[k]()
            times[k].append(time.perf_counter() - start)
            cpu_times[k].append(time.thread_time() - cpu_start)

    lora, lora_cpu = statistics.median(times["lora"]), statistics.median(cpu_times["lora"])
    rows = []
    for k in kinds:
        per_round = [t / base for t, base in zip(times[k], times["lora"])]
        cpu_per_round = [t / base for t, base in zip(cpu_times[k], cpu_times["lora"])]
        rows.append({
            "kind": k,
            "rank": lora_rank if k == "lora" else args.rank,
            **({"rank_out": args.trex_i} if k == "trex" else {}),
            "params": params[k],
            "median_s": statistics.median(times[k]),
            "ratio_to_lora": statistics.median(times[k]) / lora,
            "round_ratio_min": min(per_round),
            "round_ratio_max": max(per_round),
            "cpu_median_s": statistics.median(cpu_times[k]),
            "cpu_ratio_to_lora": statistics.median(cpu_times[k]) / lora_cpu,
            "cpu_round_ratio_min": min(cpu_per_round),
            "cpu_round_ratio_max": max(cpu_per_round),
            "step_peak_mb": peaks[k],
            "peak_ratio_to_lora": peaks[k] / peaks["lora"],
        })
    encoder = encoder_cost(args) if "trex" in kinds and args.encoder_examples > 0 else None
    info = adapter_step.machine_info(args.device)
    machine = f"{info.get('gpu') or info['cpu']}, {info['usable_cores']} usable cores, {torch.get_num_threads()} threads, torch {info['torch']}"
    command = "python bench/routed_step.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "command": command, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows, **({"encoder": encoder} if encoder else {})}
    print(f"# {machine}\n# {command}\n# batch {args.batch} x {args.seq}, {args.tasks} tasks per batch, "
          f"rank {args.rank} (lora {lora_rank}), targets {','.join(args.targets)}, {args.layers} layers, {args.rounds} rounds")
    print("| kind | trainable params | step wall (median) | vs lora | per-round range "
          "| step CPU time (median) | vs lora | per-round range | step peak | vs lora |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kind']} | {row['params']:,} | {row['median_s']:.3f} s | {row['ratio_to_lora']:.3f}x | "
              f"{row['round_ratio_min']:.2f}-{row['round_ratio_max']:.2f} | {row['cpu_median_s']:.3f} s | "
              f"{row['cpu_ratio_to_lora']:.3f}x | {row['cpu_round_ratio_min']:.2f}-{row['cpu_round_ratio_max']:.2f} | "
              f"{row['step_peak_mb']:.0f} MB | {row['peak_ratio_to_lora']:.3f}x |")
    if encoder:
        print(f"# intuition encoder {encoder['encoder']}: {encoder['per_example_ms_median']:.2f} ms per example "
              f"(median of {encoder['repeats']}, range {encoder['per_example_ms_min']:.2f}-"
              f"{encoder['per_example_ms_max']:.2f}; {encoder['examples']} examples of {encoder['mean_tokens']:.0f} "
              f"tokens); k-means of them {encoder['kmeans_s']:.2f} s; a step costs "
              f"{1000 * statistics.median(times['trex' if 'trex' in times else kinds[0]]) / args.batch:.1f} ms per row")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
