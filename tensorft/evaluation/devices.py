"""The device an evaluation command runs on: cuda when there is one, else cpu; a device this
machine does not have is one line (``TensorftError``), not a traceback from deep in torch."""

from __future__ import annotations

from tensorft.errors import TensorftError


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if this machine has it (returned unchanged)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise TensorftError(f"{flag} {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise TensorftError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise TensorftError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise TensorftError(f"{flag} {device}: MPS is not available on this machine; use {flag} cpu")
    return device
