"""YAML configs: a few dataclasses, validated on load.

Every key a user can write is a dataclass field here (or a field of the adapter kind's own
options class), so an unknown or mistyped key is reported with its full dotted path. ``--set
a.b=value`` overrides any key; the value is parsed as YAML (``4`` is an int, ``[q, v]`` a list).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import ConfigError

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal-lm", "seq-cls")


@dataclass
class ModelConfig:
    # A hub id or a directory; a relative path is relative to the working directory (as every
    # path a config names: data files, output_dir, init_from, experts; never the config file's).
    name_or_path: str = ""
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    # 4-bit bases: QLoRA's double quantization (the blockwise scales quantized too, ~0.37 bit
    # per weight saved; QLoRA's and PEFT's recipe). Their compute dtype is model.dtype.
    double_quant: bool = True
    # What the base's weights are loaded and kept in (a 4/8-bit base: the dtype its matmuls
    # compute in). Adapter parameters are float32 whatever it is. train.bf16 is the other knob.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # causal-lm: AutoModelForCausalLM; seq-cls: AutoModelForSequenceClassification (encoders).
    task: Literal["causal-lm", "seq-cls"] = "causal-lm"
    num_labels: int | None = None
    trust_remote_code: bool = False


@dataclass
class AdapterConfig:
    """Keys every kind shares; a kind's own keys (e.g. ``tt_shapes``) go to ``options``."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    # Whole modules trained and saved next to the adapter (a classification head, say).
    modules_to_save: list[str] = field(default_factory=list)
    # The adapter's initialization seed. null (default): train.seed in a training config (one
    # seed for the whole run), 0 through the Python API; set it only to vary the
    # initialization alone.
    seed: int | None = None
    # Learning-rate multiplier for every adapter parameter; null: the kind's own defaults
    # (tensorft/optim.py), which make the LoRA learning rate of a config work for every kind.
    lr_scale: float | None = None
    # Task names in task-id order (multi-task training fills it; saved with the adapter so
    # users name tasks, never integers).
    tasks: list[str] = field(default_factory=list)
    # Few-shot adaptation of a trained task-routed adapter (this directory) to the config's one
    # new task: its kind, rank, targets and tasks come from there, plus a routing row for the
    # new task. fewshot (null: full) says what trains: full (everything), routing (only the
    # routing logits, -z) or modules (the experts, routing frozen at the mean of the old rows, -mu).
    init_from: str | None = None
    fewshot: Literal["full", "routing", "modules"] | None = None
    options: Any = None  # the kind's options dataclass instance, filled by ``parse_adapter``

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        if self.options is not None:
            out.update(dataclasses.asdict(self.options))
        return out

    @property
    def routed(self) -> bool:
        """A task-routed kind: its update depends on the row's task id."""
        return hasattr(self.options, "n_tasks")

    def task_id(self, task: str | int | None) -> int | None:
        """The id of ``task`` for a task-routed kind (None for a static kind given no task).

        Tasks are named by ``tasks``; an integer id (or its digits) is accepted only when the
        adapter has no names (a routed adapter trained through the Python API)."""
        if not self.routed:
            if task is not None:
                raise ConfigError(f"kind {self.kind} is not task-routed; drop the task ({task})")
            return None
        if task is None:
            raise ConfigError(f"adapter kind {self.kind!r} is task-routed: name a task ({self.known_tasks()})")
        if self.tasks:
            if task not in self.tasks:
                raise ConfigError(f"unknown task {task!r} ({self.known_tasks()})")
            return self.tasks.index(task)
        if str(task).isdigit() and int(task) < self.options.n_tasks:
            return int(task)
        raise ConfigError(f"unknown task {task!r} ({self.known_tasks()})")

    def known_tasks(self) -> str:
        if self.tasks:
            return "tasks: " + ", ".join(self.tasks)
        return f"this adapter has no task names; its task ids are 0..{self.options.n_tasks - 1}"


DataFormat = Literal["alpaca", "messages", "prompt-completion", "text", "preference", "multiple-choice", "classification"]
# The fields each data.format reads (what data.columns may map); tensorft/data.py reads them.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "multiple-choice": ("prompt", "options", "gold"),
    "classification": ("text", "label"),
}


@dataclass
class TaskDataConfig:
    """One task of a multi-task config (``data.tasks.<name>``)."""

    train: str = ""
    eval: str | None = None
    format: DataFormat | None = None  # null: data.format
    columns: dict[str, str] | None = None  # null: data.columns


