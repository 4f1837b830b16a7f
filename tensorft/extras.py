"""Optional dependencies ("extras"): which one a missing module belongs to, and the one line
that says what to install.

``pip install tensorft`` brings what training with the adapter core needs (torch,
transformers, peft, trl, datasets, accelerate, safetensors, tensorboard); the rest is opt-in:

=============  ==============================  =========================================
extra          packages                        needed for
=============  ==============================  =========================================
deepspeed      deepspeed                       ``distributed.strategy: deepspeed``
quant          bitsandbytes                    ``model.quantization: nf4 | fp4 | int8``
eval           lm-eval                         ``tensorft eval``, the offline task YAMLs
plot           matplotlib                      ``tensorft report`` / ``routing-plot`` / ``expert-usage-plot``
all            every one of the above
=============  ==============================  =========================================
"""

from __future__ import annotations

import importlib

from .errors import TensorftError

# top-level module -> (extra, pip package)
EXTRAS = {
    "deepspeed": ("deepspeed", "deepspeed"),
    "bitsandbytes": ("quant", "bitsandbytes"),
    "lm_eval": ("eval", "lm-eval"),
    "matplotlib": ("plot", "matplotlib"),
}


class MissingExtra(TensorftError):
    """An optional dependency is not installed (the message names the extra)."""


def message(module: str, purpose: str | None = None) -> str:
    extra, package = EXTRAS[module]
    why = f"{purpose} needs {package}" if purpose else f"{package} is not installed"
    return f"{why}; install it with: pip install 'tensorft[{extra}]'"


def require(module: str, purpose: str | None = None):
    """Import optional ``module`` (a key of :data:`EXTRAS`), or raise :class:`MissingExtra`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if _top(getattr(e, "name", None)) != module:
            raise  # something inside the installed package is broken: not a missing extra
        raise MissingExtra(message(module, purpose)) from None


def available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(error: BaseException) -> str | None:
    """The one-line message for an ImportError of an optional dependency (None otherwise)."""
    if isinstance(error, MissingExtra):
        return str(error)
    if isinstance(error, ImportError):
        top = _top(getattr(error, "name", None))
        if top in EXTRAS:
            return message(top)
    return None


def check_config(cfg) -> None:
    """Before anything loads: the extras a training config needs are installed."""
    if getattr(cfg.distributed, "strategy", None) == "deepspeed" and not available("deepspeed"):
        raise MissingExtra(message("deepspeed", "distributed.strategy: deepspeed"))
    quant = getattr(cfg.model, "quantization", "none")
    if quant not in (None, "none") and not available("bitsandbytes"):
        raise MissingExtra(message("bitsandbytes", f"model.quantization: {quant}"))


def _top(name: str | None) -> str | None:
    return name.split(".")[0] if name else None
