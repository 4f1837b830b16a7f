"""tensorft: fine-tuning LLMs with tensor-factorized adapters.

Public API::

    tensorft.attach(model, {"kind": "cp", "rank": 4, "targets": ["q_proj", "v_proj"]})
    tensorft.save(model, "out/adapter")
    model = tensorft.from_pretrained("out/adapter")
    with tensorft.disable_adapters(model): ...       # the base model (DPO reference)
    tensorft.merge(model); tensorft.unmerge(model)
    tensorft.export_peft(model, "out/peft")          # a standard PEFT LoRA adapter
"""

__version__ = "0.1.0"

from .config import AdapterConfig, Config, ModelConfig, load_config  # noqa: E402
from .errors import ConfigError, TensorftError  # noqa: E402
from .model import (  # noqa: E402
    adapter_parameters,
    attach,
    count_parameters,
    disable_adapters,
    merge,
    merge_and_unload,
    task_context,
    unmerge,
)
from .registry import adapter_kind, adapter_kinds, register_adapter  # noqa: E402
from .saving import from_pretrained, load_adapter_weights, save  # noqa: E402
from .export import export_peft  # noqa: E402

__all__ = [
    "AdapterConfig",
    "Config",
    "ConfigError",
    "ModelConfig",
    "TensorftError",
    "__version__",
    "adapter_kind",
    "adapter_kinds",
    "adapter_parameters",
    "attach",
    "count_parameters",
    "disable_adapters",
    "export_peft",
    "from_pretrained",
    "load_adapter_weights",
    "load_config",
    "merge",
    "merge_and_unload",
    "register_adapter",
    "save",
    "task_context",
    "unmerge",
]
