"""Moved to ``tensorft.evaluation.rank_classification``; this name keeps old imports working."""

import sys

from tensorft.evaluation import rank_classification as _module

sys.modules[__name__] = _module
