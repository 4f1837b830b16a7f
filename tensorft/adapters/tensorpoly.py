"""TLoRA, TensorPoly-I and TensorPoly-II (seed: tensorpoly_paper.txt; methods.md section 6).

TLoRA (paper section 4.1). Each of the r rows of LoRA's ``A (r x d_in)`` is an entangled tensor
of order N and tensor rank R, cut to its first d_in entries (eq. 2 and section 3.4)::

    A[j, :] = ( sum_{k=1..R}  A[1,j,:,k] (x) A[2,j,:,k] (x) ... (x) A[N,j,:,k] )[:d_in]

with the factor tensor ``A: N x r x q x R`` and q the smallest integer with ``q^N >= d_in``
(:func:`tensor_side`; integer arithmetic, a float ``ceil(d ** (1/N))`` overshoots: 3125, N=5).
``B (d_out x r)`` is built the same way from ``B: N x r x q_out x R`` (its columns are the
entangled vectors). Then ``dy = s B A x`` with ``s = alpha / r``. (The paper writes
``h = W0 x + s A B^T x`` with A on the output side; tensorft keeps LoRA's names: A reads the
input, B writes the output.) Order 0 is the most significant index, as ``torch.kron``.

TensorPoly-I (eq. "TensorPoly-I"): the R tensor ranks are the experts, ``Z: T x R``::

    A_k = (x)_i A[i,:,:,k],    A_t = sum_k alpha_k A_k     (same for B)

TensorPoly-II (eq. "TensorPoly-II"): ``Z: T x N x R``; each order is mixed over the ranks,
then the orders are multiplied out::

    A_t = (x)_i ( sum_k alpha_{i,k} A[i,:,:,k] )           (same for B)

``alpha`` is normalised over the R ranks of each order (the paper's sum index is ambiguous;
this keeps every order a convex mix, as Poly's normalisation intends).

Parameters per layer (paper table 2 writes ``2 N r q R`` for d_in = d_out = d)::

    TLoRA: N r R (q_in + q_out)     TensorPoly-I: ... + T R     TensorPoly-II: ... + T N R

Cost: the (tiny) A and B are built from the factors once per forward (TLoRA: one ``r x d``
pair; TensorPoly-I: R experts then a per-row mix; TensorPoly-II: a per-row Kronecker product),
then two thin matmuls as LoRA. The mttl reference rebuilds every skill's A and B per forward
and initialises B uniform (so the output moves at init).

Init: the output-side factor of the LAST order is zero, so ``B = 0`` (a Kronecker product with
a zero factor) and the model equals the base at step 0 for any routing; its gradient is the
product of the other factors, which are not zero, so it trains. The other output-side orders
have unit variance (after the routing mix at init), so the last factor moves B as LoRA's B
moves under Adam. The input-side factors are normal with the std that gives the built A (after
the routing mix at init, alpha = 1/R) LoRA-A's variance ``1 / (3 d_in)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_adapter
from ..topology import Site
from .base import AdapterKind, AdapterState, SiteAdapter, adapter_input
from .task_routed import RoutedKind, RoutedSite, RoutingOptions, check_positive_ints, check_routing_options


def tensor_side(d: int, order: int) -> int:
    """The smallest integer q with ``q ** order >= d`` (exact integer arithmetic)."""
    q = max(1, round(d ** (1.0 / order)))  # a float guess, then corrected exactly
    while q**order < d:
        q += 1
    while q > 1 and (q - 1) ** order >= d:
        q -= 1
    return q


def kron_rows(factors: torch.Tensor, d: int) -> torch.Tensor:
    """``(..., N, r, q) -> (..., r, d)``: per row j, ``factors[..., 0, j] (x) ... (x) factors[..., N-1, j]``
    cut to its first d entries. Prefixes that cannot reach the first d entries are dropped as
    soon as they are formed, so at most ~``d`` entries per row are ever built."""
    N, q = factors.shape[-3], factors.shape[-1]
    out = factors[..., 0, :, :]
    for i in range(1, N + 1):
        out = out[..., : -(-d // q ** (N - i))]  # ceil(d / q^(orders left))
        if i < N:
            out = (out.unsqueeze(-1) * factors[..., i, :, None, :]).flatten(-2)
    return out


@dataclass
class TLoRAOptions:
    order: int = 2  # N (the paper's best: 2)
    tensor_rank: int = 1  # R (the paper's TLoRA: R = 1)


@dataclass
class TensorPolyOptions(RoutingOptions, TLoRAOptions):
    tensor_rank: int = 8  # R experts (TensorPoly-I) / per order (TensorPoly-II); paper: 8 or 20


def check_tensor_options(options, prefix: str) -> None:
    check_positive_ints(options, prefix, ("order", "tensor_rank"))


class EntangledFactors:
    """Mixin: the factor tensors ``tensor_A: N x r x q_in x R`` and ``tensor_B: N x r x q_out x R``."""

    def init_factors(self, site: Site, rank: int, order: int, tensor_rank: int, std_a: float, std_b: float):
        N, R = order, tensor_rank
        self.q_in, self.q_out = tensor_side(site.in_features, N), tensor_side(site.out_features, N)
        self.tensor_A = nn.Parameter(torch.randn(N, rank, self.q_in, R) * std_a)
        self.tensor_B = nn.Parameter(torch.randn(N, rank, self.q_out, R) * std_b)
        with torch.no_grad():
            self.tensor_B[-1].zero_()  # B = 0 at init (see the module docstring)

    def experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor rank k: ``(A_k: R x r x d_in, B_k^T: R x r x d_out)``."""
        A = kron_rows(self.tensor_A.permute(3, 0, 1, 2), self.in_features)
        B = kron_rows(self.tensor_B.permute(3, 0, 1, 2), self.out_features)
        return A, B


