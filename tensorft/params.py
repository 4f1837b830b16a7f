"""Parameter accounting: a table per adapted module kind, for ``tensorft params``."""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from .model import root_of, unwrap


def parameter_table(model: nn.Module) -> tuple[list[tuple[str, int, str, int]], int]:
    """Rows ``(module kind, count, shape, adapter params)`` and the total trainable count.

    A kind with shared factors (CP) gets one row per shared tensor; its per-layer rows then
    hold no parameters of their own.
    """
    model = unwrap(model)
    root = root_of(model)
    by_target: dict[str, list] = defaultdict(list)
    for layer in root.layers.values():
        by_target[layer.site.target].append(layer)
    rows = []
    for target, layers in by_target.items():
        own = sum(p.numel() for layer in layers for p in layer.adapter.parameters())
        rows.append((target, len(layers), root.kind.describe_site(layers[0].site), own))
    if root.shared is not None:
        for name, p in root.shared.named_parameters():
            rows.append((f"shared {name}", 1, "x".join(map(str, p.shape)), p.numel()))
    for name in root.config.modules_to_save:
        module = model.get_submodule(name)
        rows.append((f"saved {name}", 1, type(module).__name__, sum(p.numel() for p in module.parameters())))
    total = sum(r[3] for r in rows)
    return rows, total


def format_table(rows, total: int, base_params: int) -> str:
    header = ("module", "count", "shape", "params")
    cells = [header] + [(a, str(b), c, f"{d:,}") for a, b, c, d in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = []
    for i, r in enumerate(cells):
        lines.append(
            "  ".join(
                r[j].rjust(widths[j]) if j in (1, 3) else r[j].ljust(widths[j]) for j in range(4)
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    share = 100.0 * total / base_params if base_params else 0.0
    lines.append(f"base model parameters: {base_params:,} (adapter = {share:.4f}% of it)")
    lines.append(f"trainable parameters: {total}")
    return "\n".join(lines)
