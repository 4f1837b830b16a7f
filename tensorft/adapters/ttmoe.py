"""TT-LoRA MoE: frozen per-task TT-LoRA experts behind a noisy top-1 router (methods.md
section 4; seed: ttlora_moe_summary.md).

Stage 1 (``tensorft/experts.py``) trains one ``tt`` adapter per task. This kind loads E of them,
frozen (saved with the MoE, never trained), and learns only a router. For a sequence with base
final hidden state ``h`` (adapters off, at its last prompt token)::

    logits = W_g h + b_g                                   (E,)
    logits += N(0, 1) * softplus(W_n h + b_n)              training only (noisy top-1 gating)
    e      = argmax(logits)                                top-1: one expert per sequence
    L_aux  = w * CE(logits, task label)                    the router's only training signal

Top-1 gates are one-hot, so no gradient reaches the router through the experts: the router
learns from ``L_aux`` alone, and a stage-2 training step needs no expert pass at all. Then each
adapted layer of a row routed to expert e adds that expert's TT-LoRA update::

    dy = s * (x A_e^T) B_e^T,   (A_e: r x d_in, B_e: d_out x r) built from expert e's cores

with rows grouped by expert (one pair of thin matmuls per expert present in the batch): never a
dense sum over the E experts, never a copy of the expert cores per forward (the stacked cores
``(E, r_{k-1}, s_k, r_k)`` are indexed, which is a view).

What each pass costs:

* stage-2 training step: ONE base forward (the step's own forward, run with adapters off; the
  router reads its final hidden state, detached, so no graph is built through the base) plus
  the router's ``2 (hidden x E)`` matmuls forward and backward. The reference runs two base
  forwards and a dense mixture of all experts per step; here the LM head of that base pass is
  the only extra (trl computes the base's LM loss, which the trainer discards).
* inference / evaluation forward: one base pass for the router (no grad, adapters off) plus
  one adapted pass, the floor for routing by the base model's representation.
* ``generate``: the router runs at prefill only; the choice is kept in the cache's generation
  memory for every decode step. Prefill runs rows grouped by expert, each present expert's
  factors built for that forward (as one ``tt`` expert builds its own per forward) and not
  kept. A decode step of a batch mixing experts contracts each row's token with its own
  expert's TT cores (gathered once per call: TT-sized per row, a few thousand numbers per
  layer, never a row's dense LoRA-sized factors), a few batched products per layer, about what
  one ``tt`` expert costs (which rebuilds its factors from the cores at every step). A call
  whose rows all run one expert keeps that expert's factors for its decode steps.

Routing position: the last non-padding token (``attention_mask``), or, when ``labels`` mark a
completion (SFT), the last prompt token, which is what ``generate`` sees at prefill. A plain
forward of prompt + continuation (lm-eval's loglikelihood) routes on its last token.

Heads: causal LMs share the base's LM head. Sequence classification (``model.task: seq-cls``,
the paper's setting) trains each expert with its own head (``modules_to_save: [score]``); the
MoE keeps those heads stacked and frozen, and each row's head output is its expert's head,
grouped by expert like the adapted layers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, TensorftError
from ..registry import register_adapter
from ..topology import Site
from .base import AdapterKind, AdapterState, Routing, SiteAdapter
from .tt import TTSite

EXPERTS_INDEX = "experts.json"  # written by stage 1 (tensorft/experts.py): the experts in task order
GROUPS = "ttmoe_groups"  # frame input: [(expert, row indices or None for every row)], one host sync per forward
FACTORS = "ttmoe_factors"  # frame input within a generate call: what its decode steps reuse (row cores)
POSITIONS = "ttmoe_router_positions"  # frame input of a stage-2 training call: where the router reads h
CORES = ".adapter.cores."


@dataclass
class TTMoEOptions:
    # The tt expert directories, or one stage-1 output directory (its experts.json lists them).
    experts: list[str] | str | None = None
    # Filled from the experts (an expert's name is its one task name, else its directory name);
    # saved with the MoE so it reloads without the expert directories.
    expert_names: list[str] | None = None
    tt_shapes: dict | None = None  # the experts' tt_shapes (filled)
    # Sequence classification: the experts' own heads (their modules_to_save), parameter name ->
    # shape (filled); the MoE applies each row's expert's head.
    heads: dict | None = None
    noise: bool = True  # N(0,1) * softplus(W_n h) on the router logits, training only
    router_loss_weight: float = 1.0  # the reference uses 21
    router_lr_scale: float = 1.0  # relative to train.lr


def _expert_dirs(experts, prefix: str) -> list[str]:
    if isinstance(experts, str):
        experts = [experts]
    if not experts:
        raise ConfigError(f"{prefix}.experts: name the tt expert directories (or a stage-1 output directory)")
    dirs = []
    for d in experts:
        if not os.path.isdir(d):
            raise ConfigError(f"{prefix}.experts: {d}: no such directory")
        index = os.path.join(d, EXPERTS_INDEX)
        if os.path.isfile(index):  # a stage-1 output: its experts, in task order
            with open(index, encoding="utf-8") as f:
                listed = json.load(f)["experts"]
            dirs += [os.path.join(d, e["dir"]) for e in listed]
        else:
            dirs.append(d)
    return [os.path.abspath(d) for d in dirs]


def _same_base(a: str, b: str) -> bool:
    if a and b and os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def read_experts(experts, prefix: str = "adapter") -> dict:
    """Read and cross-check the expert directories (configs and tensor shapes; no weights).

    Returns ``{"dirs", "names", "config" (the first expert's AdapterConfig), "model" (its
    ModelConfig)}``; any mismatch is a one-line ConfigError naming the directory."""
    from safetensors import safe_open

    from ..saving import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    dirs = _expert_dirs(experts, prefix)
    found = []
    for d in dirs:
        if not os.path.isfile(os.path.join(d, CONFIG_NAME)):
            raise ConfigError(f"{prefix}.experts: {d}: no {CONFIG_NAME} here (not a tensorft adapter directory)")
        try:
            adapter, model_cfg, raw = read_adapter_config(d)
        except TensorftError as e:
            raise ConfigError(f"{prefix}.experts: {e}") from None
        if adapter.kind != "tt":
            raise ConfigError(f"{prefix}.experts: {d} holds a {adapter.kind} adapter; experts are tt adapters")
        weights = os.path.join(d, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise ConfigError(f"{prefix}.experts: {d}: missing {WEIGHTS_NAME}")
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        name = adapter.tasks[0] if len(adapter.tasks) == 1 else os.path.basename(os.path.normpath(d))
        found.append((d, name, adapter, model_cfg, shapes))
    d0, _, a0, m0, s0 = found[0]
    for d, name, a, m, shapes in found[1:]:
        for what, mine, theirs in (
            ("base model", m.name_or_path, m0.name_or_path),
            ("rank", a.rank, a0.rank),
            ("alpha", a.alpha, a0.alpha),
            ("targets", a.targets, a0.targets),
            ("tt_shapes", a.options.tt_shapes, a0.options.tt_shapes),
            ("modules_to_save", a.modules_to_save, a0.modules_to_save),
            ("tensors", sorted(shapes.items()), sorted(s0.items())),
        ):
            same = _same_base(mine, theirs) if what == "base model" else mine == theirs
            if not same:
                shown = "different tensor shapes" if what == "tensors" else f"{mine!r}, the first has {theirs!r}"
                raise ConfigError(f"{prefix}.experts: {d} does not match {d0}: {what}: {shown}")
    names = [name for _, name, *_ in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{prefix}.experts: two experts are named {dup!r} (name each expert's task differently)")
    heads = {k: list(shape) for k, shape in s0.items() if any(k.startswith(m + ".") for m in a0.modules_to_save)}
    return {"dirs": dirs, "names": names, "config": a0, "model": m0, "heads": heads}


class Router(nn.Module):
    """``W_g h`` (+ training noise ``N(0,1) softplus(W_n h)``): E logits per sequence."""

    def __init__(self, hidden: int, n_experts: int, noise: bool, heads: dict | None = None):
        super().__init__()
        self.gate = nn.Linear(hidden, n_experts)
        self.noise = nn.Linear(hidden, n_experts) if noise else None
        # the experts' classification heads, stacked (E, *shape) and frozen; keyed by parameter
        # name with "." -> "__" (e.g. score__weight)
        self.heads = nn.ParameterDict({
            head_key(name): nn.Parameter(torch.zeros(n_experts, *shape), requires_grad=False)
            for name, shape in (heads or {}).items()
        })

    def forward(self, h: torch.Tensor, noisy: bool) -> torch.Tensor:
        h = h.to(self.gate.weight.dtype)
        logits = self.gate(h)
        if noisy and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(h))
        return logits


def head_key(name: str) -> str:
    return name.replace(".", "__")


class TTMoESite(SiteAdapter):
    """E frozen TT-LoRA experts of one layer, cores stacked: core k is ``(E, r_{k-1}, s_k, r_k)``."""

    def __init__(self, site: Site, in_modes, out_modes, rank: int, n_experts: int, scale: float):
        super().__init__(site)
        self.in_modes, self.out_modes, self.scale = list(in_modes), list(out_modes), scale
        modes = self.in_modes + self.out_modes
        ranks = [1] + [rank] * (len(modes) - 1) + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(n_experts, ranks[k], s, ranks[k + 1]), requires_grad=False)
            for k, s in enumerate(modes)
        )

    @property
    def n_experts(self) -> int:
        return self.cores[0].shape[0]

    def expert_factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's ``(A_tt, B_tt)``, by the tt kind's own contraction (``c[e]`` is a view)."""
        return TTSite.tt_factors(SimpleNamespace(cores=[c[e] for c in self.cores], in_modes=self.in_modes))

    def task_lora_factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Expert e as an exact rank-r LoRA (``export-peft --expert NAME``)."""
        A, B = self.expert_factors(e)
        return A, B, self.scale

    def factors(self, e: int, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's pair; within a generate call whose rows all run expert e, built once (the
        cores are frozen) and kept in the call's cache for every decode step."""
        if cache is None:
            return self.expert_factors(e)
        if (self, e) not in cache:
            cache[(self, e)] = self.expert_factors(e)
        return cache[(self, e)]

    def row_cores(self, ids: torch.Tensor, cache: dict) -> list[torch.Tensor]:
        """Each row's expert's cores, TT-sized per row (a few thousand numbers per layer),
        gathered once per generate call (rows keep their expert; beams reorder within a
        prompt, whose rows share it), laid out for :meth:`contract_rows`' batched products:
        the first input core ``(rows, s_1, r_1)``, the other input cores ``(rows, s_k r_{k-1},
        r_k)``, the output cores ``(rows, r_{k-1}, s_k r_k)``."""
        if (self, "row_cores") not in cache:
            p, out = len(self.in_modes), []
            for k, c in enumerate(self.cores):
                c = c.index_select(0, ids)  # (rows, r_{k-1}, s_k, r_k)
                if k == 0:
                    c = c[:, 0]
                elif k < p:
                    c = c.permute(0, 2, 1, 3).reshape(c.shape[0], -1, c.shape[-1])
                else:
                    c = c.reshape(c.shape[0], c.shape[1], -1)
                out.append(c.contiguous())
            cache[(self, "row_cores")] = out
        return cache[(self, "row_cores")]

    def contract_rows(self, x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
        """``x (rows, d_in)`` through each row's own cores (:meth:`row_cores`), in factor space:
        ``tt``'s core contraction with a row axis, equal to ``(x A_e^T) B_e^T`` per row without
        forming a row's factors. The input modes shrink ``x`` to the rank, the output modes grow
        it to ``d_out``; one batched product per core."""
        rows, p = x.shape[0], len(self.in_modes)
        z = torch.bmm(x.reshape(rows, self.in_modes[0], -1).transpose(1, 2), cores[0])  # (rows, rest, r)
        for k in range(1, p):  # (rows, s_k * rest', r) -> (rows, rest', s_k r) @ (s_k r, r')
            z = z.reshape(rows, self.in_modes[k], -1, z.shape[-1]).transpose(1, 2).reshape(rows, -1, cores[k].shape[1])
            z = torch.bmm(z, cores[k])
        out = z.reshape(rows, 1, -1)  # (rows, output modes produced, bond)
        for s_k, core in zip(self.out_modes, cores[p:]):  # (rows, N, r) @ (r, s_k r') -> (rows, N s_k, r')
            out = torch.bmm(out, core).reshape(rows, -1, core.shape[-1] // s_k)
        return out.reshape(rows, self.out_features)

    def forward(self, x: torch.Tensor, state: AdapterState) -> torch.Tensor:
        routing = state.routing
        groups, cache = routing.get(GROUPS), routing.get(FACTORS)
        if groups is None:
            raise TensorftError("adapter kind 'ttmoe': no expert choice for this forward (routing did not run)")
        x = x.to(self.cores[0].dtype)
        if len(groups) == 1 and groups[0][1] is None:  # every row with one expert: no gather
            A, B = self.factors(groups[0][0], cache)
            return F.linear(F.linear(x, A), B) * self.scale
        lead = x.shape[:-1]
        rows_x = x.reshape(x.shape[0], -1, x.shape[-1])
        ids = routing.get("expert_ids")
        if cache is not None and rows_x.shape[1] == 1 and ids is not None and ids.shape[0] == rows_x.shape[0]:
            # a decode step of a batch mixing experts (one token per row): a loop over experts
            # costs a kernel pair per expert present, and gathering each row's dense factors
            # would keep a LoRA-sized copy per row for the whole call. Each row contracts with
            # its own expert's TT cores instead (gathered once per call, TT-sized per row).
            out = self.contract_rows(rows_x[:, 0], self.row_cores(ids, cache))
            return (out * self.scale).reshape(*lead, self.out_features)
        out = rows_x.new_zeros(rows_x.shape[0], rows_x.shape[1], self.out_features)
        for e, rows in groups:  # one pair of thin matmuls per expert present, built for this forward
            A, B = self.expert_factors(e)
            out.index_copy_(0, rows, F.linear(F.linear(rows_x.index_select(0, rows), A), B) * self.scale)
        return out.reshape(*lead, self.out_features)


def expert_groups(ids: torch.Tensor) -> list:
    """``[(expert, row indices)]`` for the experts present; one entry with ``None`` when one
    expert serves every row. The one host sync of a routed forward."""
    ids = ids.reshape(-1)
    if ids.numel() == 1:
        return [(int(ids.item()), None)]
    present = torch.unique(ids).tolist()
    if len(present) == 1:
        return [(present[0], None)]
    return [(e, (ids == e).nonzero().flatten()) for e in present]


def route_positions(inputs: dict, rows: int, length: int, device) -> torch.Tensor:
    """Per row: the last non-padding token, or the last prompt token when ``labels`` mark a
    completion (the token generate's prefill ends on)."""
    mask = inputs.get("attention_mask")
    steps = torch.arange(length, device=device)
    if mask is None or mask.dim() != 2:
        last = torch.full((rows,), length - 1, device=device, dtype=torch.long)
    else:
        last = (steps * (mask.to(device) != 0)).argmax(-1)
    labels = inputs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        labelled = labels.to(device) != -100
        first = labelled.int().argmax(-1)
        prompt_end = first - 1
        return torch.where(labelled.any(-1) & (first >= 1), prompt_end, last)
    return last


@register_adapter("ttmoe")
class TTMoE(AdapterKind):
    options_cls = TTMoEOptions
    mergeable = False
    exportable = False
    why_not_mergeable = (
        "each sequence runs the expert its router picks; merge or export one expert with --expert NAME"
    )
    routing_inputs = ("expert_ids",)
    # stage 2: the step's LM loss comes from a base pass (adapters off) and trains nothing
    router_only_training = True

    def __init__(self, config, shape):
        super().__init__(config, shape)
        E = len(self.options.expert_names)
        # label x chosen expert, per split; the trainer logs "train", evaluation reports "eval"
        self.confusion = {"train": torch.zeros(E, E, dtype=torch.long), "eval": torch.zeros(E, E, dtype=torch.long)}
        self.router_passes = 0  # base passes run for routing (tests count them)

    # ------------------------------------------------------------------ config

    @classmethod
    def check_options(cls, config, prefix: str) -> None:
        o = config.options
        if not o.router_loss_weight > 0:
            raise ConfigError(f"{prefix}.router_loss_weight: must be positive, got {o.router_loss_weight}")
        if not o.router_lr_scale > 0:
            raise ConfigError(f"{prefix}.router_lr_scale: must be positive, got {o.router_lr_scale}")
        if prefix != "adapter":  # a saved MoE (adapter_config.json): the experts are in its weights
            if not o.expert_names:
                raise ConfigError(f"{prefix}.expert_names: missing (not a saved ttmoe adapter)")
            return
        if o.expert_names:
            raise ConfigError(f"{prefix}.expert_names: filled from adapter.experts; leave it out")
        found = read_experts(o.experts, prefix)
        first = found["config"]
        from ..config import AdapterConfig

        default = AdapterConfig()
        for key in ("rank", "alpha", "targets"):  # a key the config sets must agree with the experts
            value = getattr(config, key)
            if value != getattr(default, key) and value != getattr(first, key):
                raise ConfigError(
                    f"{prefix}.{key}: {value!r}, but the experts have {getattr(first, key)!r} (leave it out)"
                )
            setattr(config, key, getattr(first, key))
        o.experts, o.expert_names, o.tt_shapes = found["dirs"], found["names"], first.options.tt_shapes
        o.heads = found["heads"] or None
        if config.modules_to_save:
            raise ConfigError(f"{prefix}.modules_to_save: the experts' heads are the MoE's (leave it out)")
        config.tasks = list(found["names"])
        config.dropout = 0.0  # frozen experts: nothing to regularise
        o._sources = found["dirs"]  # not a field: only a config built from the directories loads them
        o._base_model = found["model"]

    @classmethod
    def resolve_config(cls, cfg) -> None:
        """Stage 2 through the launcher: the data's tasks are the router's labels (each must have
        an expert; rows are relabelled with their expert's id), the model defaults to the
        experts' base and must be it."""
        a = cfg.adapter
        names = list(cfg.data.tasks)
        if not names:
            raise ConfigError(
                "data.tasks: the ttmoe router learns from task labels; list the tasks (each an expert's name) under data.tasks"
            )
        for name in names:
            if name not in a.options.expert_names:
                raise ConfigError(
                    f"data.tasks.{name}: no expert for this task (experts: {', '.join(a.options.expert_names)})"
                )
        if cfg.train.objective != "sft":
            raise ConfigError("train.objective: ttmoe trains its router with sft data (task-labelled rows)")
        if a.init_from or a.fewshot:
            raise ConfigError("adapter.init_from: not for ttmoe (its experts come from adapter.experts)")
        base = getattr(a.options, "_base_model", None)
        if base is not None:
            if not cfg.model.name_or_path:
                cfg.model = base
            elif not _same_base(cfg.model.name_or_path, base.name_or_path):
                raise ConfigError(
                    f"model.name_or_path: {cfg.model.name_or_path}, but the experts were trained on {base.name_or_path}"
                )
        a.tasks = list(a.options.expert_names)
        for name, task in cfg.data.tasks.items():  # the experts' model decides what a row must be
            if (cfg.model.task == "seq-cls") != (task.format == "classification"):
                raise ConfigError(
                    f"data.tasks.{name}.format: {task.format}, but the experts' model is a {cfg.model.task} model"
                    + (" (classification rows: text, label)" if cfg.model.task == "seq-cls" else "")
                )

    def modes(self, site: Site) -> tuple[list[int], list[int]]:
        from ..config import parse_adapter
        from .tt import TT

        tt = parse_adapter({"kind": "tt", "rank": self.config.rank, "alpha": self.config.alpha,
                            "targets": self.config.targets, "tt_shapes": self.options.tt_shapes})
        return TT(tt, self.shape).modes(site)

    def expert_id(self, name: str | int) -> int:
        names = self.options.expert_names
        if name in names:
            return names.index(name)
        raise TensorftError(f"unknown expert {name!r} (experts: {', '.join(names)})")

    # ------------------------------------------------------------------ build

    def build_shared(self, sites: list[Site]) -> nn.Module:
        router = Router(self.shape.hidden_size, len(self.options.expert_names), self.options.noise, self.options.heads)
        sources = getattr(self.options, "_sources", None)
        if sources and router.gate.weight.device.type != "meta":
            from safetensors.torch import load_file

            from ..saving import WEIGHTS_NAME

            with torch.no_grad():
                for e, d in enumerate(sources):
                    saved = load_file(os.path.join(d, WEIGHTS_NAME))
                    for name in self.options.heads or {}:
                        router.heads[head_key(name)][e].copy_(saved[name])
        return router

    def build_site(self, site: Site, shared) -> TTMoESite:
        in_modes, out_modes = self.modes(site)
        adapter = TTMoESite(site, in_modes, out_modes, self.config.rank, len(self.options.expert_names), self.scale)
        sources = getattr(self.options, "_sources", None)
        if sources and adapter.cores[0].device.type != "meta":
            self._load_experts(site, adapter, sources)
        return adapter

    def _load_experts(self, site: Site, adapter: TTMoESite, sources: list[str]) -> None:
        from safetensors import safe_open

        from ..saving import WEIGHTS_NAME

        with torch.no_grad():
            for e, d in enumerate(sources):
                with safe_open(os.path.join(d, WEIGHTS_NAME), "pt") as f:
                    for k, core in enumerate(adapter.cores):
                        key = f"{site.name}{CORES}{k}"
                        if key not in f.keys():
                            raise TensorftError(f"adapter.experts: {d}: no {key} (the expert does not fit this model)")
                        t = f.get_tensor(key)
                        if tuple(t.shape) != tuple(core.shape[1:]):
                            raise TensorftError(
                                f"adapter.experts: {d}: {key} has shape {tuple(t.shape)}, this model needs {tuple(core.shape[1:])}"
                            )
                        core[e].copy_(t)

    def frozen_parameters(self, model, named):
        return {n for n in named if CORES in n or ".heads." in n}

    def lr_scales(self, model, named):
        return {n: self.options.router_lr_scale for n in named if CORES not in n and ".heads." not in n}

    def parameter_count(self, sites: list[Site]) -> int:
        """Everything saved: E experts' cores plus the router (only the router trains)."""
        E, r = len(self.options.expert_names), self.config.rank
        cores = 0
        for s in sites:
            modes = sum(self.modes(s), [])
            ranks = [1] + [r] * (len(modes) - 1) + [1]
            cores += sum(ranks[k] * m * ranks[k + 1] for k, m in enumerate(modes))
        router = (self.shape.hidden_size + 1) * E * (2 if self.options.noise else 1)
        heads = sum(math.prod(shape) for shape in (self.options.heads or {}).values())
        return E * (cores + heads) + router

    def describe_site(self, site: Site) -> str:
        i, o = self.modes(site)
        return f"{len(self.options.expert_names)} experts x in {'x'.join(map(str, i))}, out {'x'.join(map(str, o))}"

    # ------------------------------------------------------------------ routing

    def router(self, model) -> Router:
        return model.tensorft.shared

    def fsdp_units(self, root) -> list[nn.Module]:
        """FSDP2: the router's trained linear maps are FSDP units of their own (``shard_fsdp2``).
        Their only loss is the aux loss, which does not pass through the model's outputs: in
        the root unit, FSDP2's backward hooks (registered on the root's outputs) never fire,
        so their gradients would never be reduce-scattered. As units of their own, the hooks
        sit on the router's logits, which the aux loss does pass through."""
        router = root.shared
        return [m for m in (router.gate, router.noise) if m is not None]

    def base_hidden(self, model, inputs: dict) -> torch.Tensor:
        """The base model's final hidden states (adapters off, no grad, no cache)."""
        from ..model import disable_adapters

        self.router_passes += 1
        kwargs = {k: inputs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
                  if inputs.get(k) is not None}
        with torch.no_grad(), disable_adapters(model):
            return model.base_model(**kwargs, use_cache=False).last_hidden_state

    def route(self, model, inputs: dict) -> torch.Tensor:
        """Top-1 expert per row from the router (no noise: only training is noisy)."""
        hidden = self.base_hidden(model, inputs)
        pos = route_positions(inputs, hidden.shape[0], hidden.shape[1], hidden.device)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        with torch.no_grad():
            return self.router(model)(h, noisy=False).argmax(-1)

    def prepare_routing(self, model, frame: Routing, inputs: dict) -> Routing:
        state = model.tensorft.state
        if self.options.heads and not getattr(model, "_ttmoe_heads_hooked", False):
            self._install_head_hooks(model)
        memory = state.generation_memory(inputs.get("past_key_values"))
        ids = frame.inputs.get("expert_ids")
        if ids is None and memory and "expert_ids" in memory:  # a decode step: the prefill's choice
            return frame.replace(expert_ids=memory["expert_ids"], **{k: memory[k] for k in (GROUPS, FACTORS)})
        labels = frame.task_ids
        if ids is None and model.training and labels is not None:
            return self._training_frame(model, frame, inputs, labels)
        if ids is None:
            ids = self.route(model, inputs)
        ids = torch.as_tensor(ids).reshape(-1).long()
        if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.n_experts):
            raise TensorftError(f"adapter kind 'ttmoe': expert id out of range 0..{self.n_experts - 1}: {ids.tolist()}")
        ids = ids.to(self.router(model).gate.weight.device)  # row indices must live where the activations do
        groups = expert_groups(ids)
        routing = {GROUPS: groups}
        if memory is not None:  # generate: its decode steps reuse the choice (and what they gather)
            routing[FACTORS] = memory.setdefault(FACTORS, {})
            memory.update({"expert_ids": ids, GROUPS: groups})
        return frame.replace(expert_ids=ids, **routing)

    @property
    def n_experts(self) -> int:
        return len(self.options.expert_names)

    def _training_frame(self, model, frame: Routing, inputs: dict, labels) -> Routing:
        """A stage-2 step: this call runs as the base pass (adapters off); the hook on the base
        model's output computes the router loss from its final hidden state."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.device.type == "cpu" and labels.numel() and int(labels.max()) >= self.n_experts:
            raise TensorftError(f"adapter kind 'ttmoe': task label outside the experts 0..{self.n_experts - 1}")
        self._install_hook(model)
        ids = inputs.get("input_ids")
        ids = ids if ids is not None else inputs["inputs_embeds"]
        pos = route_positions(inputs, ids.shape[0], ids.shape[1], ids.device)
        return Routing({**frame.inputs, POSITIONS: pos}, enabled=False, aux=frame.aux)

    def _install_hook(self, model) -> None:
        base = model.base_model
        if getattr(base, "_ttmoe_hooked", False):
            return
        kind, state = self, model.tensorft.state

        def router_step(module, args, output):
            frame = state.frame
            pos = frame.inputs.get(POSITIONS)
            if pos is None:  # any other pass through the base (the inference router pass)
                return
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            # detached: no gradient into the base (nor a graph through it under checkpointing)
            h = hidden.detach()[torch.arange(hidden.shape[0], device=hidden.device), pos.to(hidden.device)]
            logits = kind.router(model)(h, noisy=True)
            labels = frame.task_ids.to(logits.device).reshape(-1).expand(logits.shape[0])
            frame.aux.add("router_ce", kind.options.router_loss_weight * F.cross_entropy(logits, labels))
            kind._record("train", labels, logits.detach().argmax(-1))

        model.tensorft.hook_handles.append(base.register_forward_hook(router_step))
        base._ttmoe_hooked = True

    def _install_head_hooks(self, model) -> None:
        """Each row's output of a classification head is its expert's head (the one the expert
        was trained with), grouped by expert like the adapted layers."""
        state, heads = model.tensorft.state, model.tensorft.shared.heads
        modules = sorted({name.rsplit(".", 1)[0] for name in self.options.heads})
        for module_name in modules:
            module = model.get_submodule(module_name)
            if not isinstance(module, nn.Linear):
                raise TensorftError(f"adapter kind 'ttmoe': head {module_name} is a {type(module).__name__}, not a linear layer")
            weight = heads[head_key(f"{module_name}.weight")]
            bias = heads[head_key(f"{module_name}.bias")] if head_key(f"{module_name}.bias") in heads else None
            for p in (weight, bias):
                if p is not None and hasattr(p, "ds_id"):
                    # ZeRO-3 gathers a module's own parameters for its forward: the stacked heads
                    # (the router's) are used by this head's forward hook, so declare them to it
                    from deepspeed.runtime.zero import register_external_parameter

                    register_external_parameter(module, p)

            def expert_head(module, args, output, weight=weight, bias=bias):
                frame = state.frame
                groups = frame.inputs.get(GROUPS)
                if groups is None or not frame.enabled:
                    return None  # adapters off (the router's base pass, a stage-2 step): the base head
                x = args[0].to(weight.dtype)
                if len(groups) == 1 and groups[0][1] is None:
                    e = groups[0][0]
                    return F.linear(x, weight[e], None if bias is None else bias[e]).to(output.dtype)
                out = x.new_zeros(*x.shape[:-1], weight.shape[1])
                for e, rows in groups:
                    out.index_copy_(0, rows, F.linear(x.index_select(0, rows), weight[e], None if bias is None else bias[e]))
                return out.to(output.dtype)

            # prepend: before ZeRO-3's own forward hook, which releases the gathered parameters
            model.tensorft.hook_handles.append(module.register_forward_hook(expert_head, prepend=True))
        model._ttmoe_heads_hooked = True

    def expert_modules(self, model, e: int) -> dict[str, torch.Tensor]:
        """Expert e's own head tensors by parameter name (its PEFT export's modules_to_save)."""
        heads = model.tensorft.shared.heads
        return {name: heads[head_key(name)][e] for name in self.options.heads or {}}

    def _record(self, split: str, labels, chosen) -> None:
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        chosen = chosen.reshape(-1).long().cpu()
        labels = labels.expand(chosen.shape[0])
        if labels.numel() and int(labels.max()) >= self.n_experts:
            return  # labels that name no expert are not router labels
        E = self.n_experts
        self.confusion[split] += torch.bincount(labels * E + chosen, minlength=E * E).reshape(E, E)

    # ------------------------------------------------------------------ reports

    def router_health(self, model) -> tuple[dict[str, float], dict]:
        """For metrics.jsonl (``MetricsCallback``): router accuracy on the training rows (with
        its training noise) and expert usage since the last log, summed over ranks (every rank
        calls this at each log)."""
        counts = _all_reduced(self.confusion["train"].clone())
        self.confusion["train"].zero_()
        return confusion_metrics(counts, self.options.expert_names, "router/"), {}

    def after_training(self, trainer, out: str) -> None:
        """Router accuracy on the held-out per-task sets (data.tasks.<name>.eval), the expert
        usage histogram and the MoE's per-task eval loss: printed and written to
        ``router_eval.json``. Every rank runs it (the trainer's evaluation is collective, and so
        are the router's base passes under FSDP2 and ZeRO-3); the router is scored on every
        held-out row once, the same rows on every rank (the trainer's distributed evaluation
        pads a rank's share with repeated rows), and the main rank writes."""
        import sys

        from ..saving import write_json

        if not trainer.eval_dataset:
            if trainer.args.should_save:
                print("tensorft: ttmoe: no held-out data (data.tasks.<name>.eval): router accuracy not measured",
                      file=sys.stderr)
            return
        metrics = trainer.evaluate()  # the MoE's eval loss per task (routed, experts applied)
        counts = self.score_router(trainer)
        if not trainer.args.should_save:
            return
        report = router_report(counts, self.options.expert_names)
        report["eval_loss"] = {k: v for k, v in metrics.items() if k.endswith("_loss")}
        write_json(os.path.join(out, "router_eval.json"), report)
        usage = ", ".join(f"{n} {c}" for n, c in report["usage"].items())
        print(f"tensorft: router accuracy on held-out data {report['accuracy']:.4f} "
              f"({report['rows']} rows); expert usage: {usage}", file=sys.stderr)


    @torch.no_grad()
    def score_router(self, trainer) -> torch.Tensor:
        """Confusion counts (task label x chosen expert) of the clean router on the trainer's
        tokenized held-out sets, each row once."""
        from ..distributed import is_fsdp2
        from ..model import unwrap

        model = unwrap(trainer.model)
        was_training = model.training
        model.eval()
        device = trainer.args.device
        sets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
        self.confusion["eval"].zero_()
        size = trainer.args.per_device_eval_batch_size
        sharded = is_fsdp2(model)
        if sharded:  # the base pass runs outside the model's forward: gather the root unit's parameters
            model.unshard()
        try:
            for ds in sets.values():
                for start in range(0, len(ds), size):
                    batch = trainer.data_collator([ds[i] for i in range(start, min(start + size, len(ds)))])
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    self._record("eval", batch["task_ids"], self.route(model, batch))
        finally:
            if sharded:
                model.reshard()
            model.train(was_training)
        return self.confusion["eval"].clone()


def confusion_metrics(counts: torch.Tensor, names: list[str], prefix: str) -> dict[str, float]:
    total = counts.sum().item()
    if total == 0:
        return {}
    out = {f"{prefix}accuracy": round(counts.diagonal().sum().item() / total, 6)}
    for e, name in enumerate(names):
        out[f"{prefix}usage/{name}"] = round(counts[:, e].sum().item() / total, 6)
    return out


def router_report(counts: torch.Tensor, names: list[str]) -> dict:
    """Accuracy overall and per task, the usage histogram (rows per chosen expert), the
    confusion matrix (rows: task label, columns: chosen expert)."""
    counts = counts.long()
    total = int(counts.sum())
    per_task = {
        name: round(counts[e, e].item() / counts[e].sum().item(), 6)
        for e, name in enumerate(names) if counts[e].sum() > 0
    }
    return {
        "accuracy": round(counts.diagonal().sum().item() / max(total, 1), 6),
        "rows": total,
        "per_task": per_task,
        "usage": {name: int(counts[:, e].sum()) for e, name in enumerate(names)},
        "experts": list(names),
        "confusion": counts.tolist(),
    }


def _all_reduced(counts: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = counts.to(backend_device)
        dist.all_reduce(reduced)
        return reduced.cpu()
    return counts
