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
import signal
import sys

import yaml

from .config import Config, load_config
from .errors import ConfigError, TensorftError, report_error

FINISHED = "FINISHED"  # written last: the run is done and output_dir must not be reused silently


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(cfg: Config) -> None:
    out = cfg.train.output_dir
    where = f" ({os.path.abspath(out)})" if not os.path.isabs(out) else ""  # relative: to the working directory
    if os.path.isfile(os.path.join(out, FINISHED)):
        raise TensorftError(
            f"train.output_dir: {out}{where} already holds a finished run; choose another output_dir or remove it"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise TensorftError(f"train.output_dir: {out}{where} exists and is not a directory")


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
    if d.tasks and cfg.adapter.tasks and cfg.adapter.tasks != list(d.tasks):
        return with_adapter_task_ids(cfg, *load_tasks(d, cfg.train.seed))
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
    from .registry import adapter_kind

    own = getattr(adapter_kind(cfg.adapter.kind), "resolve_config", None)
    if own is not None:  # a kind whose tasks come from elsewhere (ttmoe: its experts)
        return own(cfg)
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


def with_adapter_task_ids(cfg: Config, train, evaluation, tasks):
    """The adapter orders its tasks otherwise than data.tasks (ttmoe: its experts' order, the
    data naming some of them): a row's id becomes its task's index in ``adapter.tasks``."""
    ids = [cfg.adapter.tasks.index(name) for name in cfg.data.tasks]

    def relabel(ds, new_id=None):
        column = [new_id] * len(ds) if new_id is not None else [ids[i] for i in ds["task_ids"]]
        return ds.remove_columns("task_ids").add_column("task_ids", column)

    for name, info in tasks["tasks"].items():
        info["id"] = cfg.adapter.tasks.index(name)
    evaluation = evaluation and {name: relabel(ds, cfg.adapter.tasks.index(name)) for name, ds in evaluation.items()}
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
    if strategy == "fsdp" and cfg.model.quantization == "int8":
        # 4-bit layers keep their quantization state on the layer and restore it on the plain
        # parameter FSDP2 hands them; 8-bit weights keep their scales on the parameter object
        # only, and FSDP2 replaces it (the forward then fails with "no attribute 'CB'").
        raise ConfigError(
            "model.quantization: int8 bases cannot be sharded by FSDP2 (bitsandbytes keeps 8-bit scales on "
            "the parameter, which FSDP2 replaces); use nf4 or fp4, or deepspeed zero_stage: 3, or ddp"
        )
    if strategy == "deepspeed" and cfg.train.bf16:
        import torch

        if not torch.cuda.is_available():
            # transformers refuses bf16 without a GPU unless use_cpu is set, and use_cpu would
            # bypass DeepSpeed (each process alone): no combination trains DeepSpeed bf16 here
            raise ConfigError(
                "train.bf16: DeepSpeed with bf16 needs a GPU, and this machine has none; "
                "set train.bf16: false to run this config on CPU"
            )
    if strategy in ("ddp", "fsdp", "deepspeed") and "RANK" not in os.environ:
        # plain `python` would train one process and say nothing (ddp) or fail late (the others)
        raise ConfigError(
            f"distributed.strategy: {strategy} needs a distributed launch (torchrun --nproc_per_node N, or deepspeed); "
            "plain python runs one process: use strategy none"
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
    from .registry import adapter_kind

    if getattr(adapter_kind(cfg.adapter.kind), "router_only_training", False):
        # ttmoe: the router trains on an aux loss, which is not in the model's outputs, so DDP's
        # search for unused parameters from the outputs would mark it unused (then "ready twice")
        common["ddp_find_unused_parameters"] = False
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


def shipped_deepspeed_config(path: str) -> str:
    """``path`` itself when it names a file; else a DeepSpeed JSON shipped with the package
    (``tensorft/configs/deepspeed``: ``zero2``, ``zero3``, with or without ``.json``)."""
    if os.path.exists(path) or os.sep in path:
        return path
    name = path if path.endswith(".json") else path + ".json"
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "deepspeed", name)
    return shipped if os.path.isfile(shipped) else path


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON with its batch, clipping and precision keys filled from the config.

    Concrete values rather than "auto": the Trainer fills "auto" from its own idea of the
    world size, which on CPU is not DeepSpeed's."""
    import json

    path = shipped_deepspeed_config(cfg.distributed.deepspeed_config or f"zero{cfg.distributed.zero_stage}")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: {path} not found (looked for {os.path.abspath(path)})") from None
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


def build_model(cfg: Config, tokenizer=None):
    from .loading import load_base_model, load_tokenizer
    from .model import attach

    tokenizer = tokenizer or load_tokenizer(cfg.model)
    # Weights the checkpoint lacks (a new classification head) are drawn from the global RNG
    # while loading: seeded by train.seed, as the Trainer seeds everything after.
    from transformers import set_seed

    set_seed(cfg.train.seed)
    model = load_base_model(cfg.model)
    if cfg.model.task == "seq-cls":
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder heads pool at the last non-pad token
    attach(model, cfg.adapter)
    if cfg.adapter.init_from:
        start_fewshot(model)
    # Activation checkpointing is non-reentrant (transformers 5's default): a checkpointed block's
    # parameters get their gradients without the block's input requiring one, so no
    # enable_input_require_grads(): it made backward compute the gradient of the embeddings'
    # output through the first block, which nothing uses (9-13% of a 7B block's step).
    if cfg.distributed.strategy == "fsdp":
        from .distributed import will_shard_itself

        will_shard_itself(model)  # sharded once the trainer is built (see run)
    return model, tokenizer


def make_trainer(cfg: Config, model, tokenizer, args, train_ds, eval_ds, callbacks):
    from .trainers import TensorftDPOTrainer, TensorftSFTTrainer

    trainer_cls = TensorftDPOTrainer if cfg.train.objective == "dpo" else TensorftSFTTrainer
    if cfg.model.task == "seq-cls":  # trl's trainers are for language modelling: a plain Trainer
        from .trainers import TensorftClassificationTrainer, tokenize_classification

        train_ds, eval_ds = tokenize_classification(tokenizer, cfg.train.max_length, train_ds, eval_ds)
        trainer_cls = TensorftClassificationTrainer
    sharded_later = {}
    if cfg.distributed.strategy == "fsdp" and trainer_cls is TensorftDPOTrainer:
        sharded_later["defer_reference"] = True
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
        **sharded_later,  # DPO's reference pass waits for the sharded model (run)
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


def report_accuracy(out: str, step: int, accuracy: dict[str, float]) -> None:
    """The final held-out accuracies: printed, and kept in ``eval_results.json``."""
    from .saving import write_json

    if not _is_main():
        return
    named = ", ".join(f"{k.removeprefix('eval_').removesuffix('accuracy').rstrip('_') or 'eval'} {v:.4f}"
                      for k, v in accuracy.items())
    print(f"tensorft: held-out accuracy (rank classification): {named}", file=sys.stderr)
    write_json(os.path.join(out, "eval_results.json"), {"step": step, **accuracy})


# Keys a resumed run may change: how long it trains, how often it logs, saves and evaluates,
# and where the run directory now is.
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.save_steps", "train.logging_steps",
                  "train.eval_steps", "train.save_total_limit", "train.output_dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumed_config(cfg: Config) -> None:
    """A run that would resume from output_dir's checkpoints must be the run that wrote them:
    another config is refused before config.yaml (or anything else) is overwritten. Called once
    the model and trainer are built, when ``cfg`` is complete as config.yaml records it."""
    from .distributed import decided_by_main

    out = cfg.train.output_dir
    differing = decided_by_main(lambda: _differences_from_saved_run(cfg))  # every rank refuses, or none
    if differing:
        shown = "; ".join(f"{key}: {there!r} there, {now!r} now" for key, there, now in differing)
        raise TensorftError(
            f"train.output_dir: {out} holds an unfinished run of another config ({shown}); rerun with that "
            "config to resume it, or choose another output_dir"
        )


def _differences_from_saved_run(cfg: Config) -> list[tuple]:
    from .trainers import newest_complete_checkpoint

    out = cfg.train.output_dir
    saved_path = os.path.join(out, "config.yaml")
    if not os.path.isfile(saved_path) or newest_complete_checkpoint(os.path.join(out, "checkpoints")) is None:
        return []
    with open(saved_path, encoding="utf-8") as f:
        saved = _flat(yaml.safe_load(f) or {})
    now = _flat(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))  # as config.yaml would hold it
    return [
        (key, saved[key], value)
        for key, value in now.items()
        if key not in RESUMABLE_KEYS and key in saved and saved[key] != value
    ]


