"""The evaluation tools now live in the package, ``tensorft.evaluation`` (installed with it; run
them as ``tensorft eval``, ``tensorft mt-bench``, ``tensorft report``, ...). The modules here
keep ``python -m evaluation.<tool>`` and ``from evaluation import <tool>`` working from a
checkout: each one is the package's module under its old name (the same module object, so
monkeypatching either name patches both). ``evaluation/tasks`` links to the shipped task
YAMLs (``tensorft/evaluation/tasks``)."""
