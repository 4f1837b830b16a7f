"""LoRA (Hu et al. 2021), the yardstick: ``dW = B A``, ``s = alpha / r`` (methods.md section 1).

``A: r x d_in`` Kaiming-uniform, ``B: d_out x r`` zeros, so the model is unchanged at step 0.
Numerically the same as PEFT's LoRA for the same weights (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..registry import register_adapter
from ..topology import Site
from .base import AdapterKind, AdapterState, SiteAdapter, adapter_input, kaiming_uniform_, lora_update


class LoraSite(SiteAdapter):
    adds_into_base_output = True

    def __init__(self, site: Site, rank: int, scale: float, dropout: float):
        super().__init__(site, dropout)
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, site.in_features))
        self.lora_B = nn.Parameter(torch.zeros(site.out_features, rank))
        kaiming_uniform_(self.lora_A)

    def forward(self, x: torch.Tensor, state: AdapterState, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(adapter_input(x, self.lora_A.dtype))
        return lora_update(x, self.lora_A, self.lora_B, self.scale, base_out)

    def lora_factors(self):
        return self.lora_A, self.lora_B, self.scale


@register_adapter("lora")
class Lora(AdapterKind):
    def build_site(self, site: Site, shared) -> LoraSite:
        return LoraSite(site, self.config.rank, self.scale, self.config.dropout)

    def parameter_count(self, sites: list[Site]) -> int:
        return sum(self.config.rank * (s.in_features + s.out_features) for s in sites)

    def describe_site(self, site: Site) -> str:
        r = self.config.rank
        return f"A {r}x{site.in_features}, B {site.out_features}x{r}"
