"""Loading a base model the way a config describes it (dtype, 4/8-bit quantization, task)."""

from __future__ import annotations

import logging
import os

import torch

from .config import ModelConfig
from .errors import ConfigError, TensorftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# DeepSpeed logs this at warning level whenever it is imported on a machine without a GPU, and
# accelerate imports it from every save_pretrained and Trainer: a single-process CPU run or
# `tensorft merge` printed it though nothing there uses DeepSpeed.
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def quiet_deepspeed_cpu_notice() -> None:
    """Drop that one DeepSpeed log line (its logger, "DeepSpeed", exists before deepspeed is
    imported: logging returns the same object to it); every other DeepSpeed message stays."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DropDeepSpeedCpuNotice())


quiet_deepspeed_cpu_notice()  # imported by every path that loads a model (train, merge, export, evaluation)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def quantization_config(model_cfg: ModelConfig):
    """The bitsandbytes config for ``model.quantization`` (None for ``none``)."""
    from transformers import BitsAndBytesConfig

    q = model_cfg.quantization
    if q == "none":
        return None
    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q,  # nf4 | fp4
        bnb_4bit_compute_dtype=torch_dtype(model_cfg.dtype),
        bnb_4bit_use_double_quant=model_cfg.double_quant,  # on by default, as QLoRA
    )


def auto_class(model_cfg: ModelConfig):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
    }[model_cfg.task]


def _task_kwargs(model_cfg: ModelConfig) -> dict:
    if model_cfg.task == "seq-cls" and model_cfg.num_labels is not None:
        return {"num_labels": model_cfg.num_labels}
    return {}


def check_source(name_or_path: str) -> None:
    if not name_or_path:
        raise ConfigError("model.name_or_path: missing; name a Hugging Face model id or a local directory")
    # A path (not a hub id like "org/name") must exist before anything else starts.
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ConfigError(f"model.name_or_path: {name_or_path} is not a directory ({_where(name_or_path)})")


def _where(path: str) -> str:
    """Where a relative path was looked for: the working directory, never the config's."""
    full = os.path.abspath(os.path.expanduser(path))
    return f"looked for {full}" + ("" if os.path.isabs(os.path.expanduser(path)) else ", relative to the working directory")


def _cannot_load(what: str, name: str, e: Exception) -> TensorftError:
    """One line naming the key and where ``name`` was looked for: a local directory (resolved)
    or, failing that, a hub id (often: offline, or a mistyped path taken for an id)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if os.path.isdir(os.path.expanduser(name)):
        return TensorftError(f"model.name_or_path: cannot load the {what} of {name}: {first}")
    return TensorftError(f"model.name_or_path: {name}: no such directory ({_where(name)}), and as a hub id: {first}")


def load_tokenizer(model_cfg: ModelConfig):
    """The base model's tokenizer (a pad token set to EOS when it has none)."""
    from transformers import AutoTokenizer

    check_source(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # hub errors are OSErrors; a directory without tokenizer files, ValueError
        raise _cannot_load("tokenizer", model_cfg.name_or_path, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_cfg: ModelConfig, **hf_kwargs):
    """The base model for ``model_cfg`` (weights loaded, quantized if asked)."""
    check_source(model_cfg.name_or_path)
    kwargs = dict(dtype=torch_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code)
    qcfg = quantization_config(model_cfg)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    kwargs.update(_task_kwargs(model_cfg))
    kwargs.update(hf_kwargs)
    try:
        return auto_class(model_cfg).from_pretrained(model_cfg.name_or_path, **kwargs)
    except OSError as e:
        raise _cannot_load("weights", model_cfg.name_or_path, e) from None


def build_meta_model(model_cfg: ModelConfig):
    """The model's modules on the meta device from its config.json alone (no weights read)."""
    import transformers

    check_source(model_cfg.name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code, **_task_kwargs(model_cfg)
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = model_cfg.name_or_path
        where = "" if os.path.isdir(os.path.expanduser(name)) else f" (no such directory: {_where(name)}; as a hub id)"
        raise TensorftError(f"model.name_or_path: cannot read the config of {name}{where}: {first}") from None
    with torch.device("meta"):
        return auto_class(model_cfg).from_config(
            config, dtype=torch_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        )
