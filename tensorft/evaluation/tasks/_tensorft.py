"""Helpers the task YAMLs under ``tensorft/evaluation/tasks`` (shipped with the package;
``evaluation/tasks`` in a checkout links here) name with ``!function _tensorft.<name>``.

lm-eval looks such names up in a ``_tensorft.py`` next to the YAML file; the folders below this
one hold a small shim of that name (written by ``tensorft bigbench-to-bbh``) that loads this
file by path, so the plain ``lm_eval`` command (``--include_path`` this folder) finds the
helpers from any working directory; they need ``tensorft`` installed, nothing else on
``sys.path``.

* ``local_dataset``: the ``custom_dataset`` of the offline tasks. ``dataset_kwargs.data_files``
  maps split names to files (.jsonl, .json, .csv, .parquet); relative paths are resolved against
  the data directory: ``--metadata data_dir=DIR``, else ``$TENSORFT_EVAL_DATA``, else
  ``evaluation/data`` of the repository checkout tensorft runs from, else (an installed
  package) ``evaluation/data`` under the working directory. Splits listed in ``dataset_kwargs.optional`` may be
  missing and are then empty (lm-eval opens the training split even for zero-shot runs; it is
  only read for few-shot examples).
* ``RankClassificationTask``: multiple-choice tasks that also report ``acc_norm_tok``
  (``tensorft/evaluation/rank_classification.py``).
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def default_data_dir() -> str:
    """``evaluation/data`` of the checkout this file lies in (``<checkout>/tensorft/evaluation/tasks``),
    else (installed in site-packages) ``evaluation/data`` under the working directory."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(HERE))))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")) and os.path.isdir(os.path.join(checkout, "evaluation")):
        return os.path.join(checkout, "evaluation", "data")
    return os.path.abspath(os.path.join("evaluation", "data"))

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_data_dir(data_dir: str | None = None) -> str:
    return data_dir or os.environ.get("TENSORFT_EVAL_DATA") or default_data_dir()


def local_dataset(data_files: dict | None = None, data_dir: str | None = None, optional=(), **_metadata):
    """A ``datasets.DatasetDict`` with one split per entry of ``data_files``."""
    import datasets

    from tensorft.errors import TensorftError

    if not isinstance(data_files, dict) or not data_files:
        raise TensorftError("local task: dataset_kwargs.data_files must map split names to files")
    root = resolve_data_dir(data_dir)
    splits = {}
    for split, path in data_files.items():
        path = os.path.join(root, os.path.expanduser(path))
        if not os.path.isfile(path) and split in optional:
            splits[split] = datasets.Dataset.from_dict({})
            continue
        if not os.path.isfile(path):
            raise TensorftError(
                f"{path}: missing local data for split {split!r} (set --metadata data_dir=DIR or "
                "$TENSORFT_EVAL_DATA; see evaluation/README.md for the layout)"
            )
        builder = FORMATS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise TensorftError(f"{path}: unsupported format (use {', '.join(sorted(FORMATS))})")
        splits[split] = datasets.load_dataset(builder, data_files=path, split="train")
    return datasets.DatasetDict(splits)


def _rank_classification():
    # The package's module (tensorft is installed wherever lm-eval runs these tasks), so its
    # metric is registered once per process.
    import importlib

    return importlib.import_module("tensorft.evaluation.rank_classification")


def __getattr__(name):  # imported on first use: lm-eval and torch stay out of plain data loading
    if name == "RankClassificationTask":
        return _rank_classification().RankClassificationTask
    raise AttributeError(name)
