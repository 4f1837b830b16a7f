"""The one registry of adapter kinds.

Each kind lives in its own module under ``tensorft/adapters`` and registers itself with
``@register_adapter("name")``. Everything else (attach, save, merge, export, the CLI) looks
kinds up here, so adding a kind never means editing a chain of ``if kind == ...``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .adapters.base import AdapterKind

_ADAPTERS: dict[str, type["AdapterKind"]] = {}


def register_adapter(name: str):
    """Class decorator: make an :class:`AdapterKind` available as ``adapter.kind: name``."""

    def wrap(cls):
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"adapter kind {name!r} is registered twice")
        cls.name = name
        _ADAPTERS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    # Importing the package registers the built-in kinds.
    from . import adapters  # noqa: F401


def adapter_kind(name: str) -> type["AdapterKind"]:
    _load_builtin()
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ConfigError(
            f"adapter.kind: unknown kind {name!r} (known: {', '.join(sorted(_ADAPTERS))})"
        ) from None


def adapter_kinds() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)
