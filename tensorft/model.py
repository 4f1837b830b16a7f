"""Model glue: wrap target layers, hold the shared factors, route, switch adapters off, merge.

``attach`` replaces each target linear layer by an :class:`AdaptedLinear` (base layer + the
kind's :class:`SiteAdapter`) and registers one :class:`TensorftRoot` at ``model.tensorft``
holding the config, the shared factors of kinds that have them, and the runtime
:class:`AdapterState` that every adapted layer reads (on/off switch, routing inputs).
The model object stays a Hugging Face model, so transformers and trl trainers take it as is.

Routing runtime. Routing inputs are per-row tensors of one forward call, kept in a
:class:`Routing` frame on the state's stack, never found by walking modules:

* a forward pre-hook on the model takes ``task_ids=``, ``routing={...}`` and the kind's named
  ``routing_inputs`` off the call, runs the kind's ``prepare_routing`` step, and pushes the
  call frame; a forward hook pops it (contexts and nested calls nest like a stack);
* activation checkpointing re-runs a decoder layer's ``forward`` during backward, after the
  call frame is gone, and module hooks do not run again (transformers checkpoints ``forward``,
  not ``__call__``). So each checkpointed block (a ``GradientCheckpointingLayer`` holding
  adapted layers) gets a pre-hook that hands it the current frame as a keyword argument,
  which the checkpoint keeps with the block's other arguments, and is given a subclass (as
  FSDP2 does with its ``FSDP<Layer>`` classes) whose ``forward`` takes that argument off and
  pushes the frame around the original ``forward``: the recompute sees the frame of the
  forward it repeats, for reentrant and non-reentrant checkpointing alike;
* ``generate`` validates its keyword arguments against the model's signature; the model is
  given a subclass whose validation lets the routing inputs through, so transformers expands
  them for ``num_return_sequences`` / beams like its own tensors and passes them to every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Iterator

import torch
import torch.nn as nn

from .adapters.base import AdapterKind, AdapterState, Routing, SiteAdapter
from .config import AdapterConfig, parse_adapter
from .errors import ConfigError, TensorftError
from .registry import adapter_kind
from .topology import ModelShape, Site, find_sites, matches

ROOT_NAME = "tensorft"
FRAME_KWARG = "tensorft_routing"  # how a checkpointed block receives its call's frame


def keep_4bit_weight_trainable(base_layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a CPU 4-bit weight for inference.

    bitsandbytes 0.50 repacks a CPU ``Linear4bit`` weight on its first eval-mode forward and
    then runs every later forward, training ones included, through a kernel with no autograd:
    gradients through the base come out silently wrong (measured: 18% off after one eval
    pass). Adapters train through the base, so keep (or restore) the trainable layout.
    """
    if not hasattr(base_layer, "support_avx512bf16_for_cpu"):
        return
    base_layer.support_avx512bf16_for_cpu = False
    state = getattr(base_layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        base_layer.weight.data, base_layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            base_layer.weight.data, state
        )


