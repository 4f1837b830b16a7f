"""The interface every adapter kind implements.

An adapter kind (registered with ``@register_adapter``) turns an :class:`AdapterConfig` and
the list of target :class:`Site` s into parameters:

* an optional *shared* module, registered once under ``model.tensorft.shared`` (CP keeps its
  model-wide factors there; a parameter is never registered in two modules, see methods.md);
* one :class:`SiteAdapter` per target layer, registered inside that layer's wrapper.

``SiteAdapter.forward(x, state)`` returns the scaled update ``dy = s * f(x)`` computed in factor
space. ``state`` is the model's :class:`AdapterState`: routed kinds read the current forward
call's per-row routing inputs from it (``state.task_ids``, ``state.routing[name]``,
``state.require(name, who)``; row i belongs to row i of ``x``) and may add auxiliary losses
(``state.add_aux_loss``); static kinds ignore it.

Routed kinds also use these :class:`AdapterKind` hooks: ``routing_inputs`` (forward kwargs
they read), ``prepare_routing`` (a model-level step before each forward, e.g. a router pass
through the base model), ``frozen_parameters`` (saved but not trained).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TensorftError
from ..topology import ModelShape, Site


@dataclass
class NoOptions:
    """A kind without keys of its own."""


class AuxLosses:
    """Named scalar auxiliary losses (router cross-entropy, load balancing) of one forward call.

    Adds after the call has returned are ignored: they come from activation-checkpoint
    recompute during backward, and the call's losses were already taken into the loss."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.closed = False

    def add(self, name: str, value: torch.Tensor) -> None:
        if self.closed:
            return
        self.values[name] = self.values[name] + value if name in self.values else value


@dataclass(frozen=True, eq=False)
class Routing:
    """The routing inputs of one forward call (or of a ``tensorft.routing_context`` block).

    ``inputs``: named per-row tensors, batch first (``task_ids`` (B,) long, ``scores`` (B, K),
    ``expert_ids`` (B,), ... an open set); ``enabled``: the adapters-on switch; ``aux``: the
    call's auxiliary losses. Immutable except ``aux``: derive a new frame with :meth:`replace`.
    """

    inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True
    aux: AuxLosses = field(default_factory=AuxLosses)

    def __post_init__(self):
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))

    @property
    def task_ids(self) -> torch.Tensor | None:
        return self.inputs.get("task_ids")

    def replace(self, **inputs) -> "Routing":
        """The same call (same aux losses and switch) with ``inputs`` added or replaced."""
        return Routing({**self.inputs, **inputs}, self.enabled, self.aux)


