"""Moved to ``tensorft.evaluation.mt_bench``; this name keeps ``python -m evaluation.mt_bench`` and old imports working."""

import sys

from tensorft.evaluation import mt_bench as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
