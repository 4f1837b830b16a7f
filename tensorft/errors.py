"""User-facing errors.

A :class:`TensorftError` is a problem with the user's input (config, data, an impossible
combination). The command-line entry points print its one-line message and exit with code 2;
library callers get an ordinary exception they can catch.
"""


class TensorftError(Exception):
    """Bad input or an impossible request; the message names the problem and where it is."""


class ConfigError(TensorftError, ValueError):
    """A config key is unknown, missing or holds an invalid value."""