@dataclass
class DataConfig:
    # A local .json / .jsonl / .csv / .parquet file, or a hub dataset id ("name" or "name:split").
    train: str = ""
    eval: str | None = None
    format: DataFormat = "alpaca"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None  # multi-task: per task
    # Where the format's fields come from when the data names them otherwise, e.g. the orca
    # DPO pairs' question column: {prompt: input}. Keys are the format's fields.
    columns: dict[str, str] = field(default_factory=dict)
    # Multi-task (instead of ``train``): task name -> its data; the order gives the task ids.
    tasks: dict[str, TaskDataConfig] = field(default_factory=dict)
    # How the training set draws from the tasks: proportional (every row once), equal (the
    # same number of rows per task), temperature (p_i ~ n_i^(1/T)); sampled with the seed.
    mixing: Literal["proportional", "equal", "temperature"] = "proportional"
    mixing_temperature: float = 2.0
    max_per_task: int | None = None  # the first N rows of each task, applied before mixing


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo"] = "sft"
    output_dir: str = "runs/tensorft"
    max_steps: int = -1  # > 0 wins over epochs
    epochs: float = 1.0
    batch_size: int = 4  # per device
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    packing: bool = False
    completion_only_loss: bool = True  # SFT: loss on the completion only
    dpo_beta: float = 0.1
    # The run's one seed: data order and mixing, dropout and routing noise, and the adapter's
    # initialization (unless adapter.seed is set).
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int | None = None
    gradient_checkpointing: bool = False
    # bfloat16 autocast of the training forward and backward (the Trainer's bf16; DeepSpeed's
    # bf16 section): the compute precision. model.dtype is what the weights are stored in.
    bf16: bool = False


@dataclass
class DistributedConfig:
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    zero_stage: int = 2  # deepspeed: 2 or 3
    deepspeed_config: str | None = None  # a DeepSpeed JSON; default configs/deepspeed/zero{stage}.json


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["adapter"] = self.adapter.to_dict()
        return out


# --------------------------------------------------------------------------- generic parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # named sections, e.g. data.tasks
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; take numbers as people write them.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: cannot check values of type {_type_name(tp)}")


def from_dict(cls, data, prefix: str, skip: tuple[str, ...] = ()):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], where)
    return cls(**kwargs)


def parse_adapter(data: dict | None, prefix: str = "adapter") -> AdapterConfig:
    """Common adapter keys plus the kind's own keys, each checked."""
    from .registry import adapter_kind

    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of adapter keys, got {data!r}")
    data = dict(data or {})
    common = {f.name for f in dataclasses.fields(AdapterConfig)} - {"options"}
    kind_name = data.get("kind", AdapterConfig.kind)
    if not isinstance(kind_name, str):
        raise ConfigError(f"{prefix}.kind: expected a string, got {kind_name!r}")
    kind = adapter_kind(kind_name)
    own = {k: v for k, v in data.items() if k not in common}
    known_own = [f.name for f in dataclasses.fields(kind.options_cls)]
    for key in own:
        if key not in known_own:
            raise ConfigError(
                f"{prefix}.{key}: unknown key for kind {kind_name!r} "
                f"(known: {', '.join(sorted(common | set(known_own)))})"
            )
    cfg = from_dict(AdapterConfig, {k: v for k, v in data.items() if k in common}, prefix, skip=("options",))
    cfg.options = from_dict(kind.options_cls, own, prefix)
    if cfg.rank < 1:
        raise ConfigError(f"{prefix}.rank: must be at least 1, got {cfg.rank}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"{prefix}.dropout: must be in [0, 1), got {cfg.dropout}")
    if not cfg.alpha > 0:  # the scale is alpha / rank: zero or negative silently breaks training
        raise ConfigError(f"{prefix}.alpha: must be positive, got {cfg.alpha}")
    if cfg.lr_scale is not None and not cfg.lr_scale > 0:
        raise ConfigError(f"{prefix}.lr_scale: must be positive (or null for the kind's defaults), got {cfg.lr_scale}")
    if not cfg.targets:
        raise ConfigError(f"{prefix}.targets: empty list; name at least one module, e.g. [q_proj, v_proj]")
    kind.check_options(cfg, prefix)
    return cfg


# --------------------------------------------------------------------------- files and overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to nested ``data`` (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model:, adapter:, ...)")
    return data


def parse_config(data: dict) -> Config:
    known = [f.name for f in dataclasses.fields(Config)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(known)})")
    cfg = Config(
        model=from_dict(ModelConfig, data.get("model"), "model"),
        adapter=parse_adapter(data.get("adapter")),
        data=from_dict(DataConfig, data.get("data"), "data"),
        train=from_dict(TrainConfig, data.get("train"), "train"),
        distributed=from_dict(DistributedConfig, data.get("distributed"), "distributed"),
    )
    _check_values(cfg)
    _check_task_names(cfg, data.get("adapter") or {})
    if cfg.adapter.seed is None:
        cfg.adapter.seed = cfg.train.seed  # one seed for the run; adapter.seed only overrides it
    return cfg


def _check_values(cfg: Config) -> None:
    t = cfg.train
    positive = {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "max_length": t.max_length,
                "logging_steps": t.logging_steps, "save_steps": t.save_steps, "save_total_limit": t.save_total_limit}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise ConfigError("train.max_steps / train.epochs: nothing to train (set max_steps > 0 or epochs > 0)")
    if cfg.distributed.zero_stage not in (2, 3):
        raise ConfigError(f"distributed.zero_stage: must be 2 or 3, got {cfg.distributed.zero_stage}")
    if not cfg.model.double_quant and cfg.model.quantization not in ("nf4", "fp4"):
        raise ConfigError(
            f"model.double_quant: applies to 4-bit bases (nf4, fp4) only; model.quantization is {cfg.model.quantization}"
        )
    _check_precision(cfg)
    _check_data(cfg)


