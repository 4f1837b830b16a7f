"""Each kind's output equals a dense float64 reference built from its own factors."""

import copy

import pytest
import torch

import tensorft
from conftest import ATTN, MLP, ShapeRecorder, randomize_adapters, tiny_bert, tiny_llama, tiny_mistral, tiny_qwen2, tokens

ALL = ATTN + MLP


# --------------------------------------------------------------------------- dense references
# Written from the papers' equations (methods.md), independently of the adapters' fast paths.


def cp_reference(model, site):
    """dW of one site from the full CP tensor ``[[A, B, C_h, C_l, C_m]]`` (float64)."""
    root = model.tensorft
    scale = root.config.alpha / root.config.rank
    if site.role in ("q", "k", "v", "o"):
        t = root.shared.attention
        heads = t.C_kv_heads if (site.role in ("k", "v") and t.C_kv_heads is not None) else t.C_heads
        # full[a, b, h, l, m] = sum_r A[a,r] B[b,r] C_h[h,r] C_l[l,r] C_m[m,r]
        full = torch.einsum("ar,br,hr,lr,mr->abhlm", t.A, t.B, heads, t.C_layers, t.C_matrices)
        s = full[:, :, :, site.layer, t.roles.index(site.role)] * scale  # d x d_head x H
        per_head = s.permute(2, 1, 0).reshape(-1, s.shape[0])  # (H d_head) x d: rows head-major
        return per_head.t() if site.role == "o" else per_head
    t = root.shared.mlp
    full = torch.einsum("ar,fr,lr,mr->aflm", t.A, t.B, t.C_layers, t.C_matrices)
    s = full[:, :, site.layer, t.roles.index(site.role)] * scale  # d x d_ffn
    return s if site.role == "down" else s.t()


def tt_reference(layer):
    """dW from contracting all TT cores into the full tensor (float64)."""
    ad = layer.adapter
    x = ad.cores[0].reshape(ad.cores[0].shape[1], -1)
    for core in list(ad.cores)[1:]:
        x = torch.einsum("ia,ajb->ijb", x, core).reshape(-1, core.shape[-1])
    full = x.reshape(layer.in_features, layer.out_features)  # (m_1..m_p) x (n_1..n_q)
    return full.t() * ad.scale


def lora_reference(layer):
    ad = layer.adapter
    return ad.lora_B @ ad.lora_A * ad.scale


def reference_delta(model, name):
    layer = model.tensorft.layers[name]
    kind = model.tensorft.config.kind
    if kind == "cp":
        return cp_reference(model, layer.site)
    return tt_reference(layer) if kind == "tt" else lora_reference(layer)


MODELS = {
    "llama-mha": lambda: tiny_llama(kv_heads=4),
    "llama-gqa": lambda: tiny_llama(kv_heads=2),
    "mistral-gqa": tiny_mistral,
    "qwen2-gqa-bias": tiny_qwen2,
}
KINDS = [
    {"kind": "lora", "rank": 3, "alpha": 6},
    {"kind": "cp", "rank": 3, "alpha": 6},
    {"kind": "tt", "rank": 3, "alpha": 2},
    {"kind": "tt", "rank": 3, "alpha": 2, "tt_path": "cores"},
]


def _id(cfg):
    return cfg["kind"] + ("-cores" if cfg.get("tt_path") == "cores" else "")


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("adapter", KINDS, ids=_id)
def test_each_layer_and_model_match_dense_reference(model_name, adapter):
    base = MODELS[model_name]().double()
    reference_model = copy.deepcopy(base)
    model = tensorft.attach(base, {**adapter, "targets": ALL}).double()
    randomize_adapters(model)
    with torch.no_grad():
        for name, layer in model.tensorft.layers.items():
            dw = reference_delta(model, name)
            assert dw.shape == layer.base_layer.weight.shape
            inp = torch.randn(5, 3, layer.in_features, dtype=torch.float64)
            want = torch.nn.functional.linear(inp, layer.base_layer.weight + dw, layer.base_layer.bias)
            torch.testing.assert_close(layer(inp), want, rtol=0, atol=1e-10)
            reference_model.get_submodule(name).weight += dw
        ids = tokens()
        torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("adapter", KINDS, ids=_id)
