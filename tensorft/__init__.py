"""tensorft: fine-tuning LLMs with tensor-factorized adapters.

Public API::

    tensorft.attach(model, {"kind": "cp", "rank": 4, "targets": ["q_proj", "v_proj"]})
    tensorft.save(model, "out/adapter")
    model = tensorft.from_pretrained("out/adapter")
    with tensorft.disable_adapters(model): ...       # the base model (DPO reference)
    model(ids, task_ids=t); with tensorft.routing_context(model, task_ids=t): ...  # routed kinds
    tensorft.merge(model); tensorft.unmerge(model)
    tensorft.export_peft(model, "out/peft")          # a standard PEFT LoRA adapter
"""

__version__ = "0.1.0"

from .config import AdapterConfig, Config, ModelConfig, load_config  # noqa: E402
from .errors import ConfigError, TensorftError  # noqa: E402
from .model import (  # noqa: E402
    adapter_parameters,
    attach,
    collect_aux_losses,
    count_parameters,
    disable_adapters,
    merge,
    merge_and_unload,
    routing_context,
    task_context,
    trainable_parameters,
    unmerge,
)
from .adapters.base import Routing  # noqa: E402
from .registry import adapter_kind, adapter_kinds, register_adapter  # noqa: E402
from .saving import from_pretrained, load_adapter_weights, save  # noqa: E402
from .export import export_peft  # noqa: E402
from .optim import optimizer_groups  # noqa: E402

__all__ = [
    "AdapterConfig",
    "Routing",
    "Config",
    "ConfigError",
    "ModelConfig",
    "TensorftError",
    "__version__",
    "adapter_kind",
    "adapter_kinds",
    "adapter_parameters",
    "attach",
    "collect_aux_losses",
    "count_parameters",
    "disable_adapters",
    "export_peft",
    "from_pretrained",
    "load_adapter_weights",
    "load_config",
    "merge",
    "merge_and_unload",
    "optimizer_groups",
    "register_adapter",
    "routing_context",
    "save",
    "task_context",
    "trainable_parameters",
    "unmerge",
]
