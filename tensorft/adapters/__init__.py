"""Built-in adapter kinds; importing this package registers them."""

from . import cp, lora, tt  # noqa: F401
