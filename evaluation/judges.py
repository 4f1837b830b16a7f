"""Moved to ``tensorft.evaluation.judges``; this name keeps old imports working."""

import sys

from tensorft.evaluation import judges as _module

sys.modules[__name__] = _module
