"""Where adapters go: find target linear layers in a Hugging Face model and describe them.

A :class:`Site` is one adapted linear layer: its full module name, the target entry that
matched it, its role in the transformer block (q/k/v/o for attention, gate/up/down for the
MLP, ``None`` when unknown), its layer index and its dimensions. Kinds that share parameters
across the model (CP) need the role and layer; kinds that adapt one matrix at a time (LoRA, TT)
only need the dimensions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from .errors import ConfigError

# Module-name suffixes and the role they play. Llama / Mistral / Qwen2 / Gemma names first,
# then BERT / RoBERTa names. Order matters: "attention.output.dense" before "output.dense".
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("q_proj", "q"),
    ("k_proj", "k"),
    ("v_proj", "v"),
    ("o_proj", "o"),
    ("gate_proj", "gate"),
    ("up_proj", "up"),
    ("down_proj", "down"),
    ("attention.self.query", "q"),
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "o"),
    ("intermediate.dense", "up"),
    ("output.dense", "down"),
)
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """Architecture facts read from a model config (the only thing ``params`` needs)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int | None

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            hidden_size=hidden,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=getattr(config, "intermediate_size", None),
        )


@dataclass(frozen=True)
class Site:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    target: str  # the adapter.targets entry that matched
    role: str | None  # q k v o gate up down, or None
    layer: int | None
    in_features: int
    out_features: int


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and the bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear)."""
    return isinstance(module, nn.Linear)


def role_of(name: str) -> str | None:
    for suffix, role in ROLE_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return role
    return None


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """All linear modules matching ``targets`` (suffix match on module names, as in PEFT)."""
    if not targets:
        raise ConfigError("adapter.targets: empty list; name at least one module, e.g. [q_proj, v_proj]")
    sites: list[Site] = []
    hit = {t: False for t in targets}
    for name, module in model.named_modules():
        target = next((t for t in targets if matches(name, t)), None)
        if target is None:
            continue
        hit[target] = True
        if not is_linear(module):
            raise ConfigError(
                f"adapter.targets: {target!r} matches {name} ({type(module).__name__}), "
                "which is not a linear layer"
            )
        m = _LAYER_INDEX.search("." + name + ".")
        sites.append(
            Site(
                name=name,
                target=target,
                role=role_of(name),
                layer=int(m.group(1)) if m else None,
                in_features=module.in_features,
                out_features=module.out_features,
            )
        )
    missing = [t for t, ok in hit.items() if not ok]
    if missing:
        examples = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m) and n}
        )
        raise ConfigError(
            f"adapter.targets: {missing[0]!r} matches no module in the model "
            f"(linear layer names there: {', '.join(examples)})"
        )
    return sites