def check_chat_template(cfg: Config, tokenizer, *datasets) -> None:
    """Message rows (data.format messages, or message lists) are rendered with the tokenizer's
    chat template; without one trl fails deep inside, after the model has loaded."""
    if getattr(tokenizer, "chat_template", None):
        return
    for ds in datasets:
        for one in (ds.values() if isinstance(ds, dict) else [ds]):
            if one is None or len(one) == 0:
                continue
            row = one[0]
            if any(isinstance(row.get(k), list) for k in ("prompt", "completion", "chosen", "rejected")):
                raise ConfigError(
                    f"data.format: {cfg.data.format}: these rows are chat messages, but the tokenizer of "
                    f"{cfg.model.name_or_path} has no chat template; use a chat model's tokenizer, or "
                    "plain-string rows (prompt-completion, alpaca, text)"
                )


def report_lengths(cfg: Config, report: dict) -> None:
    """Rows the trainer truncated at ``train.max_length`` or dropped (nothing left to learn):
    trl does both without a word."""
    for name, (rows, truncated, dropped) in report.items():
        if truncated or dropped:
            which = "training" if name == "train" else f"evaluation ({name})"
            print(
                f"tensorft: train.max_length {cfg.train.max_length}: {truncated} of {rows} {which} rows are longer "
                f"and were truncated; {dropped} of them were dropped (no completion token left within the limit)",
                file=sys.stderr,
            )


