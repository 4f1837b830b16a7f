"""What every task-routed kind of the Poly / TensorPoly family shares (methods.md section 6).

Each adapted layer holds routing logits ``Z`` (``n_tasks x route_shape``, init U(-1e-3, 1e-3)
as in mttl) and an inventory of experts. For a row of task ``t`` (Poly, eq. "Poly")::

    z     ~ RelaxedBernoulli(temperature, logits=Z[t])   training, routing: relaxed-bernoulli
    z     = sigmoid(Z[t])                                evaluation, or routing: sigmoid
    alpha = z / (sum_last_axis(z) + EPS)                 so the number of active experts does
                                                         not change the norm of A_t, B_t

and the kind turns ``alpha`` into that row's LoRA pair ``(A_t: r x d_in, B_t: d_out x r)``
(:meth:`RoutedSite.mixed_factors`). The forward gathers one pair per row and runs two batched
matmuls, ``dy = s * (x A_t^T) B_t^T``: never a ``d_out x d_in`` update. For a fixed task the
update is the rank-r LoRA ``dW_t = s B_t A_t`` (:meth:`RoutedSite.task_lora_factors`, with the
evaluation weights), which is what per-task merge / export use.

Task ids are read per row from ``state.task_ids``, a ``(batch,)`` long tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..errors import ConfigError, TensorftError
from ..topology import Site
from .base import AdapterKind, AdapterState, SiteAdapter, adapter_input

EPS = 1e-12  # as mttl / peft: only guards a row whose samples are all ~0
ROUTING_INIT = 1e-3  # Z ~ U(-1e-3, 1e-3): every expert starts at sigmoid ~ 0.5
ADD_TASK_INITS = ("new", "mean", "uniform")


@dataclass
class RoutingOptions:
    """Keys every routed kind shares."""

    n_tasks: int = 1
    # Training-time routing; evaluation always uses sigmoid(Z). The mttl T0 configs use sigmoid.
    routing: Literal["relaxed-bernoulli", "sigmoid"] = "relaxed-bernoulli"
    temperature: float = 1.0  # of the relaxed Bernoulli (Gumbel-sigmoid)
    # Learning-rate multiplier of Z relative to the adapter lr (mttl: 0.1 vs 1e-3 -> x100).
    routing_lr_scale: float = 100.0


def check_positive_ints(options, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value < 1:
            raise ConfigError(f"{prefix}.{name}: must be at least 1, got {value}")


def check_routing_options(options: RoutingOptions, prefix: str) -> None:
    check_positive_ints(options, prefix, ("n_tasks",))
    if not options.temperature > 0:
        raise ConfigError(f"{prefix}.temperature: must be positive, got {options.temperature}")
    if not options.routing_lr_scale > 0:
        raise ConfigError(f"{prefix}.routing_lr_scale: must be positive, got {options.routing_lr_scale}")


def relaxed_bernoulli_sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A reparameterised RelaxedBernoulli(temperature, logits) sample: the same draw and the same
    value (to rounding) as ``torch.distributions.RelaxedBernoulli(...).rsample()``, without building the
    distribution objects and their argument checks in every layer of every forward."""
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    return torch.sigmoid((u.log() - (-u).log1p() + logits) / temperature)


def check_task_ids(ids, n_tasks: int, kind: str) -> torch.Tensor:
    """``ids`` as a flat long tensor, or a one-line error when missing or out of range."""
    if ids is None:
        raise TensorftError(
            f"adapter kind {kind!r}: task ids are missing "
            "(pass model(..., task_ids=ids) or use tensorft.task_context(model, ids))"
        )
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.dtype != torch.long:
        ids = ids.long()
    # Range check only where it costs no device sync (ids usually come from the collator on CPU).
    if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < n_tasks):
        raise TensorftError(f"adapter kind {kind!r}: task id out of range 0..{n_tasks - 1}: {ids.tolist()}")
    return ids


