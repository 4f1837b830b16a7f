"""Model glue: wrap target layers, hold the shared factors, switch adapters off, merge.

``attach`` replaces each target linear layer by an :class:`AdaptedLinear` (base layer + the
kind's :class:`SiteAdapter`) and registers one :class:`TensorftRoot` at ``model.tensorft``
holding the config, the shared factors of kinds that have them, and the runtime
:class:`AdapterState` that every adapted layer reads (on/off switch, task ids, routing inputs).
The model object stays a Hugging Face model, so transformers and trl trainers take it as is.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .adapters.base import AdapterKind, AdapterState, SiteAdapter
from .config import AdapterConfig, parse_adapter
from .errors import ConfigError, TensorftError
from .registry import adapter_kind
from .topology import ModelShape, Site, find_sites, matches

ROOT_NAME = "tensorft"


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

    def _add_to_weight(self, sign: float) -> None:
        self.check_mergeable()
        with torch.no_grad():
            w = self.base_layer.weight
            dw = self.adapter.delta_weight().to(device=w.device, dtype=torch.float32)
            w.copy_((w.float() + sign * dw).to(w.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-1.0)
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

    state = AdapterState()
    device = _base_device(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            shared = kind.build_shared(sites)
            adapters = {s.name: kind.build_site(s, shared) for s in sites}
    root = TensorftRoot(cfg, kind, shared, state)
    for site in sites:
        base = model.get_submodule(site.name)
        layer = AdaptedLinear(base, adapters[site.name], site, state)
        layer.adapter.to(_base_device(base))
        _set_submodule(model, site.name, layer)
        root.layers[site.name] = layer
    model.add_module(ROOT_NAME, root)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    # ``model(..., task_ids=...)``: routed kinds read task ids from the shared state; the hook
    # takes the argument off before the Hugging Face forward sees it.
    root.hook_handles.append(model.register_forward_pre_hook(_take_task_ids, with_kwargs=True))
    root.hook_handles.append(model.register_forward_hook(_clear_task_ids, always_call=True))
    return model


def _check_modules_to_save(model, cfg: AdapterConfig, sites: list[Site]) -> None:
    names = dict(model.named_modules())
    for name in cfg.modules_to_save:
        if name not in names:
            raise ConfigError(f"adapter.modules_to_save: {name!r} is not a module of the model")
        if any(matches(s.name, name) or s.name.startswith(name + ".") for s in sites):
            raise ConfigError(f"adapter.modules_to_save: {name!r} contains adapted layers")


def _take_task_ids(module, args, kwargs):
    if "task_ids" in kwargs:
        kwargs = dict(kwargs)
        state = module.tensorft.state
        state.task_ids = kwargs.pop("task_ids")
        state.task_ids_from_forward = True
        return args, kwargs
    return None


def _clear_task_ids(module, args, output):
    state = module.tensorft.state
    if state.task_ids_from_forward:
        state.task_ids, state.task_ids_from_forward = None, False
    return None


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return dict(root_of(model).layers)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter tensorft trains or saves, by its name in the model."""
    model = unwrap(model)
    root = root_of(model)
    keep = {id(p) for p in root.parameters()}
    for layer in root.layers.values():
        keep.update(id(p) for p in layer.adapter.parameters())
    for name in root.config.modules_to_save:
        keep.update(id(p) for p in model.get_submodule(name).parameters())
    return {n: p for n, p in model.named_parameters() if id(p) in keep}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters that tensorft added or unfroze."""
    return sum(p.numel() for p in adapter_parameters(model).values())


@contextlib.contextmanager
def _state_set(model: nn.Module, **values) -> Iterator[nn.Module]:
    """Set fields of the model's AdapterState for the enclosed block, then restore them."""
    state = root_of(model).state
    previous = {key: getattr(state, key) for key in values}
    for key, value in values.items():
        setattr(state, key, value)
    try:
        yield model
    finally:
        for key, value in previous.items():
            setattr(state, key, value)


def disable_adapters(model: nn.Module):
    """Run the base model: ``with tensorft.disable_adapters(model): ...`` (DPO's reference)."""
    if any(layer.merged for layer in root_of(model).layers.values()):
        raise TensorftError("adapters are merged into the base weights; unmerge before disabling them")
    return _state_set(model, enabled=False)


def task_context(model: nn.Module, task_ids):
    """Set the task ids that task-routed kinds read during the enclosed forward passes."""
    return _state_set(model, task_ids=task_ids)


def merge(model: nn.Module) -> nn.Module:
    """Add every update into its base weight (forward then skips the adapter path)."""
    root = root_of(model)
    root.kind.ensure_mergeable()
    for layer in root.layers.values():
        layer.check_mergeable()  # all or nothing: fail before any weight changed
    for layer in root.layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in root_of(model).layers.values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back and drop tensorft: a dense HF model."""
    model = unwrap(model)
    merge(model)
    root = root_of(model)
    for name, layer in root.layers.items():
        _set_submodule(model, name, layer.base_layer)
    for handle in root.hook_handles:
        handle.remove()
    del model._modules[ROOT_NAME]
    return model
