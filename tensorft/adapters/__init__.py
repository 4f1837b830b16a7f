"""Built-in adapter kinds; importing this package registers them."""

from . import cp, lora, poly, tensorpoly, trex, tt, ttmoe  # noqa: F401