class AdapterState:
    """Per-model runtime state read by every adapted layer: a stack of :class:`Routing` frames.

    ``tensorft.task_context`` / ``routing_context`` / ``disable_adapters`` push *context* frames;
    each model forward pushes a *call* frame (the context's inputs plus the call's own
    ``task_ids=`` / routing kwargs, a fresh aux-loss collector), and so does each checkpointed
    decoder layer when it runs, including when activation checkpointing re-runs it during
    backward (model.py). Routed kinds read only call frames: a routed layer running outside
    any call is a recompute tensorft cannot replay, reported instead of routed with stale ids.
    """

    def __init__(self):
        self._stack: list[tuple[Routing, bool]] = [(Routing(), False)]  # (frame, is a call frame)
        self._calls: list[int] = []  # stack depths of the model forwards in progress
        self._aux_sinks: list[dict[str, torch.Tensor]] = []  # open collect_aux() blocks
        self.preparing = False  # inside a kind's prepare_routing: nested forwards skip it
        self._generation_memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._block_results: dict = {}  # see reuse_in_block; emptied whenever a frame enters or leaves

    # ---- the stack

    @property
    def frame(self) -> Routing:
        """The innermost frame, context or call."""
        return self._stack[-1][0]

    def enter(self, frame: Routing, call: bool) -> int:
        self._stack.append((frame, call))
        self._block_results.clear()
        return len(self._stack) - 1

    def exit(self, depth: int) -> Routing:
        frame = self._stack[depth][0]
        del self._stack[depth:]
        self._block_results.clear()
        return frame

    @contextlib.contextmanager
    def pushed(self, frame: Routing, call: bool) -> Iterator[Routing]:
        depth = self.enter(frame, call)
        try:
            yield frame
        finally:
            self.exit(depth)

    def begin_call(self, frame: Routing) -> None:
        """A model forward starts (its pre-hook): ``frame`` is its call frame."""
        self._calls.append(self.enter(frame, call=True))

    def end_call(self) -> None:
        """The forward returned (or raised): close its aux losses and hand them to collectors."""
        frame = self.exit(self._calls.pop())
        frame.aux.closed = True
        for sink in self._aux_sinks:
            for name, value in frame.aux.values.items():
                sink[name] = sink[name] + value if name in sink else value

    @contextlib.contextmanager
    def collect_aux(self) -> Iterator[dict[str, torch.Tensor]]:
        """Sum, by name, the auxiliary losses of every forward call inside the block."""
        sink: dict[str, torch.Tensor] = {}
        self._aux_sinks.append(sink)
        try:
            yield sink
        finally:
            self._aux_sinks = [s for s in self._aux_sinks if s is not sink]  # by identity

    @property
    def enabled(self) -> bool:
        return self.frame.enabled

    # ---- what SiteAdapter.forward reads

    def call_frame(self) -> Routing:
        frame, call = self._stack[-1]
        if not call:
            raise TensorftError(
                "a routed adapter ran outside a model forward: activation checkpointing re-ran a block "
                "that tensorft cannot replay routing inputs into (its checkpointed blocks are not "
                "transformers GradientCheckpointingLayers); disable gradient checkpointing for this model"
            )
        return frame

    @property
    def task_ids(self) -> torch.Tensor | None:
        return self.call_frame().task_ids

    @property
    def routing(self) -> Mapping[str, torch.Tensor]:
        return self.call_frame().inputs

    def require(self, name: str, who: str) -> torch.Tensor:
        """The current call's routing input ``name``, or a one-line error naming how to pass it."""
        value = self.call_frame().inputs.get(name)
        if value is None:
            raise TensorftError(
                f"{who}: no {name} for this forward; pass model(..., {name}=...) or use "
                f"tensorft.routing_context(model, {name}=...)"
            )
        return value

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Add a scalar auxiliary loss to the current call; the trainers add it to the loss
        (scaled like the main loss under gradient accumulation) and log it as ``aux/<name>``."""
        self.call_frame().aux.add(name, value)

    def reuse_in_block(self, key, inputs: tuple[torch.Tensor, ...], compute):
        """``compute()``, or the value it returned for an earlier call with the same ``key`` and
        the very same ``inputs`` (the same tensor objects, not modified in place since), in the
        same grad and autocast mode, within the same decoder block's run.

        For sites of one layer that read the same input through the same factor (CP's q, k, v
        all compute ``x A`` with the model-wide A): one matmul instead of three forward, and in
        backward autograd sums the three gradients of ``x A`` first, so two matmuls instead of six.

        Every frame entering or leaving (each model forward, each checkpointed decoder block,
        also when activation checkpointing re-runs it during backward) empties the store, so a
        recompute reuses exactly where the original forward did (it must save the same tensors)
        and nothing (no graph) outlives the block. A value whose gradient autograd has computed
        is forgotten too: its graph is spent (a layer called directly, outside a model forward,
        step after step on the same input). Inference tensors (``torch.inference_mode``) keep no
        version to check, so nothing is reused for them."""
        if any(t.is_inference() for t in inputs):
            return compute()
        device = inputs[0].device.type
        stamp = (torch.is_grad_enabled(), torch.is_autocast_enabled(device), tuple(t._version for t in inputs))
        held = self._block_results.get(key)
        if held is not None and held[1] == stamp and all(a is b for a, b in zip(held[0], inputs)):
            return held[2]
        value = compute()
        self._block_results[key] = (inputs, stamp, value)
        if value.requires_grad:
            value.register_hook(functools.partial(self._forget_block_result, key, id(value)))
        return value

    def _forget_block_result(self, key, value_id: int, grad: torch.Tensor) -> None:
        held = self._block_results.get(key)
        if held is not None and id(held[2]) == value_id:
            del self._block_results[key]

    def generation_memory(self, cache) -> dict | None:
        """A dict that lives as long as ``cache`` (a generate call's ``past_key_values``): a
        kind's prepare_routing computes routing at prefill and keeps it here for the decode
        steps. None without a cache. Beam search reorders beams within a prompt only, so
        routing that depends on the prompt alone stays valid for every row."""
        if cache is None:
            return None
        return self._generation_memory.setdefault(cache, {})


class SiteAdapter(nn.Module):
    """The adapter of one linear layer.

    A kind whose update is a LoRA pair at forward time sets ``adds_into_base_output`` and
    accepts ``forward(x, state, base_out=y)``, returning ``y + update`` (see :func:`lora_update`).
    """

    # True: AdaptedLinear passes the base layer's output in and takes the sum back.
    adds_into_base_output: ClassVar[bool] = False

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
    # Forward kwargs this kind reads as per-row routing inputs, besides ``task_ids`` (always
    # taken) and ``routing={...}``: ``model(ids, scores=s)`` and ``model.generate(ids, scores=s,
    # num_return_sequences=n)`` (generate expands every named input like its own tensors).
    routing_inputs: ClassVar[tuple[str, ...]] = ()

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

    def lr_scales(self, model: nn.Module, named: dict[str, nn.Parameter]) -> dict[str, float]:
        """Learning-rate multiplier per trainable parameter name (absent: 1.0), relative to the
        LoRA learning rate the user writes. See ``tensorft/optim.py``."""
        return {}

    def frozen_parameters(self, model: nn.Module, named: dict[str, nn.Parameter]) -> set[str]:
        """Names (among ``named``, every saved parameter) that are saved and loaded but not
        trained, e.g. frozen experts. ``attach`` leaves them ``requires_grad=False``, so
        ``count_parameters`` and the optimizer skip them while ``save`` keeps them."""
        return set()

    def prepare_routing(self, model: nn.Module, frame: "Routing", inputs: dict) -> "Routing":
        """The model-level step, run before each forward of the Hugging Face model.

        ``frame``: the call's routing (context inputs plus the call's kwargs); ``inputs``: the
        forward's arguments by name (``input_ids``, ``attention_mask``, ``past_key_values``...).
        Return the frame the adapted layers will see, e.g. ``frame.replace(expert_ids=...)``
        after a router pass through the base model (``with tensorft.disable_adapters(model):
        model(...)``; forwards nested in this step skip it). Across a generate call's decode
        steps keep results in ``model.tensorft.state.generation_memory(inputs.get(
        "past_key_values"))``. Add router losses with ``frame.aux.add(name, loss)``.

        Under DDP every trainable parameter must get a gradient in every step: keep per-task /
        per-expert weights stacked in one tensor and index it (absent tasks get zero rows), or
        add ``0 * p.sum()`` for a parameter a step may skip (a router used at prefill only).
        """
        return frame


def adam_pace_scale(init_rms: float, d_in: int) -> float:
    """Learning-rate multiplier that makes a factor of initial RMS ``init_rms`` change, relative
    to its size, as fast under Adam as LoRA's A of the same layer.

    Adam moves every entry by about ``lr`` per step whatever its size, so a factor's relative
    change per step is ``lr / rms``. LoRA's A (Kaiming-uniform, RMS ``1/sqrt(3 d_in)``) moves at
    ``lr sqrt(3 d_in)``; an order-one factor (CP's C's, TT's middle cores) at the same ``lr``
    would move ~40x (d=576) to ~110x (d=4096) slower, i.e. stay frozen at its init
    (bench/update_dynamics.py measures it)."""
    return init_rms * math.sqrt(3 * d_in)


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the adapter's dtype for its matmuls; under autocast as it is, because autocast
    casts a matmul's inputs itself: an explicit cast would write a float32 copy of every adapted
    layer's bf16 input that the next matmul casts straight back (the same values: bf16 ->
    float32 -> bf16 is exact)."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def lora_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``s (x A^T) B^T`` for ``A: r x d_in``, ``B: d_out x r``; with ``base_out``, that plus
    ``base_out``.

    Two choices make this cheaper than PEFT's ``base + lora_B(lora_A(x)) * s``:
    - Layout: both factors enter the matmuls as row-major ``r x d`` (``A`` and ``B^T`` made
      contiguous: copies the size of the factors). With a thin ``r``, BLAS is 2-3x slower on the
      other layout, and autograd's gradient matmuls follow the factor's layout: a ``d_out x r``
      ``B`` (nn.Linear's, PEFT's) sends both of its backward matmuls down the slow path.
    - The sum is one ``addmm`` whose ``alpha`` carries the scale: no update-sized tensor is
      written, scaled and added, and backward does not multiply the output gradient by ``s``.
    Falls back to the separate sum when the base output's dtype is not the one the adapter
    computes in (a float32 adapter on a bf16 base without autocast; a 4-bit base computing in
    float32 under bf16 autocast): the sum keeps the base output's dtype. bench/RESULTS.md
    ("The update inside one addmm, factors row-major") measures the difference."""
    return lora_output(lora_input(x, A), B, scale, base_out)


def lora_input(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x A^T`` (``A: r x d_in``): the first half of :func:`lora_update`."""
    return F.linear(x, A.contiguous())


def lora_output(h: torch.Tensor, B: torch.Tensor, scale: float, base_out: torch.Tensor | None = None) -> torch.Tensor:
    """``s h B^T`` (+ ``base_out``) for ``h = x A^T``: the second half of :func:`lora_update`."""
    Bt = B.t().contiguous()
    if base_out is None:
        return torch.matmul(h, Bt) * scale
    if base_out.dtype != h.dtype:
        return base_out + (torch.matmul(h, Bt) * scale).to(base_out.dtype)
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), Bt, alpha=scale)
    return out.view(base_out.shape)


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (what PEFT uses for lora_A)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
