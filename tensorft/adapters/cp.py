"""CP / LoRTA (seed: lorta_paper.md; methods.md section 2).

All attention updates of the model are ONE 5th-order tensor with a rank-r CP model,
modes ``d_model x d_head x heads x layers x matrices``::

    dW[l, m, h] = A diag(C_h[h] * C_l[l] * C_m[m]) B^T        (d_model x d_head)

q, k, v carry the heads on their output axis, o on its input axis. Under GQA, k and v use
their own head factor ``C_kv (H_kv x r)``. MLP targets (gate/up/down) form a second tensor
``d_model x d_ffn x layers x matrices`` (down transposed).

Fast path. Every slice has rank <= r, so one layer's update is the exact LoRA pair
``(A_site: r x d_in, B_site: d_out x r)``; for q (heads on the output axis)::

    A_site = A^T,    B_site = stack_h( B diag(s * C_h[h] * C_l[l] * C_m[m]) )

and for o the roles swap (``A_site = B_site(q-style)^T``, ``B_site = A``). Building the pair
costs ``O((d_in + d_out) r)``, the size of a LoRA's own parameters, and the step is then two
thin matmuls exactly as in LoRA. No ``d x d`` matrix is ever built (the reference code builds
4L of them per step). The same pair is the merge and PEFT-export rule. And since ``A_site`` is
the same ``A^T`` for q, k and v (gate and up), which read the same input, a layer computes
``x A`` once for all of them: fewer thin matmuls than a LoRA on the same targets.

The factors are shared by all layers and live in ONE module (``model.tensorft.shared``);
each layer's :class:`CPSite` only holds a plain reference to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import register_adapter
from ..topology import ATTENTION_ROLES, MLP_ROLES, Site
from .base import (
    AdapterKind, AdapterState, SiteAdapter, adam_pace_scale, adapter_input, lora_input, lora_output, lora_update,
)

# How far the C factors start from 1 (dW is zero at init through B = 0 either way).
C_INIT_SPREAD = 0.2
# Learning-rate multipliers of the CP factors relative to the LoRA lr of the config (the C's get
# adam_pace_scale on top). One A and one B serve every layer and their summed gradient is only
# partly coherent, so at LoRA's lr CP barely learns (tweet sentiment, q,v, r=64: test 0.463 at x1,
# 0.613 at x4, PEFT LoRA r=8 0.629): bench/RESULTS.md, "Learning quality". How far above it a
# tensor can go depends on its targets. The d_model mode is the INPUT side of q/k/v (gate/up) and
# the OUTPUT side of o (down): a tensor holding both kinds writes, in every layer, into the very
# subspace its sites in the next layers read, and one step moves all of them together. With that
# loop tiny random-init models stop learning at 4-8x where reading-only (or writing-only) tensors
# still learn at 8x; on SmolLM2, q,v learned best at 16x while all 7 projections (two loops)
# collapsed one seed of two there (bench/RESULTS.md, "cp's multiplier follows the shared mode's loop").
CP_LR_SCALE = 8.0  # a tensor whose targets only read (or only write) the d_model mode
CP_LR_SCALE_LOOP = 4.0  # a tensor whose targets both read and write it (e.g. q,k,v,o; gate,up,down)
WRITES_D_MODEL = ("o", "down")  # roles whose output axis is d_model; the others read it


def lr_multiplier(roles) -> float:
    """The multiplier of one tensor's factors given the roles it adapts (see CP_LR_SCALE)."""
    writes = any(r in WRITES_D_MODEL for r in roles)
    reads = any(r not in WRITES_D_MODEL for r in roles)
    return CP_LR_SCALE_LOOP if writes and reads else CP_LR_SCALE


def _uniform_around_one(*shape: int) -> nn.Parameter:
    return nn.Parameter(1.0 + C_INIT_SPREAD * (2 * torch.rand(*shape) - 1))


def _kaiming_columns(rows: int, rank: int) -> nn.Parameter:
    """``rows x r`` factor used as ``x @ A``: the fan-in is ``rows`` (LoRA's A init, transposed)."""
    bound = 1.0 / math.sqrt(rows)
    return nn.Parameter(torch.empty(rows, rank).uniform_(-bound, bound))


