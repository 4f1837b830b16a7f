"""The training recipe behind ``launcher/train.py``: config -> model + adapter -> trl trainer.

Single process by default; the same file runs under ``torchrun`` (DDP) and ``deepspeed``.
``output_dir`` ends up holding the final adapter (``tensorft.from_pretrained(output_dir)``),
the resolved ``config.yaml``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``.
Re-running the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .config import Config, load_config
from .errors import ConfigError, TensorftError

FINISHED = "FINISHED"  # written last: the run is done and output_dir must not be reused silently


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(cfg: Config) -> None:
    out = cfg.train.output_dir
    if os.path.isfile(os.path.join(out, FINISHED)):
        raise TensorftError(
            f"train.output_dir: {out} already holds a finished run; choose another output_dir or remove it"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise TensorftError(f"train.output_dir: {out} exists and is not a directory")


def load_data(cfg: Config):
    from .data import load_dataset

    if not cfg.data.train:
        raise ConfigError("data.train: missing; name a local .json/.jsonl/.csv/.parquet file or a hub dataset")
    d = cfg.data
    train = load_dataset(d.train, d.format, "data.train", d.max_train_samples, d.columns)
    evaluation = None
    if cfg.data.eval:
        evaluation = load_dataset(d.eval, d.format, "data.eval", d.max_eval_samples, d.columns)
    return train, evaluation


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_distributed(cfg: Config) -> None:
    """The launch must match ``distributed.strategy``; say so before anything starts."""
    strategy, world = cfg.distributed.strategy, world_size()
    if strategy == "none" and world > 1:
        raise ConfigError(
            f"distributed.strategy: none, but {world} processes were launched; set ddp, fsdp or deepspeed"
        )
    quantized = cfg.model.quantization != "none"
    if strategy == "fsdp" and quantized:
        # bitsandbytes' packed weights are not DTensor-shardable parameters.
        raise ConfigError(
            f"model.quantization: {cfg.model.quantization} bases cannot be sharded by FSDP in this version; "
            "use ddp or deepspeed with zero_stage: 2"
        )
    if strategy == "deepspeed" and quantized and cfg.distributed.zero_stage == 3:
        raise ConfigError(
            f"model.quantization: {cfg.model.quantization} bases cannot be sharded by DeepSpeed ZeRO-3; "
            "use zero_stage: 2 or ddp"
        )
    if strategy in ("fsdp", "deepspeed") and "RANK" not in os.environ:
        raise ConfigError(
            f"distributed.strategy: {strategy} needs a distributed launch (torchrun --nproc_per_node N, or deepspeed)"
        )


def training_arguments(cfg: Config, checkpoints_dir: str):
    """SFTConfig / DPOConfig from the config (both are transformers TrainingArguments)."""
    import torch
    from trl import DPOConfig, SFTConfig

    cpu = not torch.cuda.is_available()
    deepspeed = cfg.distributed.strategy == "deepspeed"
    if cpu and world_size() > 1 and not deepspeed:
        # Without it accelerate gives each CPU process a world of one (a silent fallback).
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if cpu and deepspeed:
        cpu_deepspeed_state()
    t = cfg.train
    common = dict(
        output_dir=checkpoints_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # AdapterTrainerMixin rotates, after a checkpoint is complete
        eval_strategy="steps" if (cfg.data.eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        # DeepSpeed brings its own CPU accelerator; use_cpu would bypass it (one process each).
        use_cpu=cpu and not deepspeed,
        report_to="none",  # TensorBoard is added explicitly, writing into output_dir/tensorboard
        include_num_input_tokens_seen="non_padding",
        max_length=t.max_length,
        remove_unused_columns=True,
        # FSDP2: the Trainer leaves a self-sharded model's optimizer to us (AdapterTrainerMixin).
        save_only_model=cfg.distributed.strategy == "fsdp",
    )
    if deepspeed:
        common["deepspeed"] = deepspeed_config(cfg)
        if cpu:
            common["accelerator_config"] = {"use_configured_state": True}
    if t.objective == "dpo":
        return DPOConfig(**common, beta=t.dpo_beta, precompute_ref_log_probs=True)
    return SFTConfig(**common, packing=t.packing, completion_only_loss=t.completion_only_loss)


def cpu_deepspeed_state() -> None:
    """accelerate never pairs DeepSpeed with CPU processes: with ``use_cpu`` it silently runs
    DDP, without it it sees no backend and a world of one. Configure its state up front
    (gloo backend, DeepSpeed type) and have the Trainer use it (``use_configured_state``)."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON with its batch, clipping and precision keys filled from the config.

    Concrete values rather than "auto": the Trainer fills "auto" from its own idea of the
    world size, which on CPU is not DeepSpeed's."""
    import json

    path = cfg.distributed.deepspeed_config
    if path is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(here, "configs", "deepspeed", f"zero{cfg.distributed.zero_stage}.json")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path}: invalid JSON at line {e.lineno}") from None
    t = cfg.train
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != cfg.distributed.zero_stage:
        raise ConfigError(f"distributed.zero_stage: {cfg.distributed.zero_stage}, but {path} sets stage {stage}")
    ds.update(
        train_micro_batch_size_per_gpu=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=t.batch_size * t.grad_accum * world_size(),
        gradient_clipping=t.max_grad_norm,
        bf16={"enabled": t.bf16},
    )
    return ds


