"""The TensorPoly family (poly, mhr, tlora, tensorpoly1, tensorpoly2): math, routing, counts, init.

Dense references are written from the paper's equations with torch.kron and explicit loops,
independently of the adapters' factor-space paths.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tensorft
from conftest import ATTN, MLP, ShapeRecorder, randomize_adapters, tiny_llama, tokens
from tensorft.adapters.tensorpoly import tensor_side
from tensorft.errors import ConfigError, TensorftError

ALL = ATTN + MLP
ROUTED = {
    "poly": {"kind": "poly", "rank": 3, "alpha": 6, "n_tasks": 3, "n_skills": 4},
    "mhr": {"kind": "mhr", "rank": 3, "alpha": 6, "n_tasks": 3, "n_skills": 4, "n_splits": 4},
    "tensorpoly1": {"kind": "tensorpoly1", "rank": 3, "alpha": 6, "n_tasks": 3, "order": 3, "tensor_rank": 3},
    "tensorpoly2": {"kind": "tensorpoly2", "rank": 3, "alpha": 6, "n_tasks": 3, "order": 3, "tensor_rank": 3},
}
KINDS = {**ROUTED, "tlora": {"kind": "tlora", "rank": 3, "alpha": 6, "order": 3, "tensor_rank": 2}}


def attach(name, targets=ALL, dtype=torch.float64, **extra):
    model = tiny_llama(kv_heads=2)
    return tensorft.attach(model, {**KINDS[name], "targets": targets, **extra}).to(dtype)


def layers(model):
    return list(model.tensorft.layers.values())


def run_layer(layer, x, task_ids):
    """One adapted layer on its own, its adapter reading ``state.task_ids`` (model-level tests
    go through the model's forward and ``tensorft.task_context``)."""
    return layer.base_layer(x) + layer.adapter(x, SimpleNamespace(task_ids=task_ids))


# --------------------------------------------------------------------------- dense references


def entangled(vectors, d):
    """v_1 (x) v_2 (x) ... (x) v_N, cut to its first d entries (paper section 3.4)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.kron(out, v)
    return out[:d]


def rank_mix(T, d, alpha):
    """rows j: sum_k alpha_k (x)_i T[i, j, :, k]  (TLoRA with alpha = 1, TensorPoly-I)."""
    N, r, _, R = T.shape
    rows = [sum(alpha[k] * entangled([T[i, j, :, k] for i in range(N)], d) for k in range(R)) for j in range(r)]
    return torch.stack(rows)


def order_mix(T, d, alpha):
    """rows j: (x)_i sum_k alpha[i, k] T[i, j, :, k]  (TensorPoly-II)."""
    N, r, _, R = T.shape
    rows = [entangled([sum(alpha[i, k] * T[i, j, :, k] for k in range(R)) for i in range(N)], d) for j in range(r)]
    return torch.stack(rows)


def eval_alpha(ad, task):
    w = torch.sigmoid(ad.routing_logits[task])
    return w / w.sum(-1, keepdim=True)


def poly_pair(ad, alpha):
    """MHR (Poly: h = 1): head j mixes block j of A's input axis and of B's output axis."""
    S, r, d_in = ad.lora_A.shape
    h, d_out = alpha.shape[0], ad.lora_B.shape[1]
    ci, co = d_in // h, d_out // h
    A = torch.cat([sum(alpha[j, i] * ad.lora_A[i][:, j * ci : (j + 1) * ci] for i in range(S)) for j in range(h)], 1)
    B = torch.cat([sum(alpha[j, i] * ad.lora_B[i][j * co : (j + 1) * co] for i in range(S)) for j in range(h)], 0)
    return A, B


def reference_delta(kind, layer, task=None, alpha=None):
    """dW (d_out x d_in) of one layer for one task, from the equations."""
    ad = layer.adapter
    d_in, d_out = layer.in_features, layer.out_features
    if kind == "tlora":
        ones = torch.ones(ad.tensor_A.shape[-1], dtype=torch.float64)
        A, B = rank_mix(ad.tensor_A, d_in, ones), rank_mix(ad.tensor_B, d_out, ones).t()
    else:
        alpha = eval_alpha(ad, task) if alpha is None else alpha
        if kind in ("poly", "mhr"):
            A, B = poly_pair(ad, alpha)
        else:
            mix = rank_mix if kind == "tensorpoly1" else order_mix
            A, B = mix(ad.tensor_A, d_in, alpha), mix(ad.tensor_B, d_out, alpha).t()
    return ad.scale * B @ A


# --------------------------------------------------------------------------- tensor side q


@pytest.mark.parametrize(
    "d, order, q",
    [(3125, 5, 5), (3126, 5, 6), (4096, 5, 6), (4096, 4, 8), (4096, 3, 16), (4097, 3, 17), (4096, 2, 64),
     (11008, 3, 23), (512, 3, 8), (625, 4, 5), (1000, 3, 10), (1001, 3, 11), (7, 1, 7), (4096, 1, 4096), (1, 3, 1)],
)
def test_tensor_side_is_smallest_integer(d, order, q):
    assert tensor_side(d, order) == q


def test_tensor_side_brute_force():
    for order in range(1, 7):
        for d in range(1, 400):
            q = tensor_side(d, order)
            assert q**order >= d and (q == 1 or (q - 1) ** order < d), (d, order, q)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("kind", list(KINDS))
def test_factor_path_equals_dense_reference_per_task_in_a_mixed_batch(kind):
    """Every row of a mixed-task batch gets its own task's update (float64, 1e-10)."""
    model = randomize_adapters(attach(kind)).eval()
    task_ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        for layer in layers(model):
            x = torch.randn(4, 5, layer.in_features, dtype=torch.float64)
            got = run_layer(layer, x, task_ids)
            for row, task in enumerate(task_ids.tolist()):
                w = layer.base_layer.weight + reference_delta(kind, layer, task)
                torch.testing.assert_close(got[row], F.linear(x[row], w), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", list(ROUTED))
def test_mixed_task_batch_equals_each_task_run_separately(kind):
    model = randomize_adapters(attach(kind)).eval()
    ids, task_ids = tokens(batch=3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        with tensorft.task_context(model, task_ids):
            mixed = model(ids).logits
        for row, task in enumerate(task_ids.tolist()):
            alone = model(ids[row : row + 1], task_ids=torch.tensor([task])).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-10)
        # the tasks really differ
        assert not torch.allclose(model(ids[:1], task_ids=torch.tensor([1])).logits[0], mixed[0])


def test_poly_with_one_skill_equals_lora():
    poly = randomize_adapters(attach("poly", n_skills=1)).eval()
    lora = tensorft.attach(tiny_llama(kv_heads=2), {"kind": "lora", "rank": 3, "alpha": 6, "targets": ALL}).double()
    with torch.no_grad():
        for name, layer in poly.tensorft.layers.items():
            other = lora.tensorft.layers[name].adapter
            other.lora_A.copy_(layer.adapter.lora_A[0])
            other.lora_B.copy_(layer.adapter.lora_B[0])
        ids = tokens(batch=3)
        torch.testing.assert_close(
            poly(ids, task_ids=torch.tensor([0, 2, 1])).logits, lora(ids).logits, rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("kind", ["tensorpoly1", "tensorpoly2"])
def test_tensorpoly_with_tensor_rank_one_equals_tlora(kind):
    routed = randomize_adapters(attach(kind, tensor_rank=1)).eval()
    tlora = attach("tlora", tensor_rank=1)
    with torch.no_grad():
        for name, layer in routed.tensorft.layers.items():
            other = tlora.tensorft.layers[name].adapter
            other.tensor_A.copy_(layer.adapter.tensor_A)
            other.tensor_B.copy_(layer.adapter.tensor_B)
        ids = tokens(batch=3)
        torch.testing.assert_close(
            routed(ids, task_ids=torch.tensor([0, 2, 1])).logits, tlora(ids).logits, rtol=0, atol=1e-10
        )


def _one_hot_logits(shape, hot):
    z = torch.full(shape, -60.0, dtype=torch.float64)  # sigmoid(-60) ~ 1e-26
    z[..., hot] = 60.0
    return z


@pytest.mark.parametrize("kind", list(ROUTED))
def test_one_hot_routing_row_equals_that_expert_alone(kind):
    model = randomize_adapters(attach(kind)).eval()
    task, expert = 1, 2
    with torch.no_grad():
        for layer in layers(model):
            ad = layer.adapter
            ad.routing_logits[task] = _one_hot_logits(ad.routing_logits.shape[1:], expert)
            if kind in ("poly", "mhr"):  # the LoRA (A_s, B_s)
                dw = ad.scale * ad.lora_B[expert] @ ad.lora_A[expert]
            else:  # the simple tensor of rank `expert` (in every order for TensorPoly-II)
                T_A, T_B = ad.tensor_A[..., expert : expert + 1], ad.tensor_B[..., expert : expert + 1]
                one = torch.ones(1, dtype=torch.float64)
                dw = ad.scale * rank_mix(T_B, layer.out_features, one).t() @ rank_mix(T_A, layer.in_features, one)
            x = torch.randn(1, 4, layer.in_features, dtype=torch.float64)
            want = F.linear(x, layer.base_layer.weight + dw)
            torch.testing.assert_close(run_layer(layer, x, torch.tensor([task])), want, rtol=0, atol=1e-10)


def test_tensorpoly2_routes_each_order_separately():
    """A different one-hot rank per order picks the Kronecker product of those order factors."""
    model = randomize_adapters(attach("tensorpoly2")).eval()
    layer = layers(model)[0]
    ad = layer.adapter
    picks = [2, 0, 1]  # order i uses tensor rank picks[i]
    with torch.no_grad():
        for i, k in enumerate(picks):
            ad.routing_logits[0, i] = _one_hot_logits((3,), k)
        alpha = torch.zeros(3, 3, dtype=torch.float64)
        alpha[range(3), picks] = 1.0
        A, B, s = ad.task_lora_factors(0)
        torch.testing.assert_close(s * B @ A, reference_delta("tensorpoly2", layer, alpha=alpha), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", list(KINDS))
def test_task_lora_factors_reproduce_the_eval_forward(kind):
    model = randomize_adapters(attach(kind)).eval()
    with torch.no_grad():
        for layer in layers(model):
            for task in range(3):
                A, B, s = layer.adapter.task_lora_factors(task)
                assert A.shape == (3, layer.in_features) and B.shape == (layer.out_features, 3)
                x = torch.randn(2, 4, layer.in_features, dtype=torch.float64)
                got = run_layer(layer, x, torch.tensor([task, task]))
                want = F.linear(x, layer.base_layer.weight + s * B @ A)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", list(ROUTED))
def test_relaxed_bernoulli_in_training_sigmoid_in_eval(kind):
    model = randomize_adapters(attach(kind, targets=["q_proj"])).train()
    layer = layers(model)[0]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(run_layer(layer, x, ids), run_layer(layer, x, ids))  # a fresh sample
        model.eval()
        evaluated = run_layer(layer, x, ids)
        assert torch.equal(evaluated, run_layer(layer, x, ids))
        # routing: sigmoid makes training deterministic too, equal to evaluation
        layer.adapter.routing = "sigmoid"
        model.train()
        torch.testing.assert_close(run_layer(layer, x, ids), evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_relaxed_bernoulli_sample_is_torch_distributions_sample(temperature):
    """The routing sample (written out, no distribution objects per layer) is the one
    torch.distributions draws with the same generator state, gradient included."""
    from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

    from tensorft.adapters.task_routed import relaxed_bernoulli_sample

    logits = torch.randn(64, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    want = RelaxedBernoulli(torch.tensor(temperature, dtype=torch.float64), logits=logits).rsample()
    torch.manual_seed(7)
    got = relaxed_bernoulli_sample(logits, temperature)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    weights = torch.randn_like(want)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_routing_option_reaches_the_sites():
    model = attach("poly", targets=["q_proj"], routing="sigmoid", temperature=0.5)
    ad = layers(model)[0].adapter
    assert (ad.routing, ad.temperature) == ("sigmoid", 0.5)


# --------------------------------------------------------------------------- init and counts


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_equals_base_at_init(kind, mode):
    base = tiny_llama(kv_heads=2)
    reference = copy.deepcopy(base)
    model = tensorft.attach(base, {**KINDS[kind], "targets": ALL})
    getattr(model, mode)()
    ids = tokens(batch=3)
    with torch.no_grad():
        assert torch.equal(model(ids, task_ids=torch.tensor([0, 1, 2])).logits, reference(ids).logits)


@pytest.mark.parametrize("kind", ["tlora", "tensorpoly1", "tensorpoly2"])
def test_tensor_init_gives_lora_a_scale_and_zero_b(kind):
    cfg = {**KINDS[kind], "order": 2, "tensor_rank": 4, "targets": ["q_proj"]}
    model = tensorft.attach(tiny_llama(hidden=256, heads=4), cfg)
    A, B, _ = layers(model)[0].adapter.task_lora_factors(0)
    assert B.abs().max() == 0
    # LoRA's A: Kaiming-uniform with bound 1/sqrt(d_in), std 1/sqrt(3 d_in)
    assert 0.4 < A.std().item() * (3 * 256) ** 0.5 < 2.5


def _paper_formula(kind, cfg, d, T):
    r, N, R = cfg["rank"], cfg.get("order"), cfg.get("tensor_rank")
    q = tensor_side(d, N) if N else None
    return {
        "tlora": lambda: 2 * N * r * q * R,
        "poly": lambda: 2 * d * r * cfg["n_skills"] + T * cfg["n_skills"],
        "mhr": lambda: 2 * d * r * cfg["n_skills"] + T * cfg["n_splits"] * cfg["n_skills"],
        "tensorpoly1": lambda: 2 * N * r * q * R + T * R,
        "tensorpoly2": lambda: 2 * N * r * q * R + T * R * N,
    }[kind]()


@pytest.mark.parametrize("kind", list(KINDS))
def test_closed_form_parameter_count_equals_real_count_and_paper(kind):
    model = attach(kind, dtype=torch.float32)  # q, k, v, o, gate, up, down: square and not
    sites = [layer.site for layer in layers(model)]
    assert model.tensorft.kind.parameter_count(sites) == tensorft.count_parameters(model)
    assert tensorft.count_parameters(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # paper table 2 (per layer, d_in = d_out = d): on the square q and o projections
    square = attach(kind, targets=["q_proj", "o_proj"], dtype=torch.float32)
    sites = [layer.site for layer in layers(square)]
    per_layer = _paper_formula(kind, KINDS[kind], 64, 3)
    assert square.tensorft.kind.parameter_count(sites) == tensorft.count_parameters(square) == per_layer * len(sites)


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_step_never_builds_a_dense_update(kind):
    model = tiny_llama(kv_heads=2, hidden=96, heads=4)
    model = tensorft.attach(model, {**KINDS[kind], "targets": ALL}).train()
    randomize_adapters(model)
    weight_shapes = {tuple(layer.base_layer.weight.shape) for layer in layers(model)}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    weight_shapes |= {(b, *s) for s in weight_shapes for b in (1, 2)}  # nor one per row
    ids = tokens(seq=5)
    recorder = ShapeRecorder()
    with recorder:
        model(ids, labels=ids, task_ids=torch.tensor([0, 1])).loss.backward()
    assert not (recorder.shapes & weight_shapes), recorder.shapes & weight_shapes
    assert all(p.grad is not None for p in tensorft.adapter_parameters(model).values())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("poly", {"n_tasks": 0}, "adapter.n_tasks: must be at least 1"),
        ("poly", {"n_skills": 0}, "adapter.n_skills: must be at least 1"),
        ("mhr", {"n_splits": 0}, "adapter.n_splits: must be at least 1"),
        ("mhr", {"n_splits": 3}, "adapter.n_splits: 3 heads must divide"),
        ("tlora", {"order": 0}, "adapter.order: must be at least 1"),
        ("tensorpoly1", {"tensor_rank": 0}, "adapter.tensor_rank: must be at least 1"),
        ("tensorpoly2", {"temperature": 0}, "adapter.temperature: must be positive"),
        ("tensorpoly1", {"routing_lr_scale": -1}, "adapter.routing_lr_scale: must be positive"),
        ("poly", {"routing": "gumbel"}, "adapter.routing: 'gumbel' is not one of"),
        ("poly", {"order": 2}, "adapter.order: unknown key for kind 'poly'"),
        ("tlora", {"n_tasks": 2}, "adapter.n_tasks: unknown key for kind 'tlora'"),
    ],
)
def test_bad_options_are_one_line_config_errors(kind, extra, message):
    with pytest.raises(ConfigError) as err:
        tensorft.attach(tiny_llama(), {**KINDS[kind], "targets": ALL, **extra})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", list(ROUTED))
def test_missing_or_bad_task_ids_are_one_line_errors(kind):
    model = attach(kind, targets=["q_proj"])
    ids = tokens()
    with pytest.raises(TensorftError, match=f"adapter kind '{kind}': task ids are missing") as err:
        model(ids)
    assert "\n" not in str(err.value)
    with pytest.raises(TensorftError, match="task id out of range 0..2"):
        model(ids, task_ids=torch.tensor([0, 3]))
    # the site's own checks (the model forward may check row counts first)
    layer = layers(model)[0]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    with pytest.raises(TensorftError, match="got 3 task ids for a batch of 2 rows"):
        run_layer(layer, x, torch.tensor([0, 1, 2]))
    one = run_layer(layer, x, torch.tensor([1]))  # one id for every row
    torch.testing.assert_close(one, run_layer(layer, x, torch.tensor([1, 1])), rtol=0, atol=0)


def test_routed_kinds_refuse_to_merge_without_a_task_and_tlora_merges():
    with pytest.raises(TensorftError, match="name a task") as err:
        tensorft.merge(attach("tensorpoly1", targets=["q_proj"]))
    assert "\n" not in str(err.value)
    model = randomize_adapters(attach("tlora")).eval()
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
        tensorft.merge(model)  # merge adds dW in float32
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- few-shot hooks


@pytest.mark.parametrize("kind", list(ROUTED))
def test_add_task_rows(kind):
    model = randomize_adapters(attach(kind, targets=["q_proj", "down_proj"])).eval()
    root = model.tensorft
    old = {n: l.adapter.routing_logits.detach().clone() for n, l in root.layers.items()}
    assert root.kind.add_task(model, "new") == 3 and root.config.options.n_tasks == 4
    assert root.kind.add_task(model, "mean") == 4
    assert root.kind.add_task(model, "uniform") == 5
    for name, layer in root.layers.items():
        z = layer.adapter.routing_logits
        assert z.shape[0] == 6 and z.requires_grad
        torch.testing.assert_close(z[:3], old[name], rtol=0, atol=0)
        assert z[3].abs().max() <= 1e-3
        torch.testing.assert_close(z[4], z[:4].mean(0), rtol=0, atol=1e-12)  # rows existing then
        alpha = layer.adapter.mixing_weights(torch.tensor([5]), sample=False)
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / alpha.shape[-1]))
    model(tokens(), task_ids=torch.tensor([5, 4]))
    names = {n for n in tensorft.adapter_parameters(model) if n.endswith("routing_logits")}
    assert len(names) == len(root.layers)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", list(KINDS))
def test_short_training_reduces_loss_and_routing_gets_its_lr_scale(kind):
    model = tensorft.attach(tiny_llama(kv_heads=2), {**KINDS[kind], "targets": ALL}).train()
    lr = 1e-2
    groups = tensorft.optimizer_groups(model, lr=lr)
    routing = [p for n, p in tensorft.adapter_parameters(model).items() if n.endswith("routing_logits")]
    for p in routing:  # every routing parameter sits in a group with lr x routing_lr_scale
        (group,) = [g for g in groups if any(q is p for q in g["params"])]
        assert group["lr"] == pytest.approx(lr * 100.0)
    assert all(g["lr"] == lr for g in groups if not any(q is p for p in routing for q in g["params"]))
    assert bool(routing) == (kind != "tlora")
    opt = torch.optim.AdamW(groups)
    before = [p.detach().clone() for p in routing]
    ids, task_ids = tokens(batch=3, seq=8), torch.tensor([0, 1, 2])
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids, task_ids=task_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(not torch.equal(p, b) for p, b in zip(routing, before))
