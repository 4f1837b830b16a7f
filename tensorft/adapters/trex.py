"""T-REX: mix-and-match rank-one experts with a token-level router guided by sentence-embedding
clusters (Zhang et al.; methods.md section 5).

Per target layer ``A = [a_1..a_I]`` (``d_out x I``, ``out_vectors``) and ``B = [b_1..b_J]``
(``d_in x J``, stored as ``in_vectors = B^T``) give I*J rank-one experts ``a_i b_j^T`` from
I + J vectors (paper eq. 4)::

    dy = s A G(x) B^T x,        s = alpha / rank,   rank = J,   I = rank_out

with a token-level router ``W_g`` (``K x d_in``, K = I*J, zero-initialised) and ONE softmax over
the K logits, reshaped (I, J) (as the reference code; not a softmax per row of G). The
intuition ``I(x)`` (cosines of the example's sentence embedding to K k-means centroids, paper
eq. 7; ``tensorft/intuition.py``) is fused as methods.md's
``G~ = softmax(softmax(W_g x) + lambda I(x))`` with the reference code's learnable gate::

    p    = softmax(W_g x)                                   (K,)  per token
    w    = sigmoid(gate_sharpness * w0),  w0 = 0 at init   one learnable scalar per layer
    G(x) = K softmax(w K p + (1 - w) c I(x))               reshaped (I, J);  c = intuition_scale

``K p`` and ``K G`` have mean one over the experts (the reference's ``I*J softmax``), so each
rank-one expert starts with a LoRA rank's weight; without intuition ``G = K p``. ``G`` sums to
K over the experts: with G constant T-REX is the LoRA ``(A G) B^T``; with I = J and G diagonal
it is a mixture of I rank-one LoRA experts ``a_i b_i^T``.

Computed as three thin products per token, never a ``d_out x d_in`` update::

    [W_g x; v] = [W_g; B^T] x (K + J),   h = (G / K) v (I),   dy = (s K A) h (d_out)

(the router logits and ``v = B^T x`` come from one product, so x is read and kept for backward
once; K and s scale the small factor A, not a per-token tensor).

Init: ``A = 0`` (so the model equals the base at step 0 for any routing), ``B`` Kaiming-uniform
(LoRA's A), ``W_g = 0`` (uniform routing), ``w0 = 0`` (w = 1/2). Parameters per layer:
``I d_out + J d_in + K d_in (+ 1 gate with intuition)``; the K x D centroids are saved with the
adapter, frozen (not trained, not in ``count_parameters``).

Routing input: ``intuition`` (batch, K) per row, carried by the collator in training
(``model(..., intuition=s)``; a training forward without it is refused: its rows hold prompt
and completion). When an evaluation call does not pass it, ``prepare_routing`` decodes the
prompt from the token ids with the base tokenizer, embeds it with the adapter's encoder and
scores it against the saved centroids; a ``generate`` call does that once at prefill and keeps
it for every decode step. The lm-eval wrapper gives each scored row its context's intuition
(``routing_for_prompts``), as training embeds the prompt only. Router health (not watched by the reference): each layer's mean
expert usage and its entropy go to metrics.jsonl / TensorBoard (``router/...``), and
``load_balance_weight`` > 0 adds the Switch-Transformer loss ``K sum_k f_k P_k`` (f: share of
tokens whose top expert is k, P: mean routing probability), averaged over layers, as
``aux/load_balance``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, TensorftError
from ..registry import register_adapter
from ..topology import Site
from .base import AdapterKind, AdapterState, Routing, SiteAdapter, kaiming_uniform_

INTUITION = "intuition"  # the routing input: (batch, K) cosines to the centroids
MASK = "trex_token_mask"  # the call's attention mask, so router statistics skip padding


@dataclass
class TrexOptions:
    rank_out: int = 4  # I: output-side vectors (the common ``rank`` is J, the input side)
    intuition: bool = True  # fuse the sentence-embedding intuition into the router
    encoder: str = "all-MiniLM-L6-v2"  # any Hugging Face encoder: directory or hub id
    intuition_scale: float = 4.0  # c (reference code)
    gate_sharpness: float = 100.0  # w = sigmoid(gate_sharpness * w0) (reference code)
    load_balance_weight: float = 0.0  # > 0: Switch load-balancing aux loss


class TrexShared(nn.Module):
    """The K intuition centroids (frozen, saved with the adapter)."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.centroids = nn.Parameter(torch.zeros(k, dim), requires_grad=False)