def _check_precision(cfg: Config) -> None:
    """model.dtype says what the base's weights are stored in, train.bf16 whether training
    computes in bfloat16 (autocast): refuse the combinations where one contradicts the other."""
    if not cfg.train.bf16:
        return
    dtype = cfg.model.dtype
    if dtype == "float16":
        raise ConfigError(
            "train.bf16: true computes in bfloat16, but model.dtype: float16 stores the base in float16; "
            "set model.dtype: bfloat16 (or float32), or train.bf16: false"
        )
    if cfg.distributed.strategy == "deepspeed" and cfg.model.quantization == "none" and dtype != "bfloat16":
        raise ConfigError(
            f"train.bf16: DeepSpeed's bf16 casts the whole base to bfloat16, but model.dtype is {dtype}; "
            "set model.dtype: bfloat16 (what DeepSpeed trains in), or train.bf16: false"
        )


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not d.tasks:
        _check_format(cfg, d.format, d.columns, "data")
        return
    _check_tasks(cfg)
    for name, task in d.tasks.items():
        _check_format(cfg, task.format, task.columns, f"data.tasks.{name}")


def _check_format(cfg: Config, fmt: str, columns: dict, key: str) -> None:
    """The format suits the objective and ``columns`` names its fields (``key``: where they are)."""
    fmt_key = f"{key}.format"
    for name, column in columns.items():
        if name not in FORMAT_FIELDS[fmt]:
            fields = ", ".join(FORMAT_FIELDS[fmt])
            raise ConfigError(f"{key}.columns.{name}: not a field of {fmt_key} {fmt} (fields: {fields})")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{key}.columns.{name}: expected a column name, got {column!r}")
    if cfg.train.objective == "dpo" and fmt != "preference":
        raise ConfigError(f"{fmt_key}: dpo needs preference data (prompt, chosen, rejected), got {fmt!r}")
    if cfg.train.objective == "sft" and fmt == "preference":
        raise ConfigError(f"{fmt_key}: preference data is for train.objective: dpo")
    model_given = bool(cfg.model.name_or_path)  # else it comes with the adapter (ttmoe's experts), checked there
    if model_given and (cfg.model.task == "seq-cls") != (fmt == "classification"):  # a head's labels, or tokens
        raise ConfigError(
            f"{fmt_key}: model.task: seq-cls trains on classification rows (text, label), got {fmt!r}"
            if cfg.model.task == "seq-cls" else f"{fmt_key}: classification rows need model.task: seq-cls"
        )
    if fmt == "classification" and cfg.train.objective != "sft":
        raise ConfigError(f"{fmt_key}: classification rows train with train.objective: sft (cross-entropy on the label)")


def _check_tasks(cfg: Config) -> None:
    """A multi-task config; fills each task's format and columns from data.format / data.columns."""
    d = cfg.data
    for key, value in (("train", d.train), ("eval", d.eval), ("max_train_samples", d.max_train_samples)):
        if value:
            hint = "data.max_per_task caps each task" if key == "max_train_samples" else f"give each task its own {key}"
            raise ConfigError(f"data.{key}: not with data.tasks ({hint})")
    if d.mixing_temperature <= 0:
        raise ConfigError(f"data.mixing_temperature: must be positive, got {d.mixing_temperature}")
    if d.max_per_task is not None and d.max_per_task < 1:
        raise ConfigError(f"data.max_per_task: must be at least 1, got {d.max_per_task}")
    if cfg.train.packing:
        raise ConfigError("train.packing: not with data.tasks (a packed row would mix tasks); set train.packing: false")
    for name, task in d.tasks.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"data.tasks.{name}: a task name is letters, digits, '_', '-' or '.'")
        if not task.train:
            raise ConfigError(f"data.tasks.{name}.train: missing; name the task's training data")
        task.format = task.format or d.format
        task.columns = d.columns if task.columns is None else task.columns


def _check_task_names(cfg: Config, adapter: dict) -> None:
    """The adapter's task count and names come from data.tasks; refuse a user value that differs."""
    names = list(cfg.data.tasks)
    if not names:
        return
    given = adapter.get("n_tasks")
    if given is not None and given != len(names):
        raise ConfigError(
            f"adapter.n_tasks: {given}, but data.tasks lists {len(names)} tasks "
            "(leave it out: it is set from data.tasks)"
        )
    if adapter.get("tasks") and list(adapter["tasks"]) != names:
        raise ConfigError(f"adapter.tasks: {adapter['tasks']} differs from the names of data.tasks {names}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config.

    Every relative path in it (model.name_or_path, data files, train.output_dir,
    adapter.init_from, ...) is relative to the working directory, as a path on the command line
    is: never to the config file's directory. Errors print the resolved path."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse_config(data)
