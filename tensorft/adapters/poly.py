"""Poly (Polytropon) and MHR: task-routed mixtures of S LoRA skills (methods.md section 6).

Poly (Ponti et al. 2023; TensorPoly paper eq. "Poly"). Per layer, S skills ``A_i: r x d_in``,
``B_i: d_out x r`` and routing logits ``Z: T x S``; for task t with weights ``alpha`` (see
``task_routed.py``)::

    A_t = sum_i alpha_i A_i,    B_t = sum_i alpha_i B_i,    dy = s B_t A_t x,  s = alpha / r

MHR (Caccia et al. 2023): the d_in axis of A and the d_out axis of B are cut into h blocks
("heads", h = ``n_splits``), and each block has its own routing row, ``Z: T x h x S``::

    A_t[:, block j of d_in]  = sum_i alpha_{j,i} A_i[:, block j]
    B_t[block j of d_out, :] = sum_i alpha_{j,i} B_i[block j, :]

(the split of both A and B follows mttl / peft). Poly is MHR with h = 1.

Parameters per layer (paper table 2 writes ``2 d r S + T S`` for d_in = d_out = d)::

    Poly: r S (d_in + d_out) + T S          MHR: r S (d_in + d_out) + T h S

Init: every ``A_i`` Kaiming-uniform (LoRA's A), every ``B_i`` zero, so ``B_t = 0`` and the
model equals the base at step 0 for every routing; ``dL/dB_i = alpha_i dL/dB_t`` is not zero,
so it trains (Z gets gradients from the second step on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import register_adapter
from ..topology import Site
from .base import kaiming_uniform_
from .task_routed import RoutedKind, RoutedSite, RoutingOptions, check_positive_ints, check_routing_options


@dataclass
class PolyOptions(RoutingOptions):
    n_skills: int = 8  # S (the paper's Poly: 17M params = 8 x LoRA's 2.2M)


@dataclass
class MHROptions(PolyOptions):
    n_splits: int = 8  # h: routing heads; must divide d_in and d_out of every target


class PolySite(RoutedSite):
    def __init__(self, site: Site, rank: int, options: PolyOptions, n_splits: int, scale: float, dropout: float):
        S, h = options.n_skills, n_splits
        super().__init__(site, (h, S), options, scale, dropout)
        self.n_splits = h
        self.lora_A = nn.Parameter(torch.empty(S, rank, site.in_features))
        self.lora_B = nn.Parameter(torch.zeros(S, site.out_features, rank))
        for A_i in self.lora_A.data:
            kaiming_uniform_(A_i)

    def mixed_factors(self, weights: torch.Tensor):
        # weights: (batch, h, S). Views split d_in (of A) and d_out (of B) into the h heads.
        S, r, d_in = self.lora_A.shape
        h, d_out = self.n_splits, self.lora_B.shape[1]
        A = torch.einsum("bhs,srhc->brhc", weights, self.lora_A.view(S, r, h, d_in // h))
        B = torch.einsum("bhs,shcr->bhcr", weights, self.lora_B.view(S, h, d_out // h, r))
        return A.reshape(-1, r, d_in), B.reshape(-1, d_out, r)


@register_adapter("poly")
class Poly(RoutedKind):
    options_cls = PolyOptions

    def n_splits(self) -> int:
        return 1

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        check_routing_options(config.options, prefix)
        check_positive_ints(config.options, prefix, ("n_skills",))

    def make_site(self, site: Site) -> PolySite:
        return PolySite(site, self.config.rank, self.options, self.n_splits(), self.scale, self.config.dropout)

    def parameter_count(self, sites: list[Site]) -> int:
        """``sum over layers of r S (d_in + d_out) + T h S`` (h = 1 for Poly)."""
        r, S, T, h = self.config.rank, self.options.n_skills, self.options.n_tasks, self.n_splits()
        return sum(r * S * (s.in_features + s.out_features) + T * h * S for s in sites)

    def describe_site(self, site: Site) -> str:
        o, r = self.options, self.config.rank
        heads = f", {self.n_splits()} heads" if self.n_splits() > 1 else ""
        return f"{o.n_skills} skills A {r}x{site.in_features}, B {site.out_features}x{r}{heads}, Z {o.n_tasks} tasks"


@register_adapter("mhr")
class MHR(Poly):
    options_cls = MHROptions

    def n_splits(self) -> int:
        return self.options.n_splits

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        super().check_options(config, prefix)
        check_positive_ints(config.options, prefix, ("n_splits",))

    def check_sites(self, sites: list[Site]) -> None:
        h = self.options.n_splits
        for s in sites:
            if s.in_features % h or s.out_features % h:
                raise ConfigError(
                    f"adapter.n_splits: {h} heads must divide both dims of {s.name} "
                    f"({s.in_features}->{s.out_features})"
                )
