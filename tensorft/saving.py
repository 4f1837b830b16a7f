"""Saving and loading adapters; writing files atomically.

An adapter directory holds ``adapter_config.json`` (kind, hyper-parameters, the base model and
how it was loaded) and ``adapter_model.safetensors`` (the adapter parameters, named as in the
model). Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__
from .config import AdapterConfig, ModelConfig, from_dict, parse_adapter
from .errors import TensorftError
from .model import adapter_parameters, attach, root_of, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Keys of adapter_config.json that are not adapter hyper-parameters.
META_KEYS = ("tensorft_version", "base_model_name_or_path", "base_model_class", "model")


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it; put it straight back
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give: mkstemp / mkdtemp create 0600 / 0700,
    which would hide adapters and reports from colleagues on a shared cluster."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_path(path: str) -> None:
    """Flush a file's (or a directory's entries') data to the disk. A rename is atomic but not
    durable: after a node crash the new name can point at a file whose data never reached disk,
    unless the file is synced before the rename and its directory after."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root``, then every directory (deepest first). A file another
    rank renames or removes meanwhile (its own atomic write) is that rank's to sync."""
    for directory, _, files in sorted(os.walk(root), key=lambda entry: -entry[0].count(os.sep)):
        for path in [*(os.path.join(directory, name) for name in files), directory]:
            try:
                fsync_path(path)
            except FileNotFoundError:
                pass


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success, with its
    data and then the rename flushed to disk."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.fchmod(fd, umask_mode())
    os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def new_output_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    ``path`` must not exist yet (or be empty): finished outputs are never overwritten.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise TensorftError(f"{path}: already exists and is not empty; remove it or choose another output")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    os.chmod(tmp, umask_mode(directory=True))
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.replace(tmp, path)
        fsync_path(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, data: dict) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")


def save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# --------------------------------------------------------------------------- describing a model


def model_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def describe_base(model: nn.Module) -> tuple[str, dict]:
    """(base name or absolute path, the model section that reloads it)."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or ""
    if name and os.path.isdir(name):
        name = os.path.abspath(name)
    quant = "none"
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        if qc.get("load_in_4bit"):
            quant = qc.get("bnb_4bit_quant_type", "nf4")
        elif qc.get("load_in_8bit"):
            quant = "int8"
    dtype = str(getattr(model, "dtype", torch.float32)).replace("torch.", "")
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    is_cls = model_class(model).__name__.endswith("ForSequenceClassification")
    section = dataclasses.asdict(
        ModelConfig(
            name_or_path=name,
            quantization=quant,
            dtype=dtype,
            task="seq-cls" if is_cls else "causal-lm",
            num_labels=getattr(config, "num_labels", None) if is_cls else None,
            trust_remote_code=False,
        )
    )
    return name, section


# --------------------------------------------------------------------------- sharded adapters

# An adapter reaches save and load in one of three layouts: plain tensors (one process, DDP,
# ZeRO-2: every rank holds everything); DTensors (FSDP2: each rank a slice, ``full_tensor()``
# all-gathers); ZeRO-3 parameters (``p.data`` empty between forwards, ``GatheredParameters``
# all-gathers). Gathering is collective: every rank calls these functions, rank 0 writes.


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def _zero3_gathered(params: list[torch.Tensor], modifier_rank=None):
    if any(_is_zero3(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in params if _is_zero3(p)], modifier_rank=modifier_rank):
            yield
    else:
        yield


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full (unsharded) tensors on CPU. Collective under FSDP2 and ZeRO-3."""
    params = adapter_parameters(unwrap(model))
    out = {}
    with _zero3_gathered(list(params.values())):
        for name, p in params.items():
            t = p.full_tensor() if _is_dtensor(p) else p
            out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def load_full_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the adapter parameters, whatever their layout. Collective under
    FSDP2 and ZeRO-3; every rank passes the same tensors."""
    params = adapter_parameters(unwrap(model))
    with torch.no_grad(), _zero3_gathered(list(params.values()), modifier_rank=0):
        for name, p in params.items():
            full = tensors[name].to(dtype=p.dtype)
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                local = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                p.to_local().copy_(local.to_local())
            else:
                p.copy_(full.to(p.device))



# --------------------------------------------------------------------------- save / load


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in adapter_parameters(model).items()}


def save(model: nn.Module, out_dir: str, tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``.

    ``tensors``: the adapter's full weights when they are sharded (gathered by every rank with
    :func:`full_adapter_state`; only rank 0 then calls this)."""
    model = unwrap(model)
    root = root_of(model)
    name, model_section = describe_base(model)
    config = {
        "tensorft_version": __version__,
        **root.config.to_dict(),
        "base_model_name_or_path": name,
        "base_model_class": model_class(model).__name__,
        "model": model_section,
    }
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TensorftError(f"{out_dir}: exists and is not a directory; an adapter is saved into a directory")
    os.makedirs(out_dir, exist_ok=True)
    # Weights first, config last: a directory with a config always has matching weights.
    weights = tensors if tensors is not None else adapter_state_dict(model)
    save_safetensors(os.path.join(out_dir, WEIGHTS_NAME), weights, {"format": "pt"})
    write_json(os.path.join(out_dir, CONFIG_NAME), config)
    return out_dir