class CPAttentionTensor(nn.Module):
    """Factors of the attention tensor ``d x d_head x H x L x M``."""

    def __init__(self, d: int, d_head: int, heads: int, kv_heads: int | None, layers: int, roles, rank: int):
        super().__init__()
        self.roles = list(roles)  # matrix index m -> role
        self.A = _kaiming_columns(d, rank)
        self.B = nn.Parameter(torch.zeros(d_head, rank))
        self.C_heads = _uniform_around_one(heads, rank)
        # Only a GQA model with k or v targeted needs a separate head factor.
        self.C_kv_heads = _uniform_around_one(kv_heads, rank) if kv_heads else None
        self.C_layers = _uniform_around_one(layers, rank)
        self.C_matrices = _uniform_around_one(len(self.roles), rank)

    def head_factor(self, role: str) -> torch.Tensor:
        if role in ("k", "v") and self.C_kv_heads is not None:
            return self.C_kv_heads
        return self.C_heads

    def site_factors(self, role: str, layer: int, scale: float):
        """Exact LoRA pair ``(A_site, B_site)`` of layer ``layer``, matrix ``role``."""
        c = self.C_layers[layer] * self.C_matrices[self.roles.index(role)] * scale  # (r,)
        heads = self.head_factor(role)  # (H, r)
        # stack_h(B diag(c * C_h[h]))^T: r x (H * d_head), head-major like HF's head layout, built
        # row-major in r (the layout lora_update's thin matmuls want, so no copy follows)
        stacked_t = ((heads.t() * c[:, None])[:, :, None] * self.B.t()[:, None, :]).reshape(self.B.shape[1], -1)
        if role == "o":  # heads on the input axis: dW = A (stacked)^T
            return stacked_t, self.A
        return self.A.t(), stacked_t.t()


class CPMLPTensor(nn.Module):
    """Factors of the MLP tensor ``d x d_ffn x L x M_mlp``."""

    def __init__(self, d: int, d_ffn: int, layers: int, roles, rank: int):
        super().__init__()
        self.roles = list(roles)
        self.A = _kaiming_columns(d, rank)
        self.B = nn.Parameter(torch.zeros(d_ffn, rank))
        self.C_layers = _uniform_around_one(layers, rank)
        self.C_matrices = _uniform_around_one(len(self.roles), rank)

    def site_factors(self, role: str, layer: int, scale: float):
        c = self.C_layers[layer] * self.C_matrices[self.roles.index(role)] * scale
        ffn_side_t = self.B.t() * c[:, None]  # r x d_ffn, row-major (see CPAttentionTensor)
        if role == "down":  # d_ffn -> d: transposed orientation
            return ffn_side_t, self.A
        return self.A.t(), ffn_side_t.t()


class CPFactors(nn.Module):
    def __init__(self, attention: CPAttentionTensor | None, mlp: CPMLPTensor | None):
        super().__init__()
        self.attention = attention
        self.mlp = mlp

    def c_factors(self) -> list[nn.Parameter]:
        """The order-one C factors (heads, layers, matrices) of both tensors."""
        out = []
        for tensor in (self.attention, self.mlp):
            if tensor is not None:
                out += [p for name, p in tensor.named_parameters() if name.startswith("C_")]
        return out


class CPSite(SiteAdapter):
    """One layer's view of the shared CP factors. Owns no parameters."""

    adds_into_base_output = True

    def __init__(self, site: Site, tensor: nn.Module, scale: float, dropout: float):
        super().__init__(site, dropout)
        self.role, self.layer, self.scale = site.role, site.layer, scale
        # A plain reference, not a submodule: the factors are registered once, at the root.
        object.__setattr__(self, "_tensor", tensor)

    def adapter_dtype(self) -> torch.dtype:
        return self._tensor.A.dtype

    def external_parameters(self) -> list[nn.Parameter]:
        return list(self._tensor.parameters())

    def lora_factors(self):
        A_site, B_site = self._tensor.site_factors(self.role, self.layer, self.scale)
        return A_site, B_site, 1.0

    def forward(self, x: torch.Tensor, state: AdapterState, base_out: torch.Tensor | None = None) -> torch.Tensor:
        A_site, B_site = self._tensor.site_factors(self.role, self.layer, self.scale)
        if A_site.device != x.device:  # a model split over GPUs (device_map): factors live on one
            A_site, B_site = A_site.to(x.device), B_site.to(x.device)
        if self.role in WRITES_D_MODEL or (isinstance(self.dropout, nn.Dropout) and self.dropout.training):
            x = self.dropout(adapter_input(x, A_site.dtype))
            return lora_update(x, A_site, B_site, 1.0, base_out)  # the scale is inside B_site
        # A_site is the model-wide A for every reader, so the layer's q, k, v (gate, up), which get
        # the same input, compute x A once (a dropout mask per site would make the inputs differ).
        h = state.reuse_in_block(
            (self._tensor, self.layer), (x, self._tensor.A), lambda: lora_input(adapter_input(x, A_site.dtype), A_site)
        )
        return lora_output(h, B_site, 1.0, base_out)


