"""The training recipe behind ``launcher/train.py``: config -> model + adapter -> trl trainer.

Single process by default; the same file runs under ``torchrun`` (DDP) and ``deepspeed``.
``output_dir`` ends up holding the final adapter (``tensorft.from_pretrained(output_dir)``),
the resolved ``config.yaml``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/`` (and
``tasks.json``, rows per task, for a multi-task config).
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
    """(train, eval) data sets; eval is a dict per task for a multi-task config."""
    train, evaluation, _ = load_data_and_tasks(cfg)
    return train, evaluation


def load_data_and_tasks(cfg: Config):
    """(train, eval, tasks): for a multi-task config, ``tasks`` says how many rows each task has
    and gave to the mix (None for one task)."""
    from .data import load_dataset, load_tasks

    d = cfg.data
    if d.tasks and cfg.adapter.init_from:
        return with_new_task_id(cfg, *load_tasks(d, cfg.train.seed))
    if d.tasks:
        return load_tasks(d, cfg.train.seed)
    if not d.train:
        raise ConfigError(
            "data.train: missing; name a local .json/.jsonl/.csv/.parquet file or a hub dataset (or list data.tasks)"
        )
    train = load_dataset(d.train, d.format, "data.train", d.max_train_samples, d.columns)
    evaluation = None
    if d.eval:
        evaluation = load_dataset(d.eval, d.format, "data.eval", d.max_eval_samples, d.columns)
    return train, evaluation, None


def resolve_tasks(cfg: Config) -> None:
    """Give the adapter the task names (saved with it) and, for routed kinds, their number;
    a routed kind needs a multi-task config (it reads a task id per row). A few-shot config
    (``adapter.init_from``) takes the saved adapter instead (:func:`resolve_fewshot`)."""
    if cfg.adapter.init_from:
        return resolve_fewshot(cfg)
    if cfg.adapter.fewshot:
        raise ConfigError("adapter.fewshot: needs adapter.init_from (the trained task-routed adapter to adapt)")
    names = list(cfg.data.tasks)
    routed = hasattr(cfg.adapter.options, "n_tasks")
    if routed and not names:
        raise ConfigError(
            f"adapter.kind: {cfg.adapter.kind} routes each row by its task; list the tasks under data.tasks "
            "(a single-task data.train has no task ids)"
        )
    if names:
        cfg.adapter.tasks = names
        if routed:
            cfg.adapter.options.n_tasks = len(names)


# --------------------------------------------------------------------------- few-shot adaptation

# The new task's routing row: "new" as a task starting to train; -mu: the mean of the trained
# rows, so the frozen routing mixes the experts as the old tasks do on average.
FEWSHOT_ROW_INIT = {"full": "new", "routing": "new", "modules": "mean"}
# Keys that define the adapter's structure: a few-shot config takes them from init_from.
STRUCTURE_KEYS = ("kind", "rank", "alpha", "targets", "modules_to_save")


def resolve_fewshot(cfg: Config) -> None:
    """``cfg.adapter`` becomes the adapter saved in ``adapter.init_from`` with the config's one
    task appended to its tasks; the model defaults to that adapter's base."""
    from .config import AdapterConfig
    from .saving import read_adapter_config

    given = cfg.adapter
    try:
        saved, model_cfg, _ = read_adapter_config(given.init_from)
    except TensorftError as e:
        raise ConfigError(f"adapter.init_from: {e}") from None
    if not saved.routed:
        raise ConfigError(
            f"adapter.init_from: {given.init_from} holds a {saved.kind} adapter, which is not task-routed "
            "(few-shot adaptation adds a routing row: poly, mhr, tensorpoly1, tensorpoly2)"
        )
    names = list(cfg.data.tasks)
    if len(names) != 1:
        raise ConfigError(f"data.tasks: few-shot adaptation (adapter.init_from) trains one new task, got {len(names)}")
    if names[0] in saved.tasks:
        raise ConfigError(
            f"data.tasks.{names[0]}: {given.init_from} already has this task ({saved.known_tasks()}); name the new task otherwise"
        )
    default = AdapterConfig()
    for key in STRUCTURE_KEYS:  # a key the config does set must agree with the saved adapter
        value = getattr(given, key)
        if value != getattr(default, key) and value != getattr(saved, key):
            raise ConfigError(
                f"adapter.{key}: {value!r}, but the adapter in {given.init_from} has {getattr(saved, key)!r} "
                "(with adapter.init_from, leave it out)"
            )
    # an adapter trained without names (Python API) keeps its ids as the old tasks' names
    saved.tasks = (saved.tasks or [str(i) for i in range(saved.options.n_tasks)]) + names
    saved.init_from, saved.fewshot, saved.lr_scale = given.init_from, given.fewshot or "full", given.lr_scale
    cfg.adapter = saved
    if not cfg.model.name_or_path:
        cfg.model = model_cfg