def build_model(cfg: Config):
    from transformers import AutoTokenizer

    from .loading import load_base_model
    from .model import attach

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base_model(cfg.model)
    attach(model, cfg.adapter)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    if cfg.distributed.strategy == "fsdp":
        from .distributed import will_shard_itself

        will_shard_itself(model)  # sharded once the trainer is built (see run)
    return model, tokenizer


def run(cfg: Config) -> int:
    """Train; returns the process exit code (0 done, 128 + signal when stopped by one)."""
    from transformers.integrations import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter

    from .saving import write_text
    from .trainers import (
        CheckpointOnSignal,
        MetricsCallback,
        RunInfoCallback,
        TensorftDPOTrainer,
        TensorftSFTTrainer,
        newest_complete_checkpoint,
    )

    check_output_dir(cfg)
    check_distributed(cfg)
    train_ds, eval_ds = load_data(cfg)  # bad data fails before any model is loaded
    out = cfg.train.output_dir
    checkpoints = os.path.join(out, "checkpoints")
    args = training_arguments(cfg, checkpoints)
    _ = args.world_size  # sets up the process group now: ZeRO-3 partitions while the model loads
    model, tokenizer = build_model(cfg)
    if _is_main():
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    signals = CheckpointOnSignal()
    callbacks = [signals, MetricsCallback(os.path.join(out, "metrics.jsonl"))]
    if _is_main():
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=os.path.join(out, "tensorboard"))))
    trainer_cls = TensorftDPOTrainer if cfg.train.objective == "dpo" else TensorftSFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.keep_checkpoints = cfg.train.save_total_limit
    if cfg.distributed.strategy == "fsdp":
        from .distributed import shard_fsdp2

        # After the trainer's set-up (trl fingerprints the model's plain tensors), before the
        # optimizer exists; after attach, so the adapter is sharded too.
        shard_fsdp2(model)
    trainer.add_callback(RunInfoCallback(os.path.join(out, "run_info.json"), cfg.distributed.strategy))
    resume = newest_complete_checkpoint(checkpoints)
    if resume and _is_main():
        print(f"tensorft: resuming from {resume}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    if signals.received is not None:
        print(f"tensorft: stopped by signal {signals.received}; checkpoint written to {checkpoints}", file=sys.stderr)
        return 128 + signals.received
    trainer.save_model(out)  # every rank: a sharded adapter is gathered first
    if _is_main():
        write_text(os.path.join(out, FINISHED), f"{trainer.state.global_step}\n")
        print(f"tensorft: adapter written to {os.path.abspath(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Parser

    parser = _Parser(prog="train.py", description="Fine-tune a model with a tensorft adapter.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        return run(cfg)
    except TensorftError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2