class AdaptedLinear(nn.Module):
    """``y = base(x) + s f(x)``: a frozen (possibly 4/8-bit) linear layer plus its adapter."""

    def __init__(self, base_layer: nn.Module, adapter: SiteAdapter, site: Site, state: AdapterState):
        super().__init__()
        keep_4bit_weight_trainable(base_layer)
        self.base_layer = base_layer
        self.adapter = adapter
        self.site = site
        self.merged = False
        self.merged_task: int | None = None
        object.__setattr__(self, "_state", state)  # shared runtime switches, not a submodule

    # Code that reads a projection's weight (dtype checks, tying) sees the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.merged or not self._state.enabled:
            return y
        if self.adapter.adds_into_base_output:
            return self.adapter(x, self._state, base_out=y)
        return y + self.adapter(x, self._state).to(y.dtype)

    def is_quantized(self) -> bool:
        return type(self.base_layer).__module__.startswith("bitsandbytes")

    def check_mergeable(self) -> None:
        if self.is_quantized():
            raise TensorftError(
                f"{self.site.name}: cannot merge into a {type(self.base_layer).__name__} base "
                "(the update would be rounded away by re-quantization); run `tensorft merge`, "
                "which reloads the base in full precision"
            )

    def update_factors(self, task_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` with ``dW = s B A``: the layer's update, or for a task-routed kind the
        update of task ``task_id`` (its evaluation routing)."""
        if task_id is None:
            return self.adapter.lora_factors()
        return self.adapter.task_lora_factors(task_id)

    def _add_to_weight(self, sign: float, task_id: int | None) -> None:
        self.check_mergeable()
        with torch.no_grad():
            w = self.base_layer.weight
            A, B, scale = self.update_factors(task_id)
            dw = (scale * (B.float() @ A.float())).to(device=w.device)
            w.copy_((w.float() + sign * dw).to(w.dtype))

    def merge(self, task_id: int | None = None) -> None:
        if not self.merged:
            self._add_to_weight(+1.0, task_id)
            self.merged = True
            self.merged_task = task_id  # unmerge subtracts the same task's update

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-1.0, self.merged_task)
            self.merged = False


class TensorftRoot(nn.Module):
    """Registered once per model as ``model.tensorft``; owns the shared factors (if any)."""

    def __init__(self, config: AdapterConfig, kind: AdapterKind, shared: nn.Module | None, state: AdapterState):
        super().__init__()
        self.config = config
        self.state = state
        self.shared = shared  # a submodule (or None): its parameters are registered here only
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "layers", {})  # module name -> AdaptedLinear
        object.__setattr__(self, "hook_handles", [])
        object.__setattr__(self, "subclassed", [])  # (module, its class before attach)

    def forward(self, *args, **kwargs):  # pragma: no cover - a container, never called
        raise RuntimeError("model.tensorft is a container")


def root_of(model: nn.Module) -> TensorftRoot:
    root = getattr(unwrap(model), ROOT_NAME, None)
    if not isinstance(root, TensorftRoot):
        raise TensorftError("this model has no tensorft adapters (call tensorft.attach first)")
    return root


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed engine style wrappers (``.module``)."""
    while not hasattr(model, ROOT_NAME) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _as_adapter_config(adapter_config) -> AdapterConfig:
    if isinstance(adapter_config, AdapterConfig):
        if adapter_config.options is None:
            return parse_adapter(adapter_config.to_dict())
        return adapter_config
    if isinstance(adapter_config, dict):
        return parse_adapter(adapter_config)
    raise TypeError(f"adapter_config must be a dict or AdapterConfig, got {type(adapter_config).__name__}")


def _base_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def attach(model: nn.Module, adapter_config) -> nn.Module:
    """Inject adapters into ``model`` in place and return it.

    Base parameters are frozen; adapter parameters (and ``modules_to_save``) are trainable.
    Adapter parameters are kept in float32 whatever the base dtype (as PEFT does), and the
    update is cast to the layer's output dtype.
    """
    cfg = _as_adapter_config(adapter_config)
    if cfg.seed is None:  # no training config's train.seed to inherit: 0, saved as such
        cfg = dataclasses.replace(cfg, seed=0)
    model = unwrap(model)
    if hasattr(model, ROOT_NAME):
        raise TensorftError("model already has tensorft adapters; attach once per model")
    config = getattr(model, "config", None)
    shape = ModelShape.from_config(config) if config is not None else None
    kind_cls = adapter_kind(cfg.kind)
    sites = find_sites(model, cfg.targets)
    kind = kind_cls(cfg, shape)
    kind.check_sites(sites)
    _check_modules_to_save(model, cfg, sites)

    for p in model.parameters():
        p.requires_grad_(False)
    for name in cfg.modules_to_save:
        untie(model, name)  # a saved lm_head trains alone, not the embedding tied to it (as PEFT's copy)

    state = AdapterState()
    device = _base_device(model)
    shared, adapters = _build_adapters(kind, sites, cfg.seed, device)
    root = TensorftRoot(cfg, kind, shared, state)
    for site in sites:
        base = model.get_submodule(site.name)
        layer = AdaptedLinear(base, adapters[site.name], site, state)
        layer.adapter.to(_base_device(base))
        _set_submodule(model, site.name, layer)
        root.layers[site.name] = layer
    model.add_module(ROOT_NAME, root)
    refresh_trainable(model)
    _install_routing(model, root)
    return model


def _build_adapters(kind: AdapterKind, sites: list[Site], seed: int, device: torch.device):
    """The kind's shared factors and per-site adapters, initialized from ``seed`` alone.

    Built on the CPU from the CPU generator seeded with ``seed`` inside a fork of it, then moved
    to ``device``: the same seed gives the same adapter on every device, and no global random
    state changes (the CPU generator is restored on leaving; CUDA's, Python's and NumPy's are
    never touched: ``torch.manual_seed`` would reseed every CUDA generator of the process).
    On the meta device (``tensorft params``) nothing is drawn."""
    build_on = device if device.type == "meta" else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        with torch.device(build_on):
            shared = kind.build_shared(sites)
            adapters = {s.name: kind.build_site(s, shared) for s in sites}
    if shared is not None and device != build_on:
        shared.to(device)  # in place: the sites' references to the shared factors stay valid
    return shared, adapters


def refresh_trainable(model: nn.Module) -> None:
    """``requires_grad`` of every saved adapter parameter from the kind's frozen set (after
    attach, and after a kind replaced parameters, e.g. a few-shot routing row)."""
    saved = adapter_parameters(model)
    frozen = root_of(model).kind.frozen_parameters(unwrap(model), saved)
    for name, p in saved.items():
        p.requires_grad_(name not in frozen)


def untie(model: nn.Module, module_name: str) -> list[str]:
    """Give ``module_name``'s parameters that are shared with another module (tied weights:
    SmolLM2's ``lm_head`` is its embedding) a copy of their own, and stop transformers from
    tying them again (``tie_word_embeddings``): training or merging into that module must not
    change the other. Returns the names of the parameters copied."""
    module = model.get_submodule(module_name)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    copied = []
    for local, p in list(module.named_parameters(recurse=True, remove_duplicate=False)):
        if all(n.startswith(module_name + ".") for n in owners[id(p)]):
            continue  # not shared outside the module
        parent_name, _, attr = local.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        copied.append(f"{module_name}.{local}")
    if copied:
        config = getattr(model, "config", None)
        configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
        for c in configs:
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False  # a saved (merged) model keeps both matrices
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):  # transformers 5: the mapping tie_weights() uses
            plain = {name.replace(".base_layer.", ".") for name in copied}  # the names transformers knows
            for target, source in list(tied.items()):
                if target in plain or source in plain:
                    tied.pop(target)
    return copied


def _check_modules_to_save(model, cfg: AdapterConfig, sites: list[Site]) -> None:
    names = dict(model.named_modules())
    for name in cfg.modules_to_save:
        if name not in names:
            raise ConfigError(f"adapter.modules_to_save: {name!r} is not a module of the model")
        if any(matches(s.name, name) or s.name.startswith(name + ".") for s in sites):
            raise ConfigError(f"adapter.modules_to_save: {name!r} contains adapted layers")


# --------------------------------------------------------------------------- routing runtime


def _install_routing(model: nn.Module, root: TensorftRoot) -> None:
    root.hook_handles.append(model.register_forward_pre_hook(_begin_call, with_kwargs=True))
    root.hook_handles.append(model.register_forward_hook(_end_call, always_call=True))
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [
        module for name, module in model.named_modules()
        if isinstance(module, GradientCheckpointingLayer) and any(s.startswith(name + ".") for s in root.layers)
    ]
    for block in blocks:
        root.hook_handles.append(block.register_forward_pre_hook(_hand_frame_to_block, with_kwargs=True))
        block._tensorft_state = root.state
        _subclass(root, block, _replaying_block_class)
    if hasattr(model, "_validate_model_kwargs"):  # a generation model
        _subclass(root, model, _routing_generation_class)


def _subclass(root: TensorftRoot, module: nn.Module, make) -> None:
    root.subclassed.append((module, type(module)))
    module.__class__ = make(type(module))


_SUBCLASSES: dict[tuple, type] = {}  # one subclass per (maker, class): classes, not state


def _cached_subclass(make):
    def cached(cls: type) -> type:
        key = (make.__name__, cls)
        if key not in _SUBCLASSES:
            sub = make(cls)
            sub.__name__, sub.__qualname__ = cls.__name__, cls.__qualname__  # HF reads class names
            _SUBCLASSES[key] = sub
        return _SUBCLASSES[key]

    return cached


@_cached_subclass
def _replaying_block_class(cls: type) -> type:
    class Replaying(cls):
        # transformers wraps this ``forward`` in the checkpoint, so it runs again at recompute,
        # with the frame ``_hand_frame_to_block`` put in its kwargs the first time.
        def forward(self, *args, **kwargs):
            frame = kwargs.pop(FRAME_KWARG, None)
            if frame is None:
                return super().forward(*args, **kwargs)
            with self._tensorft_state.pushed(frame, call=True):
                return super().forward(*args, **kwargs)

    return Replaying


@_cached_subclass
def _routing_generation_class(cls: type) -> type:
    class Routed(cls):
        def _validate_model_kwargs(self, model_kwargs):
            names = _routing_kwarg_names(root_of(self))
            super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in names})

    return Routed


def _routing_kwarg_names(root: TensorftRoot) -> tuple[str, ...]:
    return ("task_ids", "routing", *root.kind.routing_inputs)


def _hand_frame_to_block(block, args, kwargs):
    return args, {**kwargs, FRAME_KWARG: block._tensorft_state.frame}


def _begin_call(model, args, kwargs):
    root = model.tensorft
    state = root.state
    kwargs = dict(kwargs)
    given = dict(kwargs.pop("routing", None) or {})
    for name in _routing_kwarg_names(root):
        if name in kwargs:
            given[name] = kwargs.pop(name)
    context = state.frame
    frame = Routing({**context.inputs, **{k: v for k, v in given.items() if v is not None}}, context.enabled)
    try:
        inputs = _named_arguments(model, args, kwargs)
        if frame.enabled and not state.preparing:  # the step's own base passes do not re-enter it
            state.preparing = True
            try:
                frame = root.kind.prepare_routing(model, frame, inputs)
            finally:
                state.preparing = False
        _check_rows(frame, inputs)
    except BaseException:
        state.begin_call(frame)  # the forward hook runs even now (always_call) and ends it
        raise
    state.begin_call(frame)
    return args, kwargs


def _end_call(model, args, output):
    model.tensorft.state.end_call()


_SIGNATURES: dict = {}  # forward function -> signature: inspect.signature costs ~0.1-0.3 ms a call


def _forward_signature(model: nn.Module) -> inspect.Signature:
    function = getattr(model.forward, "__func__", None)  # None: a wrapper set on the instance
    if function is None:
        return inspect.signature(model.forward)
    if function not in _SIGNATURES:
        _SIGNATURES[function] = inspect.signature(model.forward)  # bound: without self
    return _SIGNATURES[function]


def _named_arguments(model: nn.Module, args, kwargs) -> dict:
    """The forward's arguments by name (positional ``input_ids`` too), ``**kwargs`` flattened."""
    signature = _forward_signature(model)
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    return {**{k: v for k, v in bound.items() if k != extra}, **bound.get(extra, {})}


def _check_rows(frame: Routing, inputs: dict) -> None:
    rows = inputs.get("input_ids")
    rows = rows if rows is not None else inputs.get("inputs_embeds")
    if rows is None:
        return
    batch = rows.shape[0]
    for name, value in frame.inputs.items():
        # one row (or a scalar) stands for every row; otherwise one per row
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] not in (1, batch):
            raise TensorftError(
                f"routing input {name} has {value.shape[0]} rows but the batch has {batch}; routing inputs "
                "are per row (generate expands them only when passed as named keyword arguments)"
            )


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return dict(root_of(model).layers)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter tensorft saves (trained or frozen), by its name in the model."""
    model = unwrap(model)
    root = root_of(model)
    keep = {id(p) for p in root.parameters()}
    for layer in root.layers.values():
        keep.update(id(p) for p in layer.adapter.parameters())
    for name in root.config.modules_to_save:
        keep.update(id(p) for p in model.get_submodule(name).parameters())
    return {n: p for n, p in model.named_parameters() if id(p) in keep}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The saved parameters less the kind's frozen ones (``AdapterKind.frozen_parameters``)."""
    model = unwrap(model)
    saved = adapter_parameters(model)
    frozen = root_of(model).kind.frozen_parameters(model, saved)
    return {n: p for n, p in saved.items() if n not in frozen}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters that tensorft added or unfroze (frozen saved ones not included)."""
    return sum(p.numel() for p in trainable_parameters(model).values())


@contextlib.contextmanager
def _context(model: nn.Module, **changes) -> Iterator[nn.Module]:
    """Push a context frame: the current one with ``changes`` (``enabled`` or routing inputs)."""
    state = root_of(model).state
    current = state.frame
    enabled = changes.pop("enabled", current.enabled)
    with state.pushed(Routing({**current.inputs, **changes}, enabled), call=False):
        yield model


def disable_adapters(model: nn.Module):
    """Run the base model: ``with tensorft.disable_adapters(model): ...`` (DPO's reference)."""
    if any(layer.merged for layer in root_of(model).layers.values()):
        raise TensorftError("adapters are merged into the base weights; unmerge before disabling them")
    return _context(model, enabled=False)


def routing_context(model: nn.Module, **inputs):
    """Routing inputs (per-row tensors, batch first) for every forward in the block, e.g.
    ``with tensorft.routing_context(model, task_ids=ids, scores=s): ...``. Nested blocks and a
    forward's own keyword arguments override them; leaving the block restores the outer ones."""
    return _context(model, **inputs)


def task_context(model: nn.Module, task_ids):
    """Set the task ids that task-routed kinds read during the enclosed forward passes."""
    return routing_context(model, task_ids=task_ids)


@contextlib.contextmanager
def collect_aux_losses(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``with tensorft.collect_aux_losses(model) as aux: loss = model(...).loss`` then
    ``loss + sum(aux.values())``: the auxiliary losses of every forward in the block, by name."""
    with root_of(model).state.collect_aux() as aux:
        yield aux


def fixed_task(config: AdapterConfig, kind, task: str | int | None, purpose: str) -> int | None:
    """The task id whose fixed update merge / export use (None: the kind's only update).

    A task-routed kind needs a task (a name from ``adapter_config.json``'s ``tasks``); a static
    kind refuses one and must be mergeable (``purpose``: "merge" or "export"). ``kind``: the
    kind's class or instance, so the CLI checks before loading any weight."""
    task_id = config.task_id(task)
    if task_id is None:
        (kind.ensure_mergeable if purpose == "merge" else kind.ensure_exportable)()
    return task_id


def expert_id(kind, expert: str) -> int:
    """The id of a mixture-of-experts kind's expert (ttmoe: ``--expert NAME``)."""
    lookup = getattr(kind, "expert_id", None)
    if lookup is None:
        raise TensorftError(f"adapter kind {kind.name!r} has no experts; drop --expert")
    return lookup(expert)


def merge(model: nn.Module, task: str | int | None = None, expert: str | None = None) -> nn.Module:
    """Add every update into its base weight (forward then skips the adapter path).

    ``task``: for a task-routed kind, the task whose rank-r LoRA is merged (exact: the model
    then computes what the adapter computes with that task id). ``expert``: for ttmoe, the one
    expert merged (what its own tt adapter merges). An adapted layer whose weight is tied to
    another module's (``lm_head`` and the embedding) gets its own copy first: the update
    belongs to that layer only."""
    root = root_of(model)
    task_id = expert_id(root.kind, expert) if expert is not None else fixed_task(root.config, root.kind, task, "merge")
    for layer in root.layers.values():
        layer.check_mergeable()  # all or nothing: fail before any weight changed
    for name, layer in root.layers.items():
        if not layer.merged:
            untie(unwrap(model), f"{name}.base_layer")
    for layer in root.layers.values():
        layer.merge(task_id)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in root_of(model).layers.values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, task: str | int | None = None, expert: str | None = None) -> nn.Module:
    """Merge (``task``, ``expert``: as in :func:`merge`), then put the plain base layers back and
    drop tensorft: a dense HF model."""
    model = unwrap(model)
    merge(model, task, expert)
    root = root_of(model)
    if expert is not None and hasattr(root.kind, "expert_modules"):  # ttmoe seq-cls: the expert's own head
        with torch.no_grad():
            for name, t in root.kind.expert_modules(model, expert_id(root.kind, expert)).items():
                model.get_parameter(name).copy_(t)
    for name, layer in root.layers.items():
        _set_submodule(model, name, layer.base_layer)
    for handle in root.hook_handles:
        handle.remove()
    for module, cls in root.subclassed:
        module.__class__ = cls
        module.__dict__.pop("_tensorft_state", None)
    del model._modules[ROOT_NAME]
    return model
