"""Learning-quality benchmark of issue 8 (``python -m bench.learning_quality --help``).

``tasks``: offline multiple-choice tasks with fixed splits; ``methods``: the adapter registry;
``engine``: training and rank-classification evaluation; ``protocol``: runs, resume, lr choice
on dev, summary and the report tool's inputs.
"""
