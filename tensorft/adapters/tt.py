"""TT-LoRA: a tensor-train update per layer (seed: ttlora_moe_summary.md; methods.md section 3).

``dW (d_out x d_in)`` is a tensor train over input modes ``m_1..m_p`` (product ``d_in``) then
output modes ``n_1..n_q`` (product ``d_out``), cores ``G_k: (r_{k-1}, s_k, r_k)`` with
``r_0 = r_end = 1`` and inner ranks r. All input cores come before all output cores, so the one
bond between them splits the train into ``dW = B_tt A_tt``::

    A_tt (r x d_in)  = contraction of G_1..G_p          (tiny to build)
    B_tt (d_out x r) = contraction of G_{p+1}..G_{p+q}

Two exact paths, neither builds ``d_out x d_in``: ``factors`` builds (A_tt, B_tt) and runs the
two LoRA matmuls; ``cores`` contracts x through the cores one at a time (bench/ compares them).
Scale is ``alpha / r`` as for every kind (the reference uses a plain alpha=16: set alpha = 16 r
for its scale). The last core starts at
zero so ``dW = 0`` at step 0. Params: ``sum_k r_{k-1} s_k r_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import register_adapter
from ..topology import Site
from .base import AdapterKind, AdapterState, SiteAdapter, adam_pace_scale, adapter_input, lora_update

# Default mode size the automatic factorisation aims for (4096 -> [16, 16, 16]).
TARGET_MODE = 16
# Learning-rate multiplier of every core relative to the LoRA lr of the config (the middle
# cores get adam_pace_scale on top). Measured (q,v, r=4, 1/8.8 of LoRA r=8's parameters): test
# 0.583 -> 0.713 on tweet sentiment and 0.942 -> 0.971 on hyperbaton from x1 to x4 (PEFT LoRA
# r=8: 0.629, 0.975): bench/RESULTS.md, "Learning quality".
TT_LR_SCALE = 4.0


@dataclass
class TTOptions:
    # Either {in: [...], out: [...]} for every target, or {target: {in: [...], out: [...]}}.
    tt_shapes: dict | None = None
    # "factors": build A_tt, B_tt then two matmuls (default: LoRA's cost, bench/RESULTS.md);
    # "cores": contract x through each core, a reference path that keeps token-sized
    # intermediates for backward (measured 1.2-1.3x the step memory of factors).
    tt_path: Literal["factors", "cores"] = "factors"


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_factors(n: int, parts: int | None = None) -> list[int]:
    """Split ``n`` into ``parts`` near-equal integer factors (largest primes placed first)."""
    if parts is None:
        parts = max(1, round(math.log(n) / math.log(TARGET_MODE)))
    bins = [1] * parts
    for p in sorted(prime_factors(n), reverse=True):
        bins[bins.index(min(bins))] *= p
    return sorted((b for b in bins if b > 1), reverse=True) or [n]


class TTSite(SiteAdapter):
    adds_into_base_output = True

    def __init__(self, site: Site, in_modes, out_modes, rank: int, scale: float, dropout: float, path: str):
        super().__init__(site, dropout)
        self.in_modes, self.out_modes = list(in_modes), list(out_modes)
        self.scale, self.path = scale, path
        modes = self.in_modes + self.out_modes
        ranks = [1] + [rank] * (len(modes) - 1) + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], s, ranks[k + 1])) for k, s in enumerate(modes)
        )
        self._init()

    def _init(self) -> None:
        # Input side: A_tt entries get LoRA-A's variance 1/(3 d_in); output side: unit-scale
        # cores and a zero last core, so B_tt (and dW) is zero at step 0 as LoRA's B.
        d_in = math.prod(self.in_modes)
        with torch.no_grad():
            for k, core in enumerate(self.cores):
                if k == len(self.cores) - 1:
                    core.zero_()
                elif k == 0:
                    core.normal_(0.0, 1.0 / math.sqrt(3 * d_in))
                else:
                    core.normal_(0.0, 1.0 / math.sqrt(core.shape[0]))

    def core_lr_scales(self) -> list[float]:
        """Per core: the multiplier giving it LoRA-A's relative pace under Adam (see
        ``adam_pace_scale``). The first core already has LoRA-A's size and the last starts at
        zero (as LoRA's B): 1. The middle cores start at RMS ``1/sqrt(r)``."""
        d_in = math.prod(self.in_modes)
        last = len(self.cores) - 1
        return [
            1.0 if k in (0, last) else adam_pace_scale(1.0 / math.sqrt(core.shape[0]), d_in)
            for k, core in enumerate(self.cores)
        ]

    def tt_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_tt: r x d_in, B_tt: d_out x r)`` from the cores, without the scale."""
        p = len(self.in_modes)
        left = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # m_1 x r
        for core in self.cores[1:p]:
            left = (left @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        right = self.cores[p].reshape(-1, self.cores[p].shape[-1])  # (r n_1) x r'
        for core in self.cores[p + 1 :]:
            right = (right @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        rank = self.cores[p].shape[0]
        return left.t(), right.reshape(rank, -1).t()

    def lora_factors(self):
        A, B = self.tt_factors()
        return A, B, self.scale

    def forward(self, x: torch.Tensor, state: AdapterState, base_out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(adapter_input(x, self.cores[0].dtype))
        if self.path == "cores":
            update = self._contract_cores(x) * self.scale
            return update if base_out is None else base_out + update.to(base_out.dtype)
        A, B = self.tt_factors()
        return lora_update(x, A, B, self.scale, base_out)

    def _contract_cores(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        p = len(self.in_modes)
        # z: (T, rest of the input modes, bond)
        z = x.reshape(-1, self.in_modes[0], math.prod(self.in_modes[1:]))
        z = torch.einsum("tmR,mr->tRr", z, self.cores[0][0])
        for k in range(1, p):
            z = z.reshape(z.shape[0], self.in_modes[k], -1, z.shape[-1])
            z = torch.einsum("tmRa,amb->tRb", z, self.cores[k])
        u = z.reshape(z.shape[0], -1)  # (T, r)
        out = u[:, None, :]  # (T, produced output modes, bond)
        for core in self.cores[p:]:
            out = torch.einsum("tNa,anb->tNnb", out, core).reshape(out.shape[0], -1, core.shape[-1])
        return out.reshape(*lead, self.out_features)


@register_adapter("tt")
class TT(AdapterKind):
    options_cls = TTOptions

    def lr_scales(self, model, named):
        by_id = {}
        for layer in model.tensorft.layers.values():
            for core, scale in zip(layer.adapter.cores, layer.adapter.core_lr_scales()):
                by_id[id(core)] = scale * TT_LR_SCALE
        return {n: by_id[id(p)] for n, p in named.items() if id(p) in by_id}

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        shapes = config.options.tt_shapes
        if shapes is None:
            return
        entries = {None: shapes} if set(shapes) <= {"in", "out"} else shapes
        for target, spec in entries.items():
            where = f"{prefix}.tt_shapes" + (f".{target}" if target else "")
            if target is not None and target not in config.targets:
                raise ConfigError(f"{where}: {target!r} is not in adapter.targets")
            if not isinstance(spec, dict) or set(spec) != {"in", "out"}:
                raise ConfigError(f"{where}: expected {{in: [...], out: [...]}}")
            for side in ("in", "out"):
                modes = spec[side]
                if (
                    not isinstance(modes, list)
                    or not modes
                    or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes)
                ):
                    raise ConfigError(f"{where}.{side}: expected a list of positive integers, got {modes!r}")

    def modes(self, site: Site) -> tuple[list[int], list[int]]:
        shapes = self.options.tt_shapes
        spec = None
        if shapes is not None:
            spec = shapes if set(shapes) <= {"in", "out"} else shapes.get(site.target)
        if spec is None:
            return balanced_factors(site.in_features), balanced_factors(site.out_features)
        return list(spec["in"]), list(spec["out"])

    def check_sites(self, sites: list[Site]) -> None:
        shapes = self.options.tt_shapes
        if shapes is None:
            return  # balanced_factors always multiplies back to the dims
        for s in sites:
            in_modes, out_modes = self.modes(s)
            for side, modes, dim in (("in", in_modes, s.in_features), ("out", out_modes, s.out_features)):
                if math.prod(modes) != dim:
                    key = "adapter.tt_shapes" + ("" if set(shapes) <= {"in", "out"} else f".{s.target}")
                    raise ConfigError(
                        f"{key}.{side}: product of {modes} is {math.prod(modes)}, "
                        f"but {s.name} has {side}put dim {dim}"
                    )

    def build_site(self, site: Site, shared) -> TTSite:
        in_modes, out_modes = self.modes(site)
        return TTSite(
            site, in_modes, out_modes, self.config.rank, self.scale, self.config.dropout, self.options.tt_path
        )

    def parameter_count(self, sites: list[Site]) -> int:
        total = 0
        for s in sites:
            modes = sum(self.modes(s), [])
            ranks = [1] + [self.config.rank] * (len(modes) - 1) + [1]
            total += sum(ranks[k] * m * ranks[k + 1] for k, m in enumerate(modes))
        return total

    def describe_site(self, site: Site) -> str:
        i, o = self.modes(site)
        return f"in {'x'.join(map(str, i))}, out {'x'.join(map(str, o))}"
