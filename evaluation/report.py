"""Moved to ``tensorft.evaluation.report``; this name keeps ``python -m evaluation.report`` and old imports working."""

import sys

from tensorft.evaluation import report as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