def read_adapter_config(adapter_dir: str) -> tuple[AdapterConfig, ModelConfig, dict]:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        where = "" if os.path.isabs(adapter_dir) else f" (looked in {os.path.abspath(adapter_dir)})"
        raise TensorftError(f"{adapter_dir}: no {CONFIG_NAME} here (not a tensorft adapter directory){where}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise TensorftError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if "peft_type" in raw:
        raise TensorftError(f"{path}: this is a PEFT adapter; load it with peft.PeftModel.from_pretrained")
    adapter = parse_adapter({k: v for k, v in raw.items() if k not in META_KEYS}, prefix=CONFIG_NAME)
    model_cfg = from_dict(ModelConfig, raw.get("model") or {}, f"{CONFIG_NAME}.model")
    if not model_cfg.name_or_path:
        model_cfg.name_or_path = raw.get("base_model_name_or_path", "")
    return adapter, model_cfg, raw


def load_adapter_weights(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Copy saved adapter parameters into a model that has the same adapters attached."""
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise TensorftError(f"{adapter_dir}: missing {WEIGHTS_NAME}")
    try:
        saved = load_file(path)
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise TensorftError(f"{path}: cannot read ({e})") from None
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise TensorftError(f"{path}: does not fit this model ({what}; {len(missing)} missing, {len(extra)} unexpected)")
    for name, p in params.items():
        expected = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape aside
        if tuple(saved[name].shape) != expected:
            raise TensorftError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model expects {expected}")
    load_full_adapter_state(model, saved)
    return model


def _hf_dtype(kwargs: dict) -> None:
    """Hugging Face's ways of naming the dtype (``dtype=torch.bfloat16``, the older
    ``torch_dtype=``, ``"auto"``) as the ``model.dtype`` key (a name); ``torch_dtype`` would
    otherwise reach ``from_pretrained`` beside the saved dtype and lose to it in silence."""
    if "torch_dtype" in kwargs:
        alias = kwargs.pop("torch_dtype")
        if kwargs.get("dtype") is not None and kwargs["dtype"] != alias:
            raise TensorftError(f"dtype={kwargs['dtype']} and torch_dtype={alias} disagree; give one")
        kwargs["dtype"] = alias
    if "dtype" not in kwargs:
        return
    value = kwargs["dtype"]
    if value is None or value == "auto":  # the dtype the adapter was trained with
        del kwargs["dtype"]
    elif isinstance(value, torch.dtype):
        kwargs["dtype"] = str(value).removeprefix("torch.")


def from_pretrained(adapter_dir: str, **model_kwargs) -> nn.Module:
    """Load the base model named in ``adapter_dir`` and attach the saved adapter.

    Keyword arguments that are ``model:`` config keys (``quantization``, ``dtype``,
    ``name_or_path``, ...) override the saved ones; the rest go to Hugging Face
    ``from_pretrained`` (``device_map=...``, say). ``dtype`` (or ``torch_dtype``) may be a
    ``torch.dtype``, a name or ``"auto"`` (the saved dtype).
    """
    from .loading import load_base_model

    adapter, model_cfg, _ = read_adapter_config(adapter_dir)
    _hf_dtype(model_kwargs)
    overrides = {k: model_kwargs.pop(k) for k in list(model_kwargs) if k in ModelConfig.__dataclass_fields__}
    if overrides:
        model_cfg = from_dict(ModelConfig, {**dataclasses.asdict(model_cfg), **overrides}, "model")
    model = load_base_model(model_cfg, **model_kwargs)
    attach(model, adapter)
    load_adapter_weights(model, adapter_dir)
    return model
