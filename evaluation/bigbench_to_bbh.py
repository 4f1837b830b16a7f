"""Moved to ``tensorft.evaluation.bigbench_to_bbh``; this name keeps ``python -m evaluation.bigbench_to_bbh`` and old imports working."""

import sys

from tensorft.evaluation import bigbench_to_bbh as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