def trex_delta(x: torch.Tensor, out_vectors: torch.Tensor, in_vectors: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``A G B^T x`` per token as three thin products: x (..., d_in), G (..., I, J)."""
    v = F.linear(x, in_vectors)  # (..., J)
    h = torch.einsum("...ij,...j->...i", G, v)  # (..., I)
    return F.linear(h, out_vectors)  # (..., d_out)


class TrexSite(SiteAdapter):
    def __init__(self, site: Site, I: int, J: int, options: TrexOptions, scale: float, dropout: float, lb_weight: float):
        super().__init__(site, dropout)
        self.I, self.J, self.K = I, J, I * J
        self.scale = scale
        self.use_intuition = options.intuition
        self.intuition_scale = options.intuition_scale
        self.gate_sharpness = options.gate_sharpness
        self.lb_weight = lb_weight  # load_balance_weight / number of layers
        self.out_vectors = nn.Parameter(torch.zeros(site.out_features, I))  # A
        self.in_vectors = nn.Parameter(torch.empty(J, site.in_features))  # B^T
        kaiming_uniform_(self.in_vectors)
        self.router = nn.Parameter(torch.zeros(self.K, site.in_features))  # W_g
        if self.use_intuition:
            self.gate = nn.Parameter(torch.zeros(1))  # w0 (1-d: FSDP2 shards along dim 0)
        self.record_usage = False  # evaluation-mode usage recording (expert_usage)
        self.reset_usage()

    def reset_usage(self) -> None:
        # Plain attributes, not buffers: statistics, never saved or sharded.
        self.usage_sum: torch.Tensor | None = None
        self.usage_tokens = 0.0
        self.gate_seen: torch.Tensor | None = None  # w of the last forward (ZeRO-3 / FSDP2 shard w0 between)

    def gate_value(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_sharpness * self.gate)

    def routing_weights(self, x: torch.Tensor, intuition: torch.Tensor | None) -> torch.Tensor:
        """``G(x)`` per token: (..., I, J), summing to K over the experts."""
        return self.K * self.routing_probs(F.linear(x, self.router), intuition)

    def routing_probs(self, logits: torch.Tensor, intuition: torch.Tensor | None) -> torch.Tensor:
        """``G / K`` from the router logits: (..., I, J), summing to 1 over the experts."""
        p = torch.softmax(logits, dim=-1)  # ONE softmax over the K logits
        if self.use_intuition:
            w = self.gate_value()
            self.gate_seen = w.detach()
            score = intuition.to(p.dtype).reshape(intuition.shape[0], *([1] * (p.dim() - 2)), self.K)
            p = torch.softmax(w * self.K * p + (1 - w) * self.intuition_scale * score, dim=-1)
        return p.reshape(*p.shape[:-1], self.I, self.J)

    def forward(self, x: torch.Tensor, state: AdapterState) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        rows = rows.to(self.in_vectors.dtype)
        intuition = None
        if self.use_intuition:
            intuition = state.require(INTUITION, "adapter kind 'trex'").to(rows.device)
            if intuition.dim() != 2 or intuition.shape[-1] != self.K or intuition.shape[0] not in (1, rows.shape[0]):
                raise TensorftError(
                    f"adapter kind 'trex': intuition must be (batch, {self.K}) scores, got {tuple(intuition.shape)}"
                )
            intuition = intuition.expand(rows.shape[0], self.K)
        if isinstance(self.dropout, nn.Identity):
            # router logits and B^T x from one product: x is read (and kept for backward) once
            proj = F.linear(rows, torch.cat([self.router, self.in_vectors]))
            logits, v = proj.split([self.K, self.J], dim=-1)
        else:  # the router reads x before dropout
            logits, v = F.linear(rows, self.router), F.linear(self.dropout(rows), self.in_vectors)
        P = self.routing_probs(logits, intuition)  # G = K P
        h = torch.einsum("...ij,...j->...i", P, v)  # (..., I)
        # K and the scale go on the small factor: no (tokens x K) copy of G kept for backward
        y = F.linear(h, self.out_vectors * (self.scale * self.K))
        if self.training or self.record_usage:
            self._router_statistics(P, state, rows.shape[:2])
        return y.reshape(*lead, self.out_features)

    def _router_statistics(self, P: torch.Tensor, state: AdapterState, shape) -> None:
        frame = state.call_frame()
        probs = P.reshape(*shape, self.K)
        mask = frame.inputs.get(MASK)
        if mask is not None and tuple(mask.shape) == tuple(shape):
            weight = mask.to(probs.device, probs.dtype).unsqueeze(-1)
        else:
            weight = torch.ones(*shape, 1, device=probs.device, dtype=probs.dtype)
        tokens = weight.sum().clamp(min=1)
        if self.training and self.lb_weight > 0:
            # also during activation-checkpoint recompute (the add is then ignored): the
            # recompute must build the graph the forward built
            mean_prob = (probs * weight).sum((0, 1)) / tokens  # P_k
            top = F.one_hot(probs.detach().argmax(-1), self.K).to(probs.dtype)
            share = (top * weight).sum((0, 1)) / tokens  # f_k (no gradient, as Switch)
            state.add_aux_loss("load_balance", self.lb_weight * self.K * (share * mean_prob).sum())
        if frame.aux.closed:  # a recompute: this call was counted already
            return
        with torch.no_grad():
            total = (probs * weight).sum((0, 1))
        self.usage_sum = total if self.usage_sum is None else self.usage_sum + total
        self.usage_tokens += float(tokens)


@register_adapter("trex")
class Trex(AdapterKind):
    options_cls = TrexOptions
    mergeable = False
    exportable = False
    why_not_mergeable = "its update depends on the input (a token-level router); T-REX has no fixed LoRA"
    routing_inputs = (INTUITION,)

    def __init__(self, config, shape):
        super().__init__(config, shape)
        self.n_sites = 1
        self._encoder = None  # loaded on the first forward that needs an intuition
        self.tokenizer = None  # the base model's, to read prompts back from token ids
        self.intuition_calls = 0  # encoder passes at inference (tests: once per generate call)

    @property
    def I(self) -> int:  # noqa: E743 - the paper's name
        return self.options.rank_out

    @property
    def J(self) -> int:
        return self.config.rank

    @property
    def K(self) -> int:
        return self.I * self.J

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        o = config.options
        if o.rank_out < 1:
            raise ConfigError(f"{prefix}.rank_out: must be at least 1, got {o.rank_out}")
        if o.intuition_scale < 0:
            raise ConfigError(f"{prefix}.intuition_scale: must be at least 0, got {o.intuition_scale}")
        if not o.gate_sharpness > 0:
            raise ConfigError(f"{prefix}.gate_sharpness: must be positive, got {o.gate_sharpness}")
        if o.load_balance_weight < 0:
            raise ConfigError(f"{prefix}.load_balance_weight: must be at least 0, got {o.load_balance_weight}")
        if o.intuition:
            from ..intuition import encoder_path

            if not o.encoder:
                raise ConfigError(f"{prefix}.encoder: empty; name a Hugging Face encoder (directory or hub id)")
            path = encoder_path(o.encoder, f"{prefix}.encoder")  # a missing directory fails here
            if os.path.isdir(os.path.expanduser(o.encoder)):
                o.encoder = path  # absolute: the saved adapter finds it from any directory

    def build_shared(self, sites: list[Site]) -> nn.Module | None:
        self.n_sites = max(1, len(sites))
        if not self.options.intuition:
            return None
        return TrexShared(self.K, self.centroid_dim())

    def build_site(self, site: Site, shared) -> TrexSite:
        lb = self.options.load_balance_weight / self.n_sites
        return TrexSite(site, self.I, self.J, self.options, self.scale, self.config.dropout, lb)

    def parameter_count(self, sites: list[Site]) -> int:
        """``sum over layers of I d_out + J d_in + K d_in (+ 1 gate with intuition)``, plus the
        K x D centroids with intuition: saved, frozen, so ``count_parameters`` leaves them out
        (``tensorft params`` lists every saved tensor and says how many are frozen)."""
        gate = 1 if self.options.intuition else 0
        per_layer = sum(self.I * s.out_features + (self.J + self.K) * s.in_features + gate for s in sites)
        return per_layer + (self.K * self.centroid_dim() if self.options.intuition else 0)

    def centroid_dim(self) -> int:
        from ..intuition import encoder_dim

        return encoder_dim(self.options.encoder)

    def describe_site(self, site: Site) -> str:
        return f"A {site.out_features}x{self.I}, B {site.in_features}x{self.J}, router {self.K}x{site.in_features}"

    def frozen_parameters(self, model: nn.Module, named: dict[str, nn.Parameter]) -> set[str]:
        return {n for n in named if n.endswith("shared.centroids")}

    # ------------------------------------------------------------------ intuition at inference

    def set_intuition(self, model: nn.Module, centroids: torch.Tensor) -> None:
        """Copy the training run's centroids into the adapter (saved with it)."""
        shared = model.tensorft.shared
        with torch.no_grad():
            shared.centroids.copy_(centroids.to(shared.centroids.device, shared.centroids.dtype))

    def encoder(self, device):
        from ..intuition import Encoder

        if self._encoder is None or self._encoder.device != torch.device(device):
            self._encoder = Encoder(self.options.encoder, device)
        return self._encoder

    def base_tokenizer(self, model: nn.Module):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            name = getattr(model.config, "_name_or_path", "") or ""
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError, TypeError):
                raise TensorftError(
                    "adapter kind 'trex': no intuition given and no tokenizer to read the prompt back from the "
                    f"token ids (base {name!r}); pass model(..., intuition=...) or set_tokenizer(model, tokenizer)"
                ) from None
        return self.tokenizer

    @torch.no_grad()
    def intuition_of(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``I(x)`` (batch, K) of each row's text (decoded from its ids) against the centroids."""
        from ..intuition import decode_rows

        self.intuition_calls += 1
        return self.intuition_of_texts(model, decode_rows(self.base_tokenizer(model), input_ids, attention_mask))

    @torch.no_grad()
    def intuition_of_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        from ..intuition import similarity

        centroids = model.tensorft.shared.centroids
        emb = self.encoder(centroids.device).embed(texts)
        return similarity(emb.to(centroids.device), centroids)

    def routing_for_prompts(self, model: nn.Module, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Routing inputs for rows whose prompts are known as text (an evaluation harness that
        scores prompt + continuation rows): each row's intuition from its prompt alone."""
        if not self.options.intuition:
            return {}
        return {INTUITION: self.intuition_of_texts(model, prompts)}

    def prepare_routing(self, model: nn.Module, frame: Routing, inputs: dict) -> Routing:
        mask = inputs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if mask is not None:  # layers use it only where it matches their tokens (not in decode steps)
            frame = frame.replace(**{MASK: mask})
        if not self.options.intuition or frame.inputs.get(INTUITION) is not None:
            return frame
        memory = model.tensorft.state.generation_memory(inputs.get("past_key_values"))
        if memory and INTUITION in memory:  # a decode step: the prompt's intuition holds
            return frame.replace(**{INTUITION: memory[INTUITION]})
        if model.training:
            # training rows hold prompt and completion: the prompt's scores come with the batch
            raise TensorftError(
                "adapter kind 'trex': a training forward needs each row's intuition scores "
                "(model(..., intuition=...); the launcher's collator carries them)"
            )
        ids = inputs.get("input_ids")
        if ids is None:
            raise TensorftError("adapter kind 'trex': no intuition given and no input_ids to compute it from")
        scores = self.intuition_of(model, ids, mask)
        if memory is not None:
            memory[INTUITION] = scores
        return frame.replace(**{INTUITION: scores})

    # ------------------------------------------------------------------ router health

    def sites(self, model: nn.Module) -> dict[str, TrexSite]:
        from ..model import root_of

        return {name: layer.adapter for name, layer in root_of(model).layers.items() if isinstance(layer.adapter, TrexSite)}

    def router_health(self, model: nn.Module) -> tuple[dict[str, float], dict]:
        """Since the last call: per layer, the mean routing probability of each expert
        (``usage``) and its entropy over log K (1: uniform use); summed over ranks. Returns
        (scalars for the logs, {"router/usage": {layer: [K floats]}} for metrics.jsonl)."""
        import torch.distributed as dist

        sites = self.sites(model)
        if not sites:
            return {}, {}
        device = next(iter(sites.values())).out_vectors.device
        sums = torch.stack([
            s.usage_sum.to(device) if s.usage_sum is not None else torch.zeros(self.K, device=device)
            for s in sites.values()
        ]).float()
        counts = torch.tensor([s.usage_tokens for s in sites.values()], device=device, dtype=torch.float32)
        gates = [float(s.gate_seen) for s in sites.values() if s.gate_seen is not None]
        for s in sites.values():
            s.reset_usage()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([sums, counts[:, None]], dim=1)
            dist.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        if not bool((counts > 0).any()):
            return {}, {}
        usage = sums / counts.clamp(min=1)[:, None]
        entropy = -(usage * usage.clamp(min=1e-12).log()).sum(-1) / math.log(self.K) if self.K > 1 else usage[:, 0]
        scalars, vectors = {}, {}
        for i, name in enumerate(sites):
            if counts[i] > 0:
                short = name.removeprefix("model.")
                scalars[f"router/entropy/{short}"] = round(float(entropy[i]), 6)
                vectors[short] = [round(float(u), 6) for u in usage[i]]
        scalars["router/entropy_mean"] = round(float(entropy[counts > 0].mean()), 6)
        if gates:
            scalars["router/gate_mean"] = round(sum(gates) / len(gates), 6)
        return scalars, {"router/usage": vectors}


def set_tokenizer(model: nn.Module, tokenizer) -> None:
    """The base tokenizer T-REX reads prompts back with when no intuition is passed (by
    default the one saved with the base model)."""
    from ..model import root_of

    root_of(model).kind.tokenizer = tokenizer


@torch.no_grad()
def expert_usage(model: nn.Module, batches) -> dict[str, list[float]]:
    """Mean routing probability per expert and layer over ``batches`` (dicts of model inputs,
    each run in evaluation mode; their intuition is computed from the prompt if absent)."""
    from ..model import root_of

    kind = root_of(model).kind
    if not isinstance(kind, Trex):
        raise TensorftError(f"expert usage: the adapter is {kind.name!r}, not trex")
    sites = kind.sites(model)
    for s in sites.values():
        s.reset_usage()
        s.record_usage = True
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for s in sites.values():
            s.record_usage = False
        model.train(was_training)
    return {
        name.removeprefix("model."): [round(float(u), 6) for u in (s.usage_sum / max(s.usage_tokens, 1.0))]
        for name, s in sites.items()
        if s.usage_sum is not None
    }
