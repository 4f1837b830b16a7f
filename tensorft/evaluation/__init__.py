"""Evaluation tools for tensorft adapters, shipped with the package.

Run them through the ``tensorft`` command: ``tensorft eval`` (lm-eval, :mod:`.lm_eval`),
``tensorft mt-bench`` (:mod:`.mt_bench`), ``tensorft report`` (:mod:`.report`),
``tensorft routing-plot``, ``tensorft expert-usage-plot`` and ``tensorft bigbench-to-bbh``;
or as ``python -m tensorft.evaluation.<module>``. The offline lm-eval task YAMLs live in
``tasks/`` beside this file (``tensorft eval`` always includes them). lm-eval and matplotlib
are optional: ``pip install 'tensorft[eval]'`` / ``'tensorft[plot]'``.
"""