def lora_a_variance(site: Site) -> float:
    return 1.0 / (3 * site.in_features)  # Kaiming-uniform with bound 1/sqrt(d_in)


class TLoRASite(EntangledFactors, SiteAdapter):
    def __init__(self, site: Site, rank: int, options: TLoRAOptions, scale: float, dropout: float):
        super().__init__(site, dropout)
        N, R = options.order, options.tensor_rank
        # var(A) = R std^(2N): a sum of R products of N factors
        self.init_factors(site, rank, N, R, (lora_a_variance(site) / R) ** (0.5 / N), 1.0)
        self.scale = scale

    def lora_factors(self):
        A, Bt = self.experts()
        return A.sum(0), Bt.sum(0).t(), self.scale

    def task_lora_factors(self, task_id: int):
        return self.lora_factors()  # TLoRA is not routed: one LoRA for every task

    def forward(self, x: torch.Tensor, state: AdapterState) -> torch.Tensor:
        A, B, s = self.lora_factors()
        x = self.dropout(adapter_input(x, A.dtype))
        return F.linear(F.linear(x, A), B * s)


class TensorPoly1Site(EntangledFactors, RoutedSite):
    def __init__(self, site: Site, rank: int, options: TensorPolyOptions, scale: float, dropout: float):
        super().__init__(site, (options.tensor_rank,), options, scale, dropout)
        N, R = options.order, options.tensor_rank
        # var(A_t) = R (1/R)^2 std^(2N) at alpha = 1/R
        self.init_factors(site, rank, N, R, (lora_a_variance(site) * R) ** (0.5 / N), 1.0)

    def mixed_factors(self, weights: torch.Tensor):
        A, Bt = self.experts()  # built once per forward, mixed per row
        return torch.einsum("bk,krd->brd", weights, A), torch.einsum("bk,krd->bdr", weights, Bt)


class TensorPoly2Site(EntangledFactors, RoutedSite):
    def __init__(self, site: Site, rank: int, options: TensorPolyOptions, scale: float, dropout: float):
        super().__init__(site, (options.order, options.tensor_rank), options, scale, dropout)
        N, R = options.order, options.tensor_rank
        # each order's mix at alpha = 1/R has variance std^2 / R; var(A_t) = (std^2 / R)^N
        self.init_factors(site, rank, N, R, math.sqrt(R) * lora_a_variance(site) ** (0.5 / N), math.sqrt(R))

    def mixed_factors(self, weights: torch.Tensor):
        # weights: (batch, N, R); mix every order over the ranks, then Kronecker across orders
        A = kron_rows(torch.einsum("bnk,nrqk->bnrq", weights, self.tensor_A), self.in_features)
        Bt = kron_rows(torch.einsum("bnk,nrqk->bnrq", weights, self.tensor_B), self.out_features)
        return A, Bt.transpose(1, 2)


class TensorCounts:
    """Mixin for the kinds: closed-form counts and the shape description."""

    def tensor_parameter_count(self, sites: list[Site]) -> int:
        o, r = self.options, self.config.rank
        return sum(
            o.order * r * o.tensor_rank * (tensor_side(s.in_features, o.order) + tensor_side(s.out_features, o.order))
            for s in sites
        )

    def describe_site(self, site: Site) -> str:
        o, r = self.options, self.config.rank
        qi, qo = tensor_side(site.in_features, o.order), tensor_side(site.out_features, o.order)
        return f"A {o.order}x{r}x{qi}x{o.tensor_rank}, B {o.order}x{r}x{qo}x{o.tensor_rank}"


@register_adapter("tlora")
class TLoRA(TensorCounts, AdapterKind):
    """Not routed: one rank-r LoRA, so merge and PEFT export are exact."""

    options_cls = TLoRAOptions

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        check_tensor_options(config.options, prefix)

    def build_site(self, site: Site, shared) -> TLoRASite:
        return TLoRASite(site, self.config.rank, self.options, self.scale, self.config.dropout)

    def parameter_count(self, sites: list[Site]) -> int:
        """``sum over layers of N r R (q_in + q_out)`` (paper: ``2 N r q R``)."""
        return self.tensor_parameter_count(sites)


@register_adapter("tensorpoly1")
class TensorPoly1(TensorCounts, RoutedKind):
    options_cls = TensorPolyOptions
    site_cls = TensorPoly1Site

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        check_routing_options(config.options, prefix)
        check_tensor_options(config.options, prefix)

    def make_site(self, site: Site) -> RoutedSite:
        return self.site_cls(site, self.config.rank, self.options, self.scale, self.config.dropout)

    def routing_count(self) -> int:
        return self.options.n_tasks * self.options.tensor_rank

    def parameter_count(self, sites: list[Site]) -> int:
        """TensorPoly-I: ``N r R (q_in + q_out) + T R`` per layer (paper: ``2 N r q R + T R``)."""
        return self.tensor_parameter_count(sites) + len(sites) * self.routing_count()

    def describe_site(self, site: Site) -> str:
        return f"{super().describe_site(site)}, Z {self.options.n_tasks} tasks"


@register_adapter("tensorpoly2")
class TensorPoly2(TensorPoly1):
    """TensorPoly-II: ``N r R (q_in + q_out) + T N R`` per layer (paper: ``2 N r q R + T R N``)."""

    site_cls = TensorPoly2Site

    def routing_count(self) -> int:
        return self.options.n_tasks * self.options.order * self.options.tensor_rank