@register_adapter("cp")
class CP(AdapterKind):
    def _split(self, sites):
        attn = [s for s in sites if s.role in ATTENTION_ROLES]
        mlp = [s for s in sites if s.role in MLP_ROLES]
        return attn, mlp

    def _roles(self, sites, order):
        present = {s.role for s in sites}
        return [r for r in order if r in present]

    def _separate_kv_heads(self, attn_sites) -> bool:
        sh = self.shape
        return sh.num_kv_heads != sh.num_heads and any(s.role in ("k", "v") for s in attn_sites)

    def _d_ffn(self, mlp_sites) -> int:
        s = mlp_sites[0]
        return s.in_features if s.role == "down" else s.out_features

    def check_sites(self, sites: list[Site]) -> None:
        sh = self.shape
        if sh is None:
            raise ConfigError("adapter.kind: cp needs a model with a Hugging Face config (layers, heads)")
        seen: dict[tuple, str] = {}
        for s in sites:
            if s.role is None:
                raise ConfigError(
                    f"adapter.targets: cp needs to know which matrix {s.name} is; "
                    "target q/k/v/o or gate/up/down projections (e.g. q_proj, v_proj)"
                )
            if s.layer is None or not 0 <= s.layer < sh.num_layers:
                raise ConfigError(
                    f"adapter.targets: cp cannot find the layer index of {s.name} "
                    f"(model has {sh.num_layers} layers)"
                )
            key = (s.layer, s.role)
            if key in seen:
                raise ConfigError(
                    f"adapter.targets: {seen[key]} and {s.name} are both layer {s.layer} {s.role}; "
                    "cp adapts one matrix per (layer, role)"
                )
            seen[key] = s.name
        d, dh = sh.hidden_size, sh.head_dim
        attn, mlp = self._split(sites)
        expected = {
            "q": (d, sh.num_heads * dh),
            "k": (d, sh.num_kv_heads * dh),
            "v": (d, sh.num_kv_heads * dh),
            "o": (sh.num_heads * dh, d),
        }
        if mlp:
            f = self._d_ffn(mlp)
            expected.update({"gate": (d, f), "up": (d, f), "down": (f, d)})
        for s in sites:
            want = expected[s.role]
            if (s.in_features, s.out_features) != want:
                raise ConfigError(
                    f"adapter.targets: {s.name} is {s.in_features}->{s.out_features}, but a {s.role} "
                    f"projection of this model should be {want[0]}->{want[1]} "
                    f"(hidden {d}, {sh.num_heads} heads, {sh.num_kv_heads} kv heads, head_dim {dh})"
                )

    def build_shared(self, sites: list[Site]) -> CPFactors:
        sh, r = self.shape, self.config.rank
        attn, mlp = self._split(sites)
        attention = None
        if attn:
            attention = CPAttentionTensor(
                d=sh.hidden_size,
                d_head=sh.head_dim,
                heads=sh.num_heads,
                kv_heads=sh.num_kv_heads if self._separate_kv_heads(attn) else None,
                layers=sh.num_layers,
                roles=self._roles(attn, ATTENTION_ROLES),
                rank=r,
            )
        mlp_tensor = None
        if mlp:
            mlp_tensor = CPMLPTensor(
                d=sh.hidden_size,
                d_ffn=self._d_ffn(mlp),
                layers=sh.num_layers,
                roles=self._roles(mlp, MLP_ROLES),
                rank=r,
            )
        return CPFactors(attention, mlp_tensor)

    def build_site(self, site: Site, shared: CPFactors) -> CPSite:
        tensor = shared.attention if site.role in ATTENTION_ROLES else shared.mlp
        return CPSite(site, tensor, self.scale, self.config.dropout)

    def parameter_count(self, sites: list[Site]) -> int:
        """Attention: ``r (d + d_head + H [+ H_kv] + L + M)``; MLP: ``r (d + d_ffn + L + M_mlp)``."""
        sh, r = self.shape, self.config.rank
        attn, mlp = self._split(sites)
        total = 0
        if attn:
            kv = sh.num_kv_heads if self._separate_kv_heads(attn) else 0
            m = len(self._roles(attn, ATTENTION_ROLES))
            total += r * (sh.hidden_size + sh.head_dim + sh.num_heads + kv + sh.num_layers + m)
        if mlp:
            m = len(self._roles(mlp, MLP_ROLES))
            total += r * (sh.hidden_size + self._d_ffn(mlp) + sh.num_layers + m)
        return total

    def describe_site(self, site: Site) -> str:
        return f"{site.role} {site.in_features}->{site.out_features}: rank-{self.config.rank} slices of shared"

    def lr_scales(self, model, named):
        # The C's start around 1 while A starts at LoRA-A size: at one learning rate Adam would
        # leave them near their init, and no layer or head could specialise (measured:
        # bench/RESULTS.md, "update dynamics"). Give them A's relative pace.
        shared = model.tensorft.shared
        c_scale = adam_pace_scale(1.0, self.shape.hidden_size)
        c_ids = {id(p) for p in shared.c_factors()}
        by_id = {}
        for tensor in (shared.attention, shared.mlp):
            if tensor is not None:
                scale = lr_multiplier(tensor.roles)
                for p in tensor.parameters():
                    by_id[id(p)] = scale * (c_scale if id(p) in c_ids else 1.0)
        return {n: by_id[id(p)] for n, p in named.items() if id(p) in by_id}
