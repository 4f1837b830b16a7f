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

(the router logits and ``v = B^T x`` come from one product; K and s scale the small factor A,
not a per-token tensor). Memory: the routing part ``x -> h`` is one autograd function
(``_Routing``) that keeps only its inputs for backward (x, which the base layer keeps anyway,
and the small W_g, B^T, intuition and w) and recomputes the (K + J)-wide product and both
softmaxes in backward, so per token and layer the graph keeps ``h`` (I values) besides x, not
the ~108 values (logits, ``v``, two softmax outputs) plain autograd keeps at 4 x 8: LoRA at
equal parameters keeps its r (about 22). The cost is one more (K + J) x d_in product per token
in backward.

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


def _fuse(p: torch.Tensor, score: torch.Tensor | None, w: torch.Tensor | None, K: int, c: float) -> torch.Tensor:
    """``G / K`` from ``p = softmax(W_g x)``: ``softmax(w K p + (1 - w) c I(x))``, or p alone."""
    if score is None:
        return p
    return torch.softmax(w * K * p + (1 - w) * c * score, dim=-1)


class _Routing(torch.autograd.Function):
    """``h = (G / K) B^T x`` per token, and ``P = G / K`` (..., K) for the router statistics.

    Saves only its inputs: ``x_router`` and ``x_in`` are the adapter's input (one tensor
    without dropout), which the base layer keeps for its own backward, so they cost nothing
    more; the logits, ``v`` and both softmax outputs (~108 values per token at 4 x 8) are
    recomputed in backward. ``P`` is differentiable (the load-balancing loss reads it); unused,
    its gradient is None. Same forward ops as plain autograd, so outputs are bitwise the same."""

    @staticmethod
    def _forward(x_router, x_in, router, in_vectors, score, w, I, J, c, shared):
        K = I * J
        if shared:  # router logits and B^T x from one product: x is read once
            logits, v = F.linear(x_router, torch.cat([router, in_vectors])).split([K, J], dim=-1)
        else:  # the router reads x before dropout
            logits, v = F.linear(x_router, router), F.linear(x_in, in_vectors)
        p = torch.softmax(logits, dim=-1)  # ONE softmax over the K logits
        P = _fuse(p, score, w, K, c)
        return v, p, P

    @staticmethod
    def forward(ctx, x_router, x_in, router, in_vectors, score, w, I, J, c):
        shared = x_router is x_in
        # In the parameters' dtype, autocast off: backward recomputes in that dtype (it runs
        # outside autocast), so forward must too, or bf16 and float32 tensors would meet there.
        with torch.autocast(x_router.device.type, enabled=False):
            v, _, P = _Routing._forward(x_router, x_in, router, in_vectors, score, w, I, J, c, shared)
            h = torch.einsum("...ij,...j->...i", P.reshape(*P.shape[:-1], I, J), v)  # (..., I)
        ctx.save_for_backward(x_router, None if shared else x_in, router, in_vectors, score, w)
        ctx.dims, ctx.shared = (I, J, c), shared
        ctx.set_materialize_grads(False)
        return h, P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_P):
        saved = ctx.saved_tensors  # read once: checkpointing allows one unpack
        with torch.autocast(saved[0].device.type, enabled=False):
            return _Routing._backward(ctx, saved, grad_h, grad_P)

    @staticmethod
    def _backward(ctx, saved, grad_h, grad_P):
        x_router, x_in, router, in_vectors, score, w = saved
        I, J, c = ctx.dims
        K = I * J
        if ctx.shared:
            x_in = x_router
        v, p, P = _Routing._forward(x_router, x_in, router, in_vectors, score, w, I, J, c, ctx.shared)
        # dL/dP from h = P v (and from the statistics' P, if a loss read it)
        if grad_h is not None:
            gP = (grad_h.unsqueeze(-1) * v.unsqueeze(-2)).reshape(P.shape)
            gv = torch.einsum("...ij,...i->...j", P.reshape(*P.shape[:-1], I, J), grad_h)
            if grad_P is not None:
                gP = gP + grad_P
        else:
            gP, gv = grad_P, torch.zeros_like(v)
        g_score = g_w = None
        if score is not None:  # back through softmax(w K p + (1 - w) c score)
            gz = P * (gP - (gP * P).sum(-1, keepdim=True))
            if ctx.needs_input_grad[5]:
                g_w = (gz * (K * p - c * score)).sum().reshape(w.shape)
            if ctx.needs_input_grad[4]:
                g_score = ((1 - w) * c * gz).sum(tuple(range(1, gz.dim() - 1)), keepdim=True)
            gP = w * K * gz
        g_logits = p * (gP - (gP * p).sum(-1, keepdim=True))  # back through softmax(W_g x)
        g_xr = g_xi = g_router = g_in = None
        if ctx.shared:
            g_proj = torch.cat([g_logits, gv], dim=-1)  # (..., K + J)
            if ctx.needs_input_grad[0]:
                g_xr = g_proj @ torch.cat([router, in_vectors])
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                g_w_all = g_proj.reshape(-1, K + J).t() @ x_router.reshape(-1, x_router.shape[-1])
                g_router, g_in = g_w_all.split([K, J], dim=0)
        else:
            if ctx.needs_input_grad[0]:
                g_xr = g_logits @ router
            if ctx.needs_input_grad[1]:
                g_xi = gv @ in_vectors
            if ctx.needs_input_grad[2]:
                g_router = g_logits.reshape(-1, K).t() @ x_router.reshape(-1, x_router.shape[-1])
            if ctx.needs_input_grad[3]:
                g_in = gv.reshape(-1, J).t() @ x_in.reshape(-1, x_in.shape[-1])
        return g_xr, g_xi, g_router, g_in, g_score, g_w, None, None, None


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
        score, w = self._score_and_gate(intuition, p.dtype, p.dim())
        p = _fuse(p, score, w, self.K, self.intuition_scale)
        return p.reshape(*p.shape[:-1], self.I, self.J)

    def _score_and_gate(self, intuition, dtype, dim):
        if not self.use_intuition:
            return None, None
        w = self.gate_value()
        self.gate_seen = w.detach()
        return intuition.to(dtype).reshape(intuition.shape[0], *([1] * (dim - 2)), self.K), w

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
        # the router reads x before dropout; without dropout both are rows (one product)
        x_in = rows if isinstance(self.dropout, nn.Identity) else self.dropout(rows)
        score, w = self._score_and_gate(intuition, rows.dtype, rows.dim())
        # keeps only its inputs for backward (see _Routing), not the (K + J)-wide products
        h, P = _Routing.apply(rows, x_in, self.router, self.in_vectors, score, w, self.I, self.J, self.intuition_scale)
        # K and the scale go on the small factor: no (tokens x K) copy of G kept for backward
        y = F.linear(h, self.out_vectors * (self.scale * self.K))
        if self.training or self.record_usage:
            self._router_statistics(P, state, rows.shape[:2])
        return y.reshape(*lead, self.out_features)

    def _router_statistics(self, P: torch.Tensor, state: AdapterState, shape) -> None:
        frame = state.call_frame()
        probs = P.reshape(*shape, self.K)  # P: (rows, tokens, K) = G / K
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