def start_fewshot(model, load_weights: bool = True) -> int:
    """After ``attach`` of a few-shot config's adapter: load the trained weights and add the new
    task's routing row; the kind freezes what the mode does not train
    (``RoutedKind.frozen_parameters``). Returns the new task's id."""
    from .model import refresh_trainable, root_of
    from .saving import load_adapter_weights

    adapter = root_of(model).config
    mode = adapter.fewshot or "full"
    if load_weights:
        load_adapter_weights(model, adapter.init_from)
    new_id = root_of(model).kind.add_task(model, FEWSHOT_ROW_INIT[mode])
    refresh_trainable(model)  # the new routing parameters follow the mode too
    return new_id


def with_new_task_id(cfg: Config, train, evaluation, tasks):
    """A few-shot config's data is task 0 of its own data.tasks; in the adapter it is the new,
    last task: relabel its rows (and the id in tasks.json)."""
    new_id = len(cfg.adapter.tasks) - 1

    def relabel(ds):
        return ds.remove_columns("task_ids").add_column("task_ids", [new_id] * len(ds))

    for info in tasks["tasks"].values():
        info["id"] = new_id
    evaluation = evaluation and {name: relabel(ds) for name, ds in evaluation.items()}
    return relabel(train), evaluation, tasks


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
        eval_strategy="steps" if (has_eval(cfg) and t.eval_steps) else "no",
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


def has_eval(cfg: Config) -> bool:
    return bool(cfg.data.eval or any(task.eval for task in cfg.data.tasks.values()))


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
    if cfg.adapter.init_from:
        start_fewshot(model)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    if cfg.distributed.strategy == "fsdp":
        from .distributed import will_shard_itself

        will_shard_itself(model)  # sharded once the trainer is built (see run)
    return model, tokenizer


def make_trainer(cfg: Config, model, tokenizer, args, train_ds, eval_ds, callbacks):
    from .trainers import TensorftDPOTrainer, TensorftSFTTrainer

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
    trainer.task_names = list(cfg.adapter.tasks)  # per-task losses are logged as loss/<name> (ids index it)
    return trainer


def report_tasks(out: str, tasks: dict | None) -> None:
    """Rows per task before and after mixing: printed, and kept in ``tasks.json``."""
    from .saving import write_json

    if tasks is None or not _is_main():
        return
    rows = ", ".join(f"{name} {t['mixed']} (of {t['rows']})" for name, t in tasks["tasks"].items())
    print(f"tensorft: training rows per task after {tasks['mixing']} mixing: {rows}", file=sys.stderr)
    write_json(os.path.join(out, "tasks.json"), tasks)


def run(cfg: Config) -> int:
    """Train; returns the process exit code (0 done, 128 + signal when stopped by one)."""
    from transformers.integrations import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter

    from .saving import write_text
    from .trainers import CheckpointOnSignal, MetricsCallback, RunInfoCallback, newest_complete_checkpoint

    check_output_dir(cfg)
    check_distributed(cfg)
    resolve_tasks(cfg)
    train_ds, eval_ds, tasks = load_data_and_tasks(cfg)  # bad data fails before any model is loaded
    out = cfg.train.output_dir
    checkpoints = os.path.join(out, "checkpoints")
    args = training_arguments(cfg, checkpoints)
    _ = args.world_size  # sets up the process group now: ZeRO-3 partitions while the model loads
    model, tokenizer = build_model(cfg)
    if _is_main():
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    report_tasks(out, tasks)

    signals = CheckpointOnSignal()
    callbacks = [signals, MetricsCallback(os.path.join(out, "metrics.jsonl"))]
    if _is_main():
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=os.path.join(out, "tensorboard"))))
    trainer = make_trainer(cfg, model, tokenizer, args, train_ds, eval_ds, callbacks)
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