class RoutedSite(SiteAdapter):
    """One layer of a task-routed kind. Subclasses define ``mixed_factors``."""

    kind_name = "routed"

    def __init__(self, site: Site, route_shape: tuple[int, ...], options: RoutingOptions, scale: float, dropout: float):
        super().__init__(site, dropout)
        self.scale = scale
        self.routing = options.routing
        self.temperature = options.temperature
        self.routing_logits = nn.Parameter(torch.empty(options.n_tasks, *route_shape))
        nn.init.uniform_(self.routing_logits, -ROUTING_INIT, ROUTING_INIT)

    @property
    def n_tasks(self) -> int:
        return self.routing_logits.shape[0]

    # ------------------------------------------------------------------ routing

    def mixing_weights(self, task_ids: torch.Tensor, sample: bool) -> torch.Tensor:
        """``alpha`` per row: ``(batch, *route_shape)``, normalised over the last axis."""
        logits = self.routing_logits[task_ids]
        if sample:
            z = relaxed_bernoulli_sample(logits, self.temperature)
        else:
            z = torch.sigmoid(logits)
        return z / (z.sum(dim=-1, keepdim=True) + EPS)

    def mixed_factors(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """Per-row LoRA pairs ``(A: batch x r x d_in, B: batch x d_out x r)`` for ``weights``."""
        raise NotImplementedError

    def row_task_ids(self, state: AdapterState, rows: int, device: torch.device) -> torch.Tensor:
        # Checked and moved to the device once per model call (RoutedKind.prepare_routing); a
        # layer run on its own (no model call) gets the same checks here.
        ids = check_task_ids(state.task_ids, self.n_tasks, self.kind_name)
        if ids.numel() not in (1, rows):
            raise TensorftError(
                f"adapter kind {self.kind_name!r}: got {ids.numel()} task ids for a batch of {rows} rows"
            )
        return ids.to(device=device).expand(rows)

    def forward(self, x: torch.Tensor, state: AdapterState) -> torch.Tensor:
        # x: (B, ..., d_in) with one task id per row, or (T, d_in) for a single sequence.
        lead = x.shape[:-1]
        rows_x = x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        ids = self.row_task_ids(state, rows_x.shape[0], self.routing_logits.device)
        sample = self.training and self.routing == "relaxed-bernoulli"
        A, B = self.mixed_factors(self.mixing_weights(ids, sample))
        rows_x = self.dropout(adapter_input(rows_x, A.dtype))
        # the scale goes on the small factor, not on the (batch, tokens, d_out) output
        y = torch.bmm(torch.bmm(rows_x, A.transpose(1, 2)), (B * self.scale).transpose(1, 2))
        return y.reshape(*lead, self.out_features)

    def task_lora_factors(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A: r x d_in, B: d_out x r, s)`` with ``dW_t = s B A`` exactly, evaluation routing."""
        ids = torch.tensor([task_id], device=self.routing_logits.device)
        A, B = self.mixed_factors(self.mixing_weights(ids, sample=False))
        return A[0], B[0], self.scale

    # ------------------------------------------------------------------ few-shot

    @torch.no_grad()
    def add_task(self, init: str = "new") -> int:
        """Append a routing row for a new task and return its id.

        ``new``: U(-1e-3, 1e-3) as a task at the start of training; ``mean``: the average of
        the existing rows' logits (the -mu mode); ``uniform``: zeros, i.e. exactly equal weights
        over the experts in evaluation routing (the paper's "average the modules").
        """
        old = self.routing_logits
        if init == "new":
            row = torch.empty_like(old[:1]).uniform_(-ROUTING_INIT, ROUTING_INIT)
        elif init == "mean":
            row = old.mean(dim=0, keepdim=True)
        elif init == "uniform":
            row = torch.zeros_like(old[:1])
        else:
            raise TensorftError(f"add_task: init must be one of {', '.join(ADD_TASK_INITS)}, got {init!r}")
        self.routing_logits = nn.Parameter(torch.cat([old, row]), requires_grad=old.requires_grad)
        return self.n_tasks - 1


class RoutedKind(AdapterKind):
    """Base of the routed kinds: not mergeable or exportable without naming a task."""

    mergeable = False
    exportable = False
    why_not_mergeable = "its update depends on the task; name a task to merge or export that task's LoRA"

    def build_site(self, site: Site, shared) -> RoutedSite:
        adapter = self.make_site(site)
        adapter.kind_name = self.name
        return adapter

    def make_site(self, site: Site) -> RoutedSite:  # pragma: no cover
        raise NotImplementedError

    def prepare_routing(self, model: nn.Module, frame, inputs: dict):
        """Check the call's task ids once and move them to the model's device once, instead of
        in every adapted layer (a host-to-device copy per layer per forward on a GPU)."""
        rows = inputs.get("input_ids")
        rows = rows if rows is not None else inputs.get("inputs_embeds")
        if frame.task_ids is None or rows is None:
            return frame  # a layer that needs them says so
        ids = check_task_ids(frame.task_ids, self.options.n_tasks, self.name)
        return frame.replace(task_ids=ids.to(rows.device, non_blocking=True))

    def routed_sites(self, model: nn.Module) -> list[RoutedSite]:
        return [m for m in model.modules() if isinstance(m, RoutedSite)]

    def lr_scales(self, model: nn.Module, named: dict[str, nn.Parameter]) -> dict[str, float]:
        routing = {id(s.routing_logits) for s in self.routed_sites(model)}
        return {n: self.options.routing_lr_scale for n, p in named.items() if id(p) in routing}

    def frozen_parameters(self, model: nn.Module, named: dict[str, nn.Parameter]) -> set[str]:
        """Few-shot adaptation (``adapter.init_from`` + ``adapter.fewshot``): ``routing`` (-z)
        trains only the routing logits, ``modules`` (-mu) everything but them, ``full`` all."""
        mode = (self.config.fewshot or "full") if self.config.init_from else "full"
        if mode == "full":
            return set()
        routing = {id(s.routing_logits) for s in self.routed_sites(model)}
        logits = {name for name, p in named.items() if id(p) in routing}
        return set(named) - logits if mode == "routing" else logits

    def add_task(self, model: nn.Module, init: str = "new") -> int:
        """Add one routing row for a new task in every layer; returns the new task id.

        Replaces each layer's ``routing_logits`` parameter: build the optimizer afterwards."""
        ids = {s.add_task(init) for s in self.routed_sites(model)}
        (new_id,) = ids
        self.options.n_tasks = new_id + 1  # the saved config describes the grown adapter
        return new_id
