"""Optimizer parameter groups with each adapter kind's own learning-rate scales.

The ``lr`` a user writes is LoRA's learning rate. Kinds whose factors learn at a different
pace under Adam (CP's order-one C factors, TT's cores, routing logits) declare a multiplier per
parameter group (:meth:`AdapterKind.lr_scales`), so that swapping ``adapter.kind`` in a
working LoRA config needs no new sweep. The trainers build their optimizer from these groups;
code with its own loop does the same::

    opt = torch.optim.AdamW(tensorft.optimizer_groups(model, lr=2e-4, weight_decay=0.0))
"""

from __future__ import annotations

import torch.nn as nn

from .model import adapter_parameters, root_of, unwrap


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Torch optimizer param groups for every trainable tensorft parameter.

    Each group carries ``lr`` (= ``lr`` x the kind's scale for that group), ``weight_decay``
    and a ``name``; parameters not claimed by the kind get ``lr`` unchanged. Frozen-but-saved
    parameters (``requires_grad`` False) are left out.
    """
    model = unwrap(model)
    root = root_of(model)
    named = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    scales = root.kind.lr_scales(model, named)  # {name: multiplier}; absent -> 1.0
    override = root.config.lr_scale
    by_scale: dict[float, list[str]] = {}
    for name in named:
        scale = scales.get(name, 1.0) if override is None else override
        by_scale.setdefault(float(scale), []).append(name)
    groups = []
    for scale, names in sorted(by_scale.items()):
        groups.append(
            {
                "params": [named[n] for n in names],
                "lr": lr * scale,
                "weight_decay": weight_decay,
                "name": f"tensorft lr x{scale:g}",
                "lr_scale": scale,
            }
        )
    return groups
