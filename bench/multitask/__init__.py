"""Multi-task benchmark (issue 9): one adapter trained on a mixture of real tasks, then
held-out accuracy per task with each task's own routing. Built on bench/learning_quality
(its task loaders, splits, training loop, rank-classification evaluation and lr protocol);
the CLI is ``python -m bench.multitask``.
"""
