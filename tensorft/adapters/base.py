"""The interface every adapter kind implements.

An adapter kind (registered with ``@register_adapter``) turns an :class:`AdapterConfig` and
the list of target :class:`Site` s into parameters:

* an optional *shared* module, registered once under ``model.tensorft.shared`` (CP keeps its
  model-wide factors there; a parameter is never registered in two modules, see methods.md);
* one :class:`SiteAdapter` per target layer, registered inside that layer's wrapper.

``SiteAdapter.forward(x, state)`` returns the scaled update ``dy = s * f(x)`` computed in factor
space. ``state`` is the model's :class:`AdapterState`: routed kinds read task ids or routing
inputs from it, static kinds ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import TensorftError
from ..topology import ModelShape, Site


@dataclass
class NoOptions:
    """A kind without keys of its own."""


@dataclass
class AdapterState:
    """Per-model runtime switches shared by every adapted layer (not parameters)."""

    enabled: bool = True
    # (batch,) long tensor of task ids for task-routed kinds; set via ``tensorft.task_context``
    # or by passing ``task_ids=`` to the model's forward.
    task_ids: torch.Tensor | None = None
    task_ids_from_forward: bool = False  # set by ``model(..., task_ids=...)``, cleared after it
    # Free-form per-batch routing inputs (e.g. sentence-embedding similarities for T-REX).
    routing: dict[str, Any] = field(default_factory=dict)


class SiteAdapter(nn.Module):
    """The adapter of one linear layer."""

    def __init__(self, site: Site, dropout: float = 0.0):
        super().__init__()
        self.in_features = site.in_features
        self.out_features = site.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, state: AdapterState) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` with ``A: r x d_in``, ``B: d_out x r`` and ``dW = s * B @ A`` exactly."""
        raise TensorftError(f"{type(self).__name__}: this adapter kind has no fixed low-rank update")

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` (d_out x d_in). Only for merge/export, never in training."""
        A, B, scale = self.lora_factors()
        return scale * (B @ A)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this layer's forward uses but does not own (CP's shared factors).

        Sharding launchers must gather them around this module's forward (DeepSpeed ZeRO-3:
        ``deepspeed.zero.register_external_parameter``)."""
        return []

    def adapter_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32


class AdapterKind:
    """Base class of a registered kind. Subclasses set the class attributes and ``build``."""

    name: ClassVar[str] = ""
    options_cls: ClassVar[type] = NoOptions
    # A kind whose update depends on the input (routers) can be neither merged nor exported.
    mergeable: ClassVar[bool] = True
    exportable: ClassVar[bool] = True
    why_not_mergeable: ClassVar[str] = "its update depends on the input"

    @classmethod
    def ensure_mergeable(cls) -> None:
        if not cls.mergeable:
            raise TensorftError(f"adapter kind {cls.name!r} cannot be merged: {cls.why_not_mergeable}")

    @classmethod
    def ensure_exportable(cls) -> None:
        if not cls.exportable:
            raise TensorftError(
                f"adapter kind {cls.name!r} cannot be exported as a PEFT LoRA adapter: {cls.why_not_mergeable}"
            )

    def __init__(self, config, shape: ModelShape | None):
        self.config = config
        self.options = config.options
        self.shape = shape

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        """Validate kind-specific keys that need no model (raise ConfigError)."""

    def check_sites(self, sites: list[Site]) -> None:
        """Validate the targets against the model (raise ConfigError)."""

    def build_shared(self, sites: list[Site]) -> nn.Module | None:
        return None

    def build_site(self, site: Site, shared: nn.Module | None) -> SiteAdapter:  # pragma: no cover
        raise NotImplementedError

    def parameter_count(self, sites: list[Site]) -> int:
        """Trainable parameters by the method's closed-form formula (tests compare it to the
        real module's count)."""
        raise NotImplementedError

    def describe_site(self, site: Site) -> str:
        """A short shape description for the ``params`` table."""
        return f"{site.in_features}->{site.out_features}"


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (what PEFT uses for lora_A)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
