"""The per-kind learning defaults (issue 8): every kind learns at the LoRA learning rate.

A user swaps ``adapter.kind: lora`` for ``cp`` or ``tt`` in a working config and keeps its
``lr``; the kinds' own learning-rate scales (``tensorft.optimizer_groups``) must make that work.
Checked on a tiny Llama and a fixed synthetic task: the loss falls about as fast as LoRA's.
"""

import math

import pytest
import torch

import tensorft
from tensorft.adapters.base import adam_pace_scale
from tensorft.adapters.cp import CP_LR_SCALE, CP_LR_SCALE_LOOP

from conftest import ATTN, MLP, tiny_llama

ALL_TARGETS = ATTN + MLP

STEPS, LR = 60, 1e-3  # a LoRA lr for this tiny model; the kinds scale it (x4 and more)


def synthetic_batches(n_batches=8, batch=8, seq=12, vocab=128, seed=0):
    """A fixed next-token task the base model does not know: each row repeats a random pattern."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        pattern = torch.randint(0, vocab, (batch, 3), generator=g)
        out.append(pattern.repeat(1, seq // 3))
    return out


def train_loss_drop(config: dict, lr: float = LR, steps: int = STEPS, layers: int = 2) -> float:
    """Loss before minus the mean loss of the last 5 steps, AdamW over tensorft's groups."""
    model = tensorft.attach(tiny_llama(layers=layers), config)
    model.train()
    opt = torch.optim.AdamW(tensorft.optimizer_groups(model, lr))
    batches = synthetic_batches()
    losses = []
    with torch.no_grad():
        first = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return first - sum(losses[-5:]) / 5


def test_cp_order_one_factors_get_lora_a_pace():
    model = tensorft.attach(tiny_llama(), {"kind": "cp", "rank": 4, "targets": ALL_TARGETS})
    groups = tensorft.optimizer_groups(model, 1e-3)
    shared = model.tensorft.shared
    c_ids = {id(p) for p in shared.c_factors()}
    for group in groups:  # the C's have a group of their own
        ids = {id(p) for p in group["params"]}
        assert ids <= c_ids or not ids & c_ids
    c_lr = next(g["lr"] for g in groups if id(g["params"][0]) in c_ids)
    a_lr = next(g["lr"] for g in groups if any(p is shared.attention.A for p in g["params"]))
    assert c_lr / a_lr == pytest.approx(adam_pace_scale(1.0, 64))


def test_tt_middle_cores_get_lora_a_pace():
    model = tensorft.attach(tiny_llama(), {"kind": "tt", "rank": 3, "targets": ["q_proj"], "tt_shapes": {"in": [4, 4, 4], "out": [4, 4, 4]}})
    groups = tensorft.optimizer_groups(model, 1e-3)
    site = next(iter(model.tensorft.layers.values())).adapter
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    base = lr_of[id(site.cores[0])]
    assert lr_of[id(site.cores[-1])] == pytest.approx(base)
    for core in list(site.cores)[1:-1]:
        assert lr_of[id(core)] / base == pytest.approx(adam_pace_scale(1 / math.sqrt(3), 64))


def test_lr_scale_key_overrides_the_kind_defaults():
    model = tensorft.attach(tiny_llama(), {"kind": "cp", "rank": 4, "targets": ["q_proj"], "lr_scale": 1.0})
    assert {g["lr"] for g in tensorft.optimizer_groups(model, 1e-3)} == {1e-3}


def test_tt_scale_is_alpha_over_rank_like_every_kind():
    model = tensorft.attach(tiny_llama(), {"kind": "tt", "rank": 4, "alpha": 8, "targets": ["q_proj"]})
    site = next(iter(model.tensorft.layers.values())).adapter
    assert site.scale == 2.0


def cp_multipliers(targets: list[str], **extra) -> dict[str, float]:
    """lr of each CP tensor's A relative to the config's lr, by tensor ("attention" / "mlp");
    "other": the rest (a modules_to_save copy)."""
    model = tensorft.attach(tiny_llama(), {"kind": "cp", "rank": 4, "targets": targets, **extra})
    shared = model.tensorft.shared
    lr_of = {id(p): g["lr"] / 1e-3 for g in tensorft.optimizer_groups(model, 1e-3) for p in g["params"]}
    out = {name: lr_of[id(t.A)] for name, t in (("attention", shared.attention), ("mlp", shared.mlp)) if t is not None}
    factors = {id(p) for p in shared.parameters()}
    others = {lr for pid, lr in lr_of.items() if pid not in factors}
    if others:
        (out["other"],) = others
    return pytest.approx(out)


