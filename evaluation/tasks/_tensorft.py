"""Helpers the task YAMLs under ``evaluation/tasks`` name with ``!function _tensorft.<name>``.

lm-eval looks such names up in a ``_tensorft.py`` next to the YAML file; the folders below this
one hold a small shim of that name (written by ``evaluation/bigbench_to_bbh.py``) that loads
this file by path, so the plain ``lm_eval`` command finds the helpers from any working
directory, without ``evaluation`` on ``sys.path``.

* ``local_dataset``: the ``custom_dataset`` of the offline tasks. ``dataset_kwargs.data_files``
  maps split names to files (.jsonl, .json, .csv, .parquet); relative paths are resolved against
  the data directory: ``--metadata data_dir=DIR``, else ``$TENSORFT_EVAL_DATA``, else
  ``evaluation/data`` of this repository. Splits listed in ``dataset_kwargs.optional`` may be
  missing and are then empty (lm-eval opens the training split even for zero-shot runs; it is
  only read for few-shot examples).
* ``RankClassificationTask``: multiple-choice tasks that also report ``acc_norm_tok``
  (``evaluation/rank_classification.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(HERE), "data")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_data_dir(data_dir: str | None = None) -> str:
    return data_dir or os.environ.get("TENSORFT_EVAL_DATA") or DEFAULT_DATA_DIR


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
    # Reuse the module if the process already imported it, so its metric is registered once.
    module = sys.modules.get("evaluation.rank_classification") or sys.modules.get("_tensorft_rank_classification")
    if module is None:
        path = os.path.join(os.path.dirname(HERE), "rank_classification.py")
        spec = importlib.util.spec_from_file_location("_tensorft_rank_classification", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def __getattr__(name):  # imported on first use: lm-eval and torch stay out of plain data loading
    if name == "RankClassificationTask":
        return _rank_classification().RankClassificationTask
    raise AttributeError(name)
