"""Heatmap of a task-routed adapter's routing weights (the TensorPoly paper's figure 6).

    tensorft routing-plot ADAPTER_DIR --out routing.png

One panel per task; in each, a column per adapted matrix (by layer, then in the order of
``adapter.targets``)
and a row per expert: the evaluation routing weights ``alpha = sigmoid(Z[t]) / sum`` that the
forward uses (normalised over the experts of each routing group: MHR heads and TensorPoly-II
orders are groups of rows, ``h.e`` in the labels). Only the adapter's saved tensors are read;
the base model is never loaded. Bad input ends with one line ``tensorft: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

import torch

LOGITS_SUFFIX = ".adapter.routing_logits"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the tensorft command does
        self.exit(2, f"tensorft: error: {message}\n")


@dataclass
class RoutingWeights:
    """``weights[t, e, m]``: task t, expert row e (groups flattened), adapted matrix m."""

    weights: torch.Tensor
    tasks: list[str]
    matrices: list[str]  # module names, model order
    experts: list[str]  # row labels


@dataclass
class _SavedSite:
    """What ``RoutedSite.mixing_weights`` reads, from the saved tensors: the plot then uses the
    forward's own evaluation routing without building the model."""

    routing_logits: torch.Tensor
    temperature: float = 1.0


def _column_key(name: str, targets: list[str]):
    """Layer number, then the config's target order (q, k, v, o, ... as users list them)."""
    layer = re.search(r"\.(\d+)\.", name)
    module = name[: -len(LOGITS_SUFFIX)]
    target = next((i for i, t in enumerate(targets) if module == t or module.endswith("." + t)), len(targets))
    return (int(layer.group(1)) if layer else -1, target, name)


def routing_weights(adapter_dir: str) -> RoutingWeights:
    """Every task's evaluation routing weights per adapted matrix, from ``adapter_dir``."""
    from safetensors.torch import load_file

    from tensorft.adapters.task_routed import RoutedSite
    from tensorft.errors import TensorftError
    from tensorft.saving import WEIGHTS_NAME, read_adapter_config

    adapter, _, _ = read_adapter_config(adapter_dir)
    if not adapter.routed:
        raise TensorftError(f"{adapter_dir}: kind {adapter.kind} is not task-routed; it has no routing weights")
    saved = load_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    names = sorted((n for n in saved if n.endswith(LOGITS_SUFFIX)), key=lambda n: _column_key(n, adapter.targets))
    logits = [saved[n].float() for n in names]
    tasks = adapter.tasks or [str(i) for i in range(logits[0].shape[0])]
    ids = torch.arange(len(tasks))
    with torch.no_grad():
        per_matrix = [RoutedSite.mixing_weights(_SavedSite(z), ids, sample=False).reshape(len(tasks), -1) for z in logits]
    groups, experts = logits[0].shape[1:-1].numel(), logits[0].shape[-1]
    labels = [f"{g}.e{k}" if groups > 1 else f"e{k}" for g in range(groups) for k in range(experts)]
    return RoutingWeights(torch.stack(per_matrix, dim=-1), tasks, [n[: -len(LOGITS_SUFFIX)] for n in names], labels)


def _layer_starts(matrices: list[str]) -> list[tuple[int, str]]:
    """(column, layer number) where each layer's matrices start (module names hold ``.N.``)."""
    starts, last = [], None
    for i, name in enumerate(matrices):
        match = re.search(r"\.(\d+)\.", name)
        layer = match.group(1) if match else name
        if layer != last:
            starts.append((i, layer))
            last = layer
    return starts


def draw(routing: RoutingWeights):
    """The figure: one heatmap panel per task, a shared colour scale."""
    from tensorft.extras import require

    matplotlib = require("matplotlib", "the heatmap")

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    n_tasks, n_experts, n_matrices = routing.weights.shape
    width = min(4 + 0.12 * n_matrices, 30)
    height = 1 + (1.0 + 0.22 * n_experts) * n_tasks
    fig, axes = plt.subplots(n_tasks, 1, figsize=(width, height), squeeze=False, layout="constrained")
    vmax = float(routing.weights.max())
    starts = _layer_starts(routing.matrices)
    for ax, task, weights in zip(axes[:, 0], routing.tasks, routing.weights):
        image = ax.imshow(weights.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"task {task}", fontsize=9, loc="left")
        ax.set_yticks(range(n_experts), routing.experts, fontsize=6)
        ax.set_xticks([c for c, _ in starts], [layer for _, layer in starts], fontsize=6)
        for column, _ in starts[1:]:
            ax.axvline(column - 0.5, color="white", linewidth=0.5)
    axes[-1, 0].set_xlabel("layer (one column per adapted matrix)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="routing weight", shrink=0.8)
    return fig


def plot(adapter_dir: str, out: str) -> RoutingWeights:
    """Write the heatmap of ``adapter_dir`` to ``out`` (PNG); returns the plotted weights."""
    from tensorft.saving import atomic_file

    routing = routing_weights(adapter_dir)
    fig = draw(routing)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    return routing


def main(argv: list[str] | None = None, prog: str = "tensorft routing-plot") -> int:
    from tensorft.errors import TensorftError

    parser = _Parser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("adapter_dir", help="a task-routed tensorft adapter directory")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        plot(args.adapter_dir, args.out)
    except TensorftError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2
    print(f"routing heatmap written to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
