"""User-facing errors.

A :class:`TensorftError` is a problem with the user's input (config, data, an impossible
combination). The command-line entry points print its one-line message and exit with code 2;
library callers get an ordinary exception they can catch.
"""


class TensorftError(Exception):
    """Bad input or an impossible request; the message names the problem and where it is."""


class ConfigError(TensorftError, ValueError):
    """A config key is unknown, missing or holds an invalid value."""


def report_error(message: str) -> None:
    """Print ``tensorft: error: <message>`` on stderr, and under torchrun (torchelastic) also into
    the worker's error file, so that torchrun's failure summary, the last thing a user sees,
    names the failing rank's own error instead of "error_file: <N/A>" and a link to its docs."""
    import json
    import os
    import sys
    import time

    line = f"tensorft: error: {message}"
    print(line, file=sys.stderr)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:  # torchelastic's format: a plain message and its time
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the summary then falls back to torchrun's own text; the line above stands