def test_cp_multiplier_is_lower_where_a_tensor_writes_into_the_mode_it_reads():
    """o (down) write into the d_model mode that q/k/v (gate/up) read: such a tensor takes
    CP_LR_SCALE_LOOP, every other CP_LR_SCALE, each tensor on its own; a trained copy of a
    module (modules_to_save) keeps the config's lr."""
    assert CP_LR_SCALE_LOOP < CP_LR_SCALE
    assert cp_multipliers(["q_proj", "v_proj"]) == {"attention": CP_LR_SCALE}
    assert cp_multipliers(["q_proj", "k_proj", "v_proj"]) == {"attention": CP_LR_SCALE}
    assert cp_multipliers(["o_proj"]) == {"attention": CP_LR_SCALE}
    assert cp_multipliers(["v_proj", "o_proj"]) == {"attention": CP_LR_SCALE_LOOP}
    assert cp_multipliers(["gate_proj", "up_proj"]) == {"mlp": CP_LR_SCALE}
    assert cp_multipliers(["down_proj"]) == {"mlp": CP_LR_SCALE}
    assert cp_multipliers(ALL_TARGETS) == {"attention": CP_LR_SCALE_LOOP, "mlp": CP_LR_SCALE_LOOP}
    assert cp_multipliers(["q_proj", "v_proj", *MLP]) == {"attention": CP_LR_SCALE, "mlp": CP_LR_SCALE_LOOP}
    assert cp_multipliers(["q_proj", "v_proj"], modules_to_save=["lm_head"]) == {"attention": CP_LR_SCALE, "other": 1.0}


@pytest.mark.parametrize("config,layers", [
    ({"kind": "cp", "rank": 16, "targets": ALL_TARGETS}, 2),
    # reading-only tensors at their higher multiplier, on the deeper model (its thresholds are
    # the lower ones: bench/RESULTS.md, "cp's multiplier follows the shared mode's loop")
    ({"kind": "cp", "rank": 16, "targets": ["q_proj", "v_proj"]}, 8),
    ({"kind": "cp", "rank": 16, "targets": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]}, 8),
    ({"kind": "tt", "rank": 4, "targets": ALL_TARGETS}, 2),
], ids=["cp-all", "cp-qv-8-layers", "cp-readers-8-layers", "tt"])
def test_kind_learns_about_as_fast_as_lora_at_the_lora_lr(config, layers):
    lora = train_loss_drop({"kind": "lora", "rank": 8, "targets": config["targets"]}, layers=layers)
    kind = train_loss_drop(config, layers=layers)
    assert lora > 0.3  # the task is learnable at this lr
    # Within a factor of 2 of LoRA's loss drop at a fraction of its parameters.
    assert kind > 0.5 * lora, (kind, lora)


def relative_changes(config: dict, steps: int = 10, lr: float = LR) -> tuple[float, float]:
    """(||dC|| / ||C||, ||dA|| / ||A||) of CP's attention factors after ``steps`` AdamW steps."""
    model = tensorft.attach(tiny_llama(), config)
    model.train()
    tensor = model.tensorft.shared.attention
    c0, a0 = tensor.C_layers.detach().clone(), tensor.A.detach().clone()
    opt = torch.optim.AdamW(tensorft.optimizer_groups(model, lr))
    for step, b in zip(range(steps), synthetic_batches() * 2):
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    rel = lambda new, old: ((new.detach() - old).norm() / old.norm()).item()  # noqa: E731
    return rel(tensor.C_layers, c0), rel(tensor.A, a0)


def test_cp_c_factors_move_at_the_pace_of_a():
    """The mechanism behind the defaults: without the C's scale Adam leaves the order-one C's
    (and so every layer's and head's share of the update) near their init."""
    cp = {"kind": "cp", "rank": 8, "targets": ["q_proj", "v_proj"]}
    c, a = relative_changes(cp)
    assert 0.3 < c / a < 3, (c, a)
    c, a = relative_changes({**cp, "lr_scale": 1.0})
    assert c / a < 0.2, (c, a)
