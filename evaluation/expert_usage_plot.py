"""Moved to ``tensorft.evaluation.expert_usage_plot``; this name keeps ``python -m evaluation.expert_usage_plot`` and old imports working."""

import sys

from tensorft.evaluation import expert_usage_plot as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