def report_final_eval(metrics: dict) -> None:
    if _is_main():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("loss", "accuracy")))
        print(f"tensorft: evaluation at the end of training: {shown}", file=sys.stderr)


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
    from .loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)  # a wrong path or an offline hub id: one line, before the model
    check_chat_template(cfg, tokenizer, train_ds, eval_ds)
    from .choice_eval import choice_sets

    choices = choice_sets(cfg)  # multiple-choice eval rows: held-out accuracy by rank classification
    from .intuition import add_intuition, describe

    # T-REX: each example's intuition scores become a column the collator carries to the model
    # (before the distributed set-up: see add_intuition)
    train_ds, eval_ds, intuition = add_intuition(cfg, train_ds, eval_ds, tokenizer)
    out = cfg.train.output_dir
    checkpoints = os.path.join(out, "checkpoints")
    args = training_arguments(cfg, checkpoints)
    _ = args.world_size  # sets up the process group now: ZeRO-3 partitions while the model loads
    model, tokenizer = build_model(cfg, tokenizer)
    if intuition is not None:
        from .model import root_of

        root_of(model).kind.set_intuition(model, intuition.centroids)  # saved with the adapter
        if _is_main():
            print(describe(intuition), file=sys.stderr)

    callbacks = [MetricsCallback(os.path.join(out, "metrics.jsonl"))]
    # The trainer prepares (and may refuse) the data: only then is anything written to output_dir.
    trainer = make_trainer(cfg, model, tokenizer, args, train_ds, eval_ds, callbacks)
    trainer.choice_sets = choices
    check_resumed_config(cfg)  # every rank; the config as built, as the earlier run saved it
    signals = CheckpointOnSignal()  # from here on: handlers restored once training ends (below)
    trainer.add_callback(signals)
    if _is_main():
        report_lengths(cfg, getattr(trainer, "length_report", {}))
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=os.path.join(out, "tensorboard"))))
    report_tasks(out, tasks)
    if cfg.distributed.strategy == "fsdp":
        from .distributed import shard_fsdp2

        # After the trainer's set-up (trl fingerprints the model's plain tensors), before the
        # optimizer exists; after attach, so the adapter is sharded too.
        shard_fsdp2(model)
        if hasattr(trainer, "precompute_reference"):
            from .distributed import reshard

            trainer.precompute_reference()  # DPO: on the sharded model, on its device
            reshard(model)
    trainer.add_callback(RunInfoCallback(os.path.join(out, "run_info.json"), cfg.distributed.strategy))
    from .distributed import decided_by_main

    resume = decided_by_main(lambda: newest_complete_checkpoint(checkpoints))  # one answer for every rank
    if resume and _is_main():
        print(f"tensorft: resuming from {resume}", file=sys.stderr)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        signals.restore()  # also after a second Ctrl-C (KeyboardInterrupt)
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        print(f"tensorft: stopped by {name}; checkpoint written to {checkpoints} (rerun to resume)", file=sys.stderr)
        return 128 + signals.received
    if has_eval(cfg) and not cfg.train.eval_steps:  # data.eval without eval_steps: evaluated at the end
        report_final_eval(trainer.evaluate())  # every rank (collective); logged to metrics.jsonl
    trainer.save_model(out)  # every rank: a sharded adapter is gathered first
    if choices:
        report_accuracy(out, trainer.state.global_step, trainer.evaluate_choices())
    from .model import root_of

    report = getattr(root_of(model).kind, "after_training", None)
    if report is not None:  # ttmoe: router accuracy on held-out data (every rank: evaluation is collective)
        report(trainer, out)
    if _is_main():
        write_text(os.path.join(out, FINISHED), f"{trainer.state.global_step}\n")
        print(f"tensorft: adapter written to {os.path.abspath(out)}")
    return 0


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    from .cli import _Parser

    parser = _Parser(prog=prog, description="Fine-tune a model with a tensorft adapter.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def main(argv=None, prog: str = "train.py") -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from .extras import check_config

        check_config(cfg)  # deepspeed / bitsandbytes installed when the config needs them
        return run(cfg)
    except TensorftError as e:
        report_error(str(e))
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C during it
        print("tensorft: interrupted; no checkpoint written by this interruption", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:  # a bug: its traceback into torchrun's summary too (no-op elsewhere)
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
        raise
    finally:
        close_process_group()


def exit_process(code: int):
    """End a launched training process with ``code``. Under a distributed launch (WORLD_SIZE >
    1) the interpreter's own teardown is skipped: after a finished 2-rank ZeRO-3 run a rank
    still aborted there now and then (SIGABRT, "terminate called without an active exception":
    a native thread destroyed while joinable; 2 of 6 runs of the slurm ZeRO-3 test here, after
    the process group was already closed), and torchrun reported the complete run as failed.
    Everything the run writes is closed and synced before main returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter shutdown,
    a rank sometimes aborted after a finished run (a 2-rank ZeRO-3 run: 1 in 12 here, SIGABRT,
    "terminate called without an active exception": a collective backend's thread destroyed
    while still joinable), and torchrun reported the whole run failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
