"""Heatmap of a T-REX adapter's expert usage per layer (router health).

    tensorft expert-usage-plot ADAPTER_DIR --out usage.png [--data FILE --format F] [--limit N] [--base DIR]

A row per adapted matrix (by layer, then in the order of ``adapter.targets``), a column per
rank-one expert ``(i, j)``: the mean routing probability ``G_ij / K`` over the tokens seen
(each row sums to 1; uniform use is 1/K, and each row's normalised entropy is printed in its
label). With ``--data``, the adapter is loaded (``tensorft.from_pretrained``) and run on the
prompts of that file (any ``data.format``; intuition computed from each prompt as at
inference); without it, the usage of the last training log in ``ADAPTER_DIR/metrics.jsonl``
(``router/usage``, written by the launcher) is drawn, and the base model is never loaded.
``--base DIR`` loads the adapter's base model from ``DIR`` instead of the recorded place.
Bad input ends with one line ``tensorft: error: ...``, exit 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the tensorft command does
        self.exit(2, f"tensorft: error: {message}\n")


def _order(name: str, targets: list[str]):
    layer = re.search(r"\.(\d+)\.", name)
    target = next((i for i, t in enumerate(targets) if name == t or name.endswith("." + t)), len(targets))
    return (int(layer.group(1)) if layer else -1, target, name)


def usage_from_metrics(adapter_dir: str) -> tuple[dict[str, list[float]], str]:
    from tensorft.errors import TensorftError

    path = os.path.join(adapter_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise TensorftError(f"{adapter_dir}: no metrics.jsonl with router usage here; pass --data FILE to measure it")
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("router/usage"):
                last = row
    if last is None:
        raise TensorftError(f"{path}: no router/usage logged (not a T-REX run?); pass --data FILE to measure it")
    return last["router/usage"], f"training step {last['step']}"


def usage_from_data(adapter_dir: str, data: str, fmt: str, limit: int, batch_size: int = 8, base: str | None = None):
    from transformers import AutoTokenizer

    import tensorft
    from tensorft.adapters.trex import expert_usage
    from tensorft.data import read_rows
    from tensorft.intuition import prompt_text
    from tensorft.saving import read_adapter_config

    _, model_cfg, _ = read_adapter_config(adapter_dir)
    overrides = {"name_or_path": base} if base else {}
    model = tensorft.from_pretrained(adapter_dir, **overrides).eval()
    tok = AutoTokenizer.from_pretrained(base or model_cfg.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [prompt_text(row, tok) for row in read_rows(data, fmt, "--data", limit)]
    batches = [
        dict(tok(texts[i : i + batch_size], return_tensors="pt", padding=True)) for i in range(0, len(texts), batch_size)
    ]
    return expert_usage(model, batches), f"{len(texts)} prompts of {os.path.basename(data)}"


def draw(usage: dict[str, list[float]], targets: list[str], title: str, I: int, J: int):
    from tensorft.extras import require

    matplotlib = require("matplotlib", "the heatmap")

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted(usage, key=lambda n: _order(n, targets))
    values = np.array([usage[n] for n in names])
    k = values.shape[1]
    entropy = -(values * np.log(np.clip(values, 1e-12, None))).sum(1) / math.log(k) if k > 1 else np.ones(len(names))
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * k, 24), 1.5 + 0.18 * len(names)), layout="constrained")
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(len(names)), [f"{n}  H={h:.2f}" for n, h in zip(names, entropy)], fontsize=6)
    labels = [f"{i},{j}" for i in range(I) for j in range(J)] if I * J == k else [str(e) for e in range(k)]
    ax.set_xticks(range(k), labels, fontsize=6, rotation=90)
    ax.set_xlabel("expert (i, j): a_i b_j^T")
    ax.set_title(f"T-REX expert usage ({title}); uniform = 1/{k}", fontsize=9, loc="left")
    fig.colorbar(image, ax=ax, label="mean routing probability", shrink=0.8)
    return fig


def plot(adapter_dir: str, out: str, data: str | None = None, fmt: str = "alpaca", limit: int = 64,
         base: str | None = None) -> dict:
    """Write the heatmap of ``adapter_dir`` to ``out`` (PNG); returns the plotted usage."""
    from tensorft.errors import TensorftError
    from tensorft.saving import atomic_file, read_adapter_config

    adapter, _, _ = read_adapter_config(adapter_dir)
    if adapter.kind != "trex":
        raise TensorftError(f"{adapter_dir}: kind {adapter.kind} has no token-level router (expert usage is for trex)")
    usage, title = usage_from_data(adapter_dir, data, fmt, limit, base=base) if data else usage_from_metrics(adapter_dir)
    fig = draw(usage, adapter.targets, title, adapter.options.rank_out, adapter.rank)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    return usage


def main(argv: list[str] | None = None, prog: str = "tensorft expert-usage-plot") -> int:
    from tensorft.errors import TensorftError

    parser = _Parser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("adapter_dir", help="a T-REX adapter directory (a launcher output_dir has metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--data", help="measure usage on the prompts of this file instead of the training log")
    parser.add_argument("--format", default="alpaca", help="data.format of --data (default alpaca)")
    parser.add_argument("--limit", type=int, default=64, help="first N rows of --data (default 64)")
    parser.add_argument("--base", metavar="DIR", help="with --data: load the adapter's base model from DIR (it moved)")
    args = parser.parse_args(argv)
    try:
        plot(args.adapter_dir, args.out, args.data, args.format, args.limit, base=args.base)
    except TensorftError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2
    print(f"expert usage heatmap written to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
