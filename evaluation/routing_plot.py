"""Moved to ``tensorft.evaluation.routing_plot``; this name keeps ``python -m evaluation.routing_plot`` and old imports working."""

import sys

from tensorft.evaluation import routing_plot as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
