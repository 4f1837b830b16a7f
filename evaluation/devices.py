"""Moved to ``tensorft.evaluation.devices``; this name keeps old imports working."""

import sys

from tensorft.evaluation import devices as _module

sys.modules[__name__] = _module