def test_bert_encoder_matches_dense_reference(adapter):
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    base = tiny_bert().double()
    reference_model = copy.deepcopy(base)
    model = tensorft.attach(base, {**adapter, "targets": targets}).double()
    roles = {layer.site.role for layer in model.tensorft.layers.values()}
    assert roles == {"q", "k", "v", "o", "up", "down"}
    randomize_adapters(model)
    with torch.no_grad():
        for name in model.tensorft.layers:
            reference_model.get_submodule(name).weight += reference_delta(model, name)
        ids = tokens()
        torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_name", ["llama-mha", "llama-gqa"])
@pytest.mark.parametrize("adapter", KINDS, ids=_id)
def test_output_equals_base_at_init(model_name, adapter):
    base = MODELS[model_name]()
    reference_model = copy.deepcopy(base)
    model = tensorft.attach(base, {**adapter, "targets": ALL})
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference_model(ids).logits)
    assert tensorft.count_parameters(model) > 0


def test_cp_orientation_heads_on_output_for_qkv_and_input_for_o():
    """Zeroing one head's C_h row removes exactly that head's rows of dq and columns of do."""
    model = tensorft.attach(tiny_llama(kv_heads=4), {"kind": "cp", "rank": 2, "targets": ATTN}).double()
    randomize_adapters(model)
    with torch.no_grad():
        model.tensorft.shared.attention.C_heads[1].zero_()
    dh = model.config.head_dim
    dq = model.tensorft.layers["model.layers.0.self_attn.q_proj"].adapter.delta_weight()
    do = model.tensorft.layers["model.layers.0.self_attn.o_proj"].adapter.delta_weight()
    assert dq[dh : 2 * dh].abs().max() == 0 and dq[:dh].abs().max() > 0
    assert do[:, dh : 2 * dh].abs().max() == 0 and do[:, :dh].abs().max() > 0


def test_cp_gqa_uses_separate_kv_head_factor_and_mha_does_not():
    gqa = tensorft.attach(tiny_llama(kv_heads=2), {"kind": "cp", "rank": 2, "targets": ATTN})
    t = gqa.tensorft.shared.attention
    assert t.C_heads.shape == (4, 2) and t.C_kv_heads.shape == (2, 2)
    mha = tensorft.attach(tiny_llama(kv_heads=4), {"kind": "cp", "rank": 2, "targets": ATTN})
    assert mha.tensorft.shared.attention.C_kv_heads is None
    # q and o only: no kv factor even on a GQA model
    qo = tensorft.attach(tiny_llama(kv_heads=2), {"kind": "cp", "rank": 2, "targets": ["q_proj", "o_proj"]})
    assert qo.tensorft.shared.attention.C_kv_heads is None


def test_cp_factors_registered_once():
    model = tensorft.attach(tiny_llama(), {"kind": "cp", "rank": 2, "targets": ALL})
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if "tensorft" in n or "adapter" in n]
    assert all(n.startswith("tensorft.shared.") for n in names)
    assert len(names) == len({id(p) for p in model.tensorft.parameters()})
    # each layer declares the shared factors it uses, for ZeRO-3 style gathering
    q = model.tensorft.layers["model.layers.1.self_attn.q_proj"].adapter
    down = model.tensorft.layers["model.layers.1.mlp.down_proj"].adapter
    assert {id(p) for p in q.external_parameters()} == {id(p) for p in model.tensorft.shared.attention.parameters()}
    assert {id(p) for p in down.external_parameters()} == {id(p) for p in model.tensorft.shared.mlp.parameters()}


def test_lora_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    ours = tensorft.attach(tiny_llama(kv_heads=2), {"kind": "lora", "rank": 4, "alpha": 8, "targets": ALL})
    randomize_adapters(ours)
    peft_model = get_peft_model(tiny_llama(kv_heads=2), LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    with torch.no_grad():
        for name, layer in ours.tensorft.layers.items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.adapter.lora_B)
        ids = tokens()
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=0, atol=1e-6)
    # Same init scheme as PEFT: A Kaiming-uniform with bound 1/sqrt(d_in), B zero.
    fresh = tensorft.attach(tiny_llama(), {"kind": "lora", "rank": 4, "targets": ["q_proj"]})
    a = fresh.tensorft.layers["model.layers.0.self_attn.q_proj"].adapter
    assert a.lora_B.abs().max() == 0 and 0.5 / 8 < a.lora_A.abs().max() <= 1 / 8


