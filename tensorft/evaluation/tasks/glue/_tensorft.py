"""lm-eval resolves ``!function _tensorft.<name>`` next to the YAML file: load the shared helpers."""
import importlib.util as _util
import os as _os
import sys as _sys

_PATH = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), '../_tensorft.py')
_module = _sys.modules.get("_tensorft_tasks")
if _module is None:
    _spec = _util.spec_from_file_location("_tensorft_tasks", _PATH)
    _module = _util.module_from_spec(_spec)
    _sys.modules["_tensorft_tasks"] = _module
    _spec.loader.exec_module(_module)


def __getattr__(name):
    return getattr(_module, name)
