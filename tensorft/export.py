"""Export to a standard PEFT LoRA adapter, and merge into a dense model directory.

Every mergeable kind gives each adapted layer an exact LoRA pair (``SiteAdapter.lora_factors``:
``dW = s B A`` with rank r), so the PEFT export is lossless: PEFT computes
``lora_B(lora_A(x)) * lora_alpha / r`` and we write ``lora_alpha = s * r``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import TensorftError
from .model import adapter_parameters, merge_and_unload, root_of, unwrap
from .registry import adapter_kind
from .saving import describe_base, new_output_dir, save_safetensors

PEFT_PREFIX = "base_model.model."


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    # CP's o/down factors ARE the shared A; safetensors refuses tensors sharing storage.
    return t.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()


def peft_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """PEFT-named tensors and the one ``lora_alpha`` they need."""
    root = root_of(model)
    rank = root.config.rank
    tensors, scales = {}, set()
    for name, layer in root.layers.items():
        A, B, scale = layer.adapter.lora_factors()
        if A.shape[0] != rank:
            raise TensorftError(f"{name}: update has rank {A.shape[0]}, expected {rank}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _own_copy(A)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _own_copy(B)
        scales.add(float(scale))
    if len(scales) > 1:
        # PEFT has one lora_alpha per adapter (rank_pattern aside): fold the scale into B.
        for name, layer in root.layers.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] *= float(layer.adapter.lora_factors()[2])
        scales = {1.0}
    saved = adapter_parameters(model)
    for module_name in root.config.modules_to_save:
        for pname, p in saved.items():
            if pname.startswith(module_name + "."):
                tensors[PEFT_PREFIX + pname] = _own_copy(p)
    return tensors, scales.pop() * rank


def export_peft(model: nn.Module, out_dir: str) -> str:
    """Write ``out_dir`` as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it)."""
    from peft import LoraConfig

    model = unwrap(model)
    root = root_of(model)
    root.kind.ensure_exportable()
    tensors, lora_alpha = peft_tensors(model)
    base_name, model_section = describe_base(model)
    peft_config = LoraConfig(
        r=root.config.rank,
        lora_alpha=lora_alpha,
        lora_dropout=root.config.dropout,
        # Full module names: exactly the layers tensorft adapted, nothing else.
        target_modules=sorted(root.layers),
        modules_to_save=list(root.config.modules_to_save) or None,
        bias="none",
        task_type="SEQ_CLS" if model_section["task"] == "seq-cls" else "CAUSAL_LM",
        base_model_name_or_path=base_name or None,
    )
    with new_output_dir(out_dir) as tmp:
        peft_config.save_pretrained(tmp)
        save_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors, {"format": "pt"})
    return out_dir


def merge_to_dir(adapter_dir: str, out_dir: str, **model_kwargs) -> str:
    """Load base + adapter in full precision, merge, and save a dense HF model directory."""
    from .saving import from_pretrained, read_adapter_config

    adapter, model_cfg, _ = read_adapter_config(adapter_dir)
    adapter_kind(adapter.kind).ensure_mergeable()  # before any weight is read
    model_kwargs.setdefault("quantization", "none")  # merge into full-precision weights
    with new_output_dir(out_dir) as tmp:
        model = from_pretrained(adapter_dir, **model_kwargs)
        model = merge_and_unload(model)
        model.save_pretrained(tmp)
        _copy_tokenizer(model_cfg.name_or_path, tmp)
    return out_dir


def _copy_tokenizer(base: str, out_dir: str) -> None:
    if not base or not os.path.isdir(base):
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError):
        pass  # a base without a tokenizer (tiny test models) merges all the same
