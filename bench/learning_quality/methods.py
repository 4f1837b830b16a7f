"""The adapter methods the benchmark compares: a registry that later kinds join with one entry.

A method puts its adapter on a fresh copy of the base model and returns the optimizer's
parameter groups. PEFT LoRA is the reference a user would otherwise reach for; every tensorft
kind goes through ``tensorft.optimizer_groups``, which applies the kind's own per-parameter
learning-rate scales, so the benchmark measures the defaults a user actually gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_ALPHA = 16


@dataclass(frozen=True)
class Method:
    """An adapter to train: ``family`` "peft" (PEFT LoRA) or "tensorft" (any registered kind)."""

    name: str
    family: str
    kind: str
    rank: int
    options: dict = field(default_factory=dict)  # extra tensorft adapter keys (tt_shapes, ...)

    @property
    def label(self) -> str:
        """The kind as the report plots it: one line per label."""
        return "peft-lora" if self.family == "peft" else self.kind


def peft(rank: int) -> Method:
    return Method(f"peft-lora-r{rank}", "peft", "lora", rank)


def tensorft_kind(kind: str, rank: int, **options) -> Method:
    return Method(f"{kind}-r{rank}", "tensorft", kind, rank, dict(options))


# Ranks: LoRA 1/4/8; cp and tt span ~1/30 .. ~1/5 of LoRA r=8's parameters (460,800 on q,v of
# SmolLM2-135M). q,v counts (`--list` prints both targets): cp r=24 16,416 (1/28), r=64 43,776
# (1/10.5), r=128 87,552 (1/5.3); tt with its default shapes r=2 15,600 (1/30), r=4 52,320
# (1/8.8), r=5 78,600 (1/5.9). tt r=4 is the quick set's ~1/10 (r=5 is 1/5.9 with the default
# shapes; issue 8's r=5 used smaller hand-picked shapes).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *(peft(r) for r in (1, 4, 8)),
        *(tensorft_kind("lora", r) for r in (1, 4, 8)),
        *(tensorft_kind("cp", r) for r in (24, 64, 128)),
        *(tensorft_kind("tt", r) for r in (2, 4, 5)),
    )
}
QUICK_METHODS = ("peft-lora-r8", "peft-lora-r1", "cp-r64", "tt-r4")


def attach(model: nn.Module, method: Method, targets: list[str], lr: float, seed: int,
           weight_decay: float = 0.0) -> tuple[nn.Module, list[dict], int]:
    """Put ``method``'s adapter on ``model`` (in place for tensorft, wrapped for PEFT).

    Returns the model to train, the optimizer's parameter groups and the trainable-parameter
    count. ``seed`` fixes the adapter's initialisation.
    """
    import torch

    torch.manual_seed(seed)
    if method.family == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=method.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=list(targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": lr, "weight_decay": weight_decay}]
        return model, groups, sum(p.numel() for p in params)
    import tensorft

    tensorft.attach(model, {"kind": method.kind, "rank": method.rank, "targets": list(targets), "seed": seed,
                            **method.options})
    groups = tensorft.optimizer_groups(model, lr, weight_decay)
    return model, groups, tensorft.count_parameters(model)
