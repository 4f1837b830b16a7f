"""Export to a standard PEFT LoRA adapter, and merge into a dense model directory.

Every mergeable kind gives each adapted layer an exact LoRA pair (``SiteAdapter.lora_factors``:
``dW = s B A`` with rank r), so the PEFT export is lossless: PEFT computes
``lora_B(lora_A(x)) * lora_alpha / r`` and we write ``lora_alpha = s * r``. So does every
task-routed kind for one fixed task (``task_lora_factors``, evaluation routing): merge and
export take that task's name (``task=``, ``--task``) and are exact for it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import TensorftError
from .model import adapter_parameters, expert_id, fixed_task, merge_and_unload, root_of, unwrap
from .registry import adapter_kind
from .saving import describe_base, from_pretrained, new_output_dir, read_adapter_config, save_safetensors

PEFT_PREFIX = "base_model.model."


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    # CP's o/down factors ARE the shared A; safetensors refuses tensors sharing storage.
    return t.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()


def peft_tensors(model: nn.Module, task_id: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """PEFT-named tensors and the one ``lora_alpha`` they need (``task_id``: a task-routed
    kind's task, whose update is a rank-r LoRA)."""
    root = root_of(model)
    rank = root.config.rank
    factors = {name: layer.update_factors(task_id) for name, layer in root.layers.items()}
    tensors, scales = {}, {float(scale) for _, _, scale in factors.values()}
    # PEFT has one lora_alpha per adapter (rank_pattern aside): with several scales, fold them into B.
    fold = len(scales) > 1
    for name, (A, B, scale) in factors.items():
        if A.shape[0] != rank:
            raise TensorftError(f"{name}: update has rank {A.shape[0]}, expected {rank}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _own_copy(A)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _own_copy(B * float(scale) if fold else B)
    saved = adapter_parameters(model)
    for module_name in root.config.modules_to_save:
        for pname, p in saved.items():
            if pname.startswith(module_name + "."):
                tensors[PEFT_PREFIX + pname] = _own_copy(p)
    return tensors, (1.0 if fold else scales.pop()) * rank


def export_peft(model: nn.Module, out_dir: str, task: str | int | None = None, expert: str | None = None) -> str:
    """Write ``out_dir`` as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it).

    ``task``: for a task-routed kind, the task (a name from the adapter's ``tasks``) whose
    rank-r LoRA is exported, exactly; static kinds take none. ``expert``: for ttmoe, the
    expert (its name) exported alone, exactly as its own tt adapter would be."""
    from peft import LoraConfig

    model = unwrap(model)
    root = root_of(model)
    if expert is not None:
        task_id = expert_id(root.kind, expert)  # an expert's update: the layers' task_lora_factors
    else:
        task_id = fixed_task(root.config, root.kind, task, "export")
    with torch.no_grad():
        tensors, lora_alpha = peft_tensors(model, task_id)
    heads = {}
    if expert is not None and hasattr(root.kind, "expert_modules"):  # ttmoe seq-cls: the expert's own head
        heads = root.kind.expert_modules(model, task_id)
        tensors.update({PEFT_PREFIX + name: _own_copy(t) for name, t in heads.items()})
    to_save = list(root.config.modules_to_save) + sorted({name.rsplit(".", 1)[0] for name in heads})
    base_name, model_section = describe_base(model)
    peft_config = LoraConfig(
        r=root.config.rank,
        lora_alpha=lora_alpha,
        lora_dropout=root.config.dropout,
        # Full module names: exactly the layers tensorft adapted, nothing else.
        target_modules=sorted(root.layers),
        modules_to_save=to_save or None,
        bias="none",
        task_type="SEQ_CLS" if model_section["task"] == "seq-cls" else "CAUSAL_LM",
        base_model_name_or_path=base_name or None,
    )
    with new_output_dir(out_dir) as tmp:
        peft_config.save_pretrained(tmp)
        save_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors, {"format": "pt"})
    return out_dir


def check_fixed_task(adapter_dir: str, task: str | int | None, purpose: str, expert: str | None = None) -> None:
    """:func:`fixed_task` (or the ``expert``'s name) from ``adapter_config.json`` alone: bad
    input is reported before any weight is read."""
    adapter, _, _ = read_adapter_config(adapter_dir)
    kind = adapter_kind(adapter.kind)
    if expert is None:
        fixed_task(adapter, kind, task, purpose)
    else:
        expert_id(kind(adapter, None) if hasattr(kind, "expert_id") else kind, expert)


def export_dir(adapter_dir: str, out_dir: str, task: str | int | None = None, expert: str | None = None,
               **model_kwargs) -> str:
    """``tensorft export-peft``: load the adapter, export it (``task``, ``expert`` as in
    :func:`export_peft`; ``model_kwargs`` as :func:`tensorft.from_pretrained`'s, e.g.
    ``name_or_path=`` for a base that moved)."""
    check_fixed_task(adapter_dir, task, "export", expert)
    return export_peft(from_pretrained(adapter_dir, **model_kwargs), out_dir, task, expert)


def merge_to_dir(adapter_dir: str, out_dir: str, task: str | int | None = None, expert: str | None = None,
                 **model_kwargs) -> str:
    """Load base + adapter in full precision, merge (``task``: a task-routed kind's task;
    ``expert``: ttmoe's one expert), and save a dense HF model directory.

    Full precision: the base is reloaded without quantization in float32, whatever it was
    trained in (a 4-bit base's bfloat16 compute dtype, a bfloat16 base), so the update is
    added to float32 weights and written as float32. ``dtype=`` (a ``torch.dtype`` or a name,
    e.g. ``torch.bfloat16``; ``"auto"``: the dtype it was trained with) writes another;
    ``quantization=`` and the other :func:`tensorft.from_pretrained` keywords pass through."""
    check_fixed_task(adapter_dir, task, "merge", expert)
    _, model_cfg, _ = read_adapter_config(adapter_dir)
    model_kwargs.setdefault("quantization", "none")  # merge into full-precision weights
    if model_kwargs.get("dtype", model_kwargs.get("torch_dtype")) is None:  # "auto": as trained
        model_kwargs.pop("torch_dtype", None)
        model_kwargs["dtype"] = "float32"
    with new_output_dir(out_dir) as tmp:
        model = from_pretrained(adapter_dir, **model_kwargs)
        model = merge_and_unload(model, task, expert)
        model.save_pretrained(tmp)
        _copy_tokenizer(model_kwargs.get("name_or_path") or model_cfg.name_or_path, tmp)  # --base: the moved base
    return out_dir


def _copy_tokenizer(base: str, out_dir: str) -> None:
    if not base or not os.path.isdir(base):
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError):
        pass  # a base without a tokenizer (tiny test models) merges all the same
