"""Moved to ``tensorft.evaluation.lm_eval``; this name keeps ``python -m evaluation.lm_eval`` and old imports working."""

import sys

from tensorft.evaluation import lm_eval as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