def test_tt_default_and_explicit_shapes():
    from tensorft.adapters.tt import balanced_factors

    assert balanced_factors(4096) == [16, 16, 16]
    assert balanced_factors(576) == [24, 24]
    assert balanced_factors(11008) == [43, 16, 16]
    assert balanced_factors(4096, 4) == [8, 8, 8, 8]
    model = tensorft.attach(
        tiny_llama(),
        {"kind": "tt", "rank": 2, "targets": ["q_proj", "down_proj"],
         "tt_shapes": {"q_proj": {"in": [4, 4, 4], "out": [2, 32]}}},
    )
    q = model.tensorft.layers["model.layers.0.self_attn.q_proj"].adapter
    assert [tuple(c.shape) for c in q.cores] == [(1, 4, 2), (2, 4, 2), (2, 4, 2), (2, 2, 2), (2, 32, 1)]
    down = model.tensorft.layers["model.layers.0.mlp.down_proj"].adapter
    assert down.in_modes == balanced_factors(128) == [16, 8] and down.out_modes == balanced_factors(64) == [8, 8]


def test_tt_cores_path_equals_factors_path():
    torch.manual_seed(0)
    model = tensorft.attach(tiny_llama(), {"kind": "tt", "rank": 4, "targets": ALL}).double()
    randomize_adapters(model)
    for layer in model.tensorft.layers.values():
        inp = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
        layer.adapter.path = "factors"
        a = layer.adapter(inp, model.tensorft.state)
        layer.adapter.path = "cores"
        b = layer.adapter(inp, model.tensorft.state)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("adapter", KINDS, ids=_id)
def test_training_step_never_builds_a_dense_update(adapter):
    """No tensor of a weight's shape (d_out x d_in) is created in forward + backward."""
    model = tensorft.attach(tiny_llama(kv_heads=2, hidden=96, heads=4), {**adapter, "targets": ALL})
    randomize_adapters(model)
    weight_shapes = {tuple(layer.base_layer.weight.shape) for layer in model.tensorft.layers.values()}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    ids = tokens(seq=5)
    recorder = ShapeRecorder()
    with recorder:
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert not (recorder.shapes & weight_shapes), recorder.shapes & weight_shapes
    grads = [p.grad for p in tensorft.adapter_parameters(model).values()]
    assert all(g is not None for g in grads)


def test_task_ids_reach_the_adapter_state_and_are_cleared():
    """Routed kinds will read ``state.task_ids``; forward(task_ids=...) passes them through."""
    model = tensorft.attach(tiny_llama(), {"kind": "lora", "rank": 2, "targets": ["q_proj"]})
    seen = []
    layer = model.tensorft.layers["model.layers.0.self_attn.q_proj"]
    original = layer.adapter.forward

    def spy(x, state, **kwargs):
        seen.append(None if state.task_ids is None else state.task_ids.tolist())
        return original(x, state, **kwargs)

    layer.adapter.forward = spy
    ids = tokens()
    model(ids, task_ids=torch.tensor([3, 1]))
    model(ids)
    with tensorft.task_context(model, torch.tensor([0, 2])):
        model(ids)
    assert seen == [[3, 1], None, [0, 2]]


@pytest.mark.parametrize("model_name", ["llama-mha", "llama-gqa", "bert"])
@pytest.mark.parametrize("adapter", KINDS[:3], ids=_id)
@pytest.mark.parametrize("targets", ["attention", "all"])
def test_closed_form_parameter_count_equals_real_count(model_name, adapter, targets):
    if model_name == "bert":
        model = tiny_bert()
        names = ["query", "key", "value", "attention.output.dense"]
        names += ["intermediate.dense", "output.dense"] if targets == "all" else []
    else:
        model = MODELS[model_name]()
        names = ATTN + (MLP if targets == "all" else [])
    tensorft.attach(model, {**adapter, "targets": names})
    root = model.tensorft
    sites = [layer.site for layer in root.layers.values()]
    assert root.kind.parameter_count(sites) == tensorft.count_parameters(model)
    assert tensorft.count_parameters(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)


class _OutputSizedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that write a tensor with ``numel`` elements (an adapted layer's output)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                    self.ops.append(func.__name__)
        return out


@pytest.mark.parametrize("kind", ["lora", "cp", "tt"])
def test_static_kinds_add_their_update_into_the_base_output(kind):
    """lora, cp and tt return ``base(x) + update`` from one addmm (scale in its alpha): same
    numbers as the separate sum, and fewer output-sized tensors written in forward + backward
    than PEFT's ``base + lora_B(lora_A(x)) * s`` (issue 13: faster than PEFT)."""
    from peft import LoraConfig, get_peft_model

    model = tensorft.attach(tiny_llama(kv_heads=2), {"kind": kind, "rank": 4, "alpha": 8, "targets": ["q_proj"]})
    randomize_adapters(model)
    layer = model.tensorft.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    separate = layer.base_layer(x) + layer.adapter(x, model.tensorft.state)  # the update alone, then +
    torch.testing.assert_close(layer(x), separate, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: bf16 like the base, bf16's rounding
        fused = layer(x)
        separate_bf16 = layer.base_layer(x) + layer.adapter(x, model.tensorft.state)
    assert fused.dtype == separate_bf16.dtype == torch.bfloat16
    size = separate.abs().max().item()
    assert (fused.float() - separate).abs().max() <= 2 * (separate_bf16.float() - separate).abs().max() + 1e-2 * size

    def written(module):
        counter = _OutputSizedOps(2 * 5 * layer.out_features)
        with counter:
            module(x).sum().backward()
        return counter.ops

    peft_layer = get_peft_model(tiny_llama(kv_heads=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_q = peft_layer.base_model.model.model.layers[0].self_attn.q_proj
    ours, theirs = written(layer), written(peft_q)
    assert len(ours) <= len(theirs) - 2, (ours, theirs)

    layer.base_layer.to(torch.bfloat16)  # a float32 adapter on a bf16 base, no autocast: the fallback
    with torch.no_grad():
        want = layer.base_layer(x.bfloat16()) + layer.adapter(x.bfloat16(), model.tensorft.state).bfloat16()
        torch.testing.assert_close(layer(x.bfloat16()), want, rtol=0, atol=0)


class _ThinMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmuls with an operand that has a dimension of ``rank`` (an adapter's thin ones)."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.count = rank, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            if any(isinstance(a, torch.Tensor) and self.rank in a.shape for a in args):
                self.count += 1
        return func(*args, **(kwargs or {}))


def _cp_step(model, ids):
    """Loss, the CP factors' gradients and the thin matmuls of one forward + backward."""
    model.zero_grad(set_to_none=True)
    counter = _ThinMatmuls(rank=3)
    with counter:
        loss = model(ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in tensorft.adapter_parameters(model).items()}
    return loss.detach(), grads, counter.count


@pytest.mark.parametrize("targets", [ATTN, ALL], ids=["attention", "all"])
def test_cp_computes_x_A_once_for_the_readers_of_a_layer(monkeypatch, targets):
    """q, k, v (gate, up) of one layer read ``x A`` with the one model-wide A: computed once, so
    fewer thin matmuls than once per site, with the same loss and gradients, also under
    activation checkpointing (whose recompute must save what the forward saved); not shared
    when each site draws its own dropout mask."""
    model = tensorft.attach(tiny_llama(kv_heads=2, layers=2), {"kind": "cp", "rank": 3, "alpha": 6, "targets": targets})
    randomize_adapters(model)
    ids = tokens(seq=5)
    shared = _cp_step(model, ids)
    with monkeypatch.context() as m:  # the reference: every site computes its own x A
        m.setattr(type(model.tensorft.state), "reuse_in_block", lambda self, key, inputs, compute: compute())
        per_site = _cp_step(model, ids)
    # Saved per layer: q,k,v: x A 3 -> 1 forward; backward its gradients into A and into x 6 -> 2
    # (gate, up: 1 and 2), but the first layer's attention input needs no gradient (frozen
    # embedding), so there its per-site run skips 3 of them too.
    saved = (2 + 4) * 2 - 2 + ((1 + 2) * 2 if targets == ALL else 0)
    assert per_site[2] - shared[2] == saved, (per_site[2], shared[2])

    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    checkpointed = _cp_step(model, ids)
    assert checkpointed[2] > shared[2]  # the blocks' forwards really ran again in backward
    for run in (shared, checkpointed):
        torch.testing.assert_close(run[0], per_site[0], rtol=1e-6, atol=1e-6)
        for name, g in per_site[1].items():
            torch.testing.assert_close(run[1][name], g, rtol=1e-5, atol=1e-6)

    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    with torch.inference_mode():  # inference tensors have no version counter to check
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-6, atol=1e-6)

    dropped = tensorft.attach(tiny_llama(kv_heads=2, layers=2),
                              {"kind": "cp", "rank": 3, "alpha": 6, "targets": targets, "dropout": 0.1})
    dropped.train()
    assert _cp_step(dropped, ids)[2] == per_site[2]  # each site draws its own mask: nothing shared
    dropped.eval()
    assert _cp_step(dropped, ids)[2] == shared[2]  # no dropout in eval: shared again
