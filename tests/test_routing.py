"""The routing runtime: per-row routing inputs that hold through activation-checkpoint
recompute, backward after a context ends, nesting, generate (beams, several sequences per
prompt), a kind's model-level step, frozen-but-saved parameters and auxiliary losses in the
trainer. Test-only routed kinds on a tiny Llama."""

import json
import os

import pytest
import torch
import torch.nn as nn

import tensorft
from conftest import randomize_adapters, save_tiny_chat_llama, tiny_llama, tokens
from tensorft.adapters.base import AdapterKind, SiteAdapter
from tensorft.errors import TensorftError

TASKS = 3
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # attention and MLP sites


class TaskLoraSite(SiteAdapter):
    """``dy = B[t] A[t] x`` for a row of task t: one LoRA pair per task, stacked in one tensor
    (so a task absent from a batch still gets a (zero) gradient: DDP-safe)."""

    def __init__(self, site, rank, tasks):
        super().__init__(site)
        self.A = nn.Parameter(torch.zeros(tasks, rank, site.in_features))
        self.B = nn.Parameter(torch.zeros(tasks, site.out_features, rank))

    def forward(self, x, state):
        ids = state.require("task_ids", "routing_test_lora").to(x.device)
        h = torch.einsum("bsi,bri->bsr", x.to(self.A.dtype), self.A[ids])
        return torch.einsum("bsr,bor->bso", h, self.B[ids])


@tensorft.register_adapter("routing_test_lora")
class TaskLora(AdapterKind):
    mergeable = exportable = False

    def build_site(self, site, shared):
        return TaskLoraSite(site, self.config.rank, TASKS)

    def parameter_count(self, sites):
        return sum(TASKS * self.config.rank * (s.in_features + s.out_features) for s in sites)


@tensorft.register_adapter("routing_test_router")
class RoutedByBasePass(TaskLora):
    """A model-level step: without task ids, a first pass through the base model (adapters
    off) picks each row's task from the base logits of the prompt's last token; a generate
    call picks once at prefill and keeps the choice for its decode steps."""

    base_passes = 0

    def prepare_routing(self, model, frame, inputs):
        if frame.task_ids is not None:
            return frame
        memory = model.tensorft.state.generation_memory(inputs.get("past_key_values"))
        if memory and "task_ids" in memory:
            return frame.replace(task_ids=memory["task_ids"])
        type(self).base_passes += 1
        with torch.no_grad(), tensorft.disable_adapters(model):
            logits = model(input_ids=inputs["input_ids"]).logits  # nested: must not re-enter this step
        ids = pick_task(logits)
        if memory is not None:
            memory["task_ids"] = ids
        return frame.replace(task_ids=ids)


def pick_task(logits):
    return logits[:, -1].argmax(-1) % TASKS


@tensorft.register_adapter("routing_test_frozen_experts")
class FrozenExperts(TaskLora):
    """Experts' B factors are saved and loaded but not trained (the A factors train)."""

    def frozen_parameters(self, model, named):
        return {n for n in named if n.endswith(".B")}


class PullSite(SiteAdapter):
    """No update; adds the known auxiliary loss ``(w - 3)^2`` for every forward call."""

    def __init__(self, site):
        super().__init__(site)
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, state):
        state.add_aux_loss("pull", (self.w - 3.0) ** 2)
        return x.new_zeros(*x.shape[:-1], self.out_features) * self.w


@tensorft.register_adapter("routing_test_aux")
class AuxKind(AdapterKind):
    def build_site(self, site, shared):
        return PullSite(site)

    def parameter_count(self, sites):
        return len(sites)


def routed(kind="routing_test_lora", targets=TARGETS, seed=0):
    model = tensorft.attach(tiny_llama(seed=seed), {"kind": kind, "rank": 2, "targets": targets})
    return randomize_adapters(model, scale=0.3)


def adapter_grads(model, ids, task_ids, checkpointing=None, backward_under=None):
    """Gradients of the LM loss; ``backward_under``: other task ids set while backward runs."""
    model.zero_grad()
    model.train()
    if checkpointing is None:
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    with tensorft.task_context(model, task_ids):
        loss = model(ids, labels=ids).loss
    if backward_under is None:
        loss.backward()
    else:
        with tensorft.task_context(model, backward_under):
            loss.backward()
    model.eval()
    return {n: p.grad.clone() for n, p in tensorft.trainable_parameters(model).items()}


# --------------------------------------------------------------------------- checkpointing, backward


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_recompute_routes_like_the_forward(reentrant):
    model = routed()
    ids, task_ids = tokens(batch=3, seq=6), torch.tensor([0, 2, 1])
    expected = adapter_grads(model, ids, task_ids)
    assert all(g.abs().sum() > 0 for g in expected.values())
    got = adapter_grads(model, ids, task_ids, checkpointing=reentrant, backward_under=torch.tensor([1, 1, 1]))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_backward_after_leaving_task_context_uses_the_forward_ids():
    model = routed()
    ids = tokens(batch=2, seq=5)
    reference = adapter_grads(model, ids, torch.tensor([2, 0]))
    model.zero_grad()
    with tensorft.task_context(model, torch.tensor([2, 0])):
        loss = model(ids, labels=ids).loss
    loss.backward()  # outside the context: no recompute needed, ids were used in forward
    for name, p in tensorft.trainable_parameters(model).items():
        torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=0)
    assert model.tensorft.state.frame.task_ids is None  # nothing left behind


# --------------------------------------------------------------------------- contexts, rows


def test_nested_contexts_and_forward_kwargs_restore_correctly():
    model = routed()
    ids = tokens(batch=2, seq=5)
    a, b, c = torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([1, 0])
    plain = {tuple(t.tolist()): model(ids, task_ids=t).logits for t in (a, b, c)}
    state = model.tensorft.state
    with tensorft.task_context(model, a):
        torch.testing.assert_close(model(ids).logits, plain[(0, 1)])
        with tensorft.routing_context(model, task_ids=b):
            torch.testing.assert_close(model(ids).logits, plain[(2, 2)])
            torch.testing.assert_close(model(ids, task_ids=c).logits, plain[(1, 0)])  # the call wins
            torch.testing.assert_close(model(ids).logits, plain[(2, 2)])  # ...for that call only
            with tensorft.disable_adapters(model):
                assert state.frame.task_ids is b and not state.enabled
            assert state.enabled
        assert state.frame.task_ids is a
        torch.testing.assert_close(model(ids).logits, plain[(0, 1)])
    assert state.frame.task_ids is None
    with pytest.raises(TensorftError, match="no task_ids for this forward"):
        model(ids)


def test_mixed_task_batch_equals_each_task_alone():
    model = routed()
    ids, task_ids = tokens(batch=5, seq=6), torch.tensor([2, 0, 1, 0, 2])
    mixed = model(ids, task_ids=task_ids).logits
    for t in range(TASKS):
        rows = (task_ids == t).nonzero().flatten()
        alone = model(ids[rows], task_ids=task_ids[rows]).logits
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-6)
    # and routing matters: the same rows under another task differ
    assert not torch.allclose(mixed, model(ids, task_ids=(task_ids + 1) % TASKS).logits)


def test_routing_inputs_must_have_one_row_per_example():
    model = routed()
    with pytest.raises(TensorftError, match="task_ids has 2 rows but the batch has 3"):
        model(tokens(batch=3), routing={"task_ids": torch.tensor([0, 1])})


def test_a_routed_layer_outside_any_forward_is_reported():
    """What a recompute tensorft cannot replay looks like: a routed layer run with no call."""
    model = routed()
    layer = model.tensorft.layers["model.layers.0.self_attn.q_proj"]
    with tensorft.task_context(model, torch.tensor([0])):
        with pytest.raises(TensorftError, match="outside a model forward"):
            layer(torch.randn(1, 3, 64))


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("mode", ["sample-top1", "beams"])
def test_generate_routes_every_step_and_expands_per_sequence(mode):
    model = routed()
    prompts, task_ids = tokens(batch=3, seq=5, seed=3), torch.tensor([1, 2, 0])
    kw = dict(max_new_tokens=5, num_return_sequences=2, pad_token_id=0)
    kw |= dict(do_sample=True, top_k=1) if mode == "sample-top1" else dict(num_beams=2, do_sample=False)
    mask = torch.ones_like(prompts)  # (pad id 0 occurs in the prompts: no mask inferred from it)
    together = model.generate(prompts, attention_mask=mask, task_ids=task_ids, **kw)
    assert together.shape == (6, 10)
    for i in range(3):
        alone = model.generate(prompts[i : i + 1], attention_mask=mask[i : i + 1], task_ids=task_ids[i : i + 1], **kw)
        assert torch.equal(together[2 * i : 2 * i + 2], alone), i
    other = model.generate(prompts, attention_mask=mask, task_ids=(task_ids + 1) % TASKS, **kw)
    assert not torch.equal(other, together)  # the ids steered every sequence
    assert model.tensorft.state.frame.task_ids is None


def test_generate_under_task_context_without_expansion_is_refused_clearly():
    model = routed()
    prompts = tokens(batch=2, seq=4)
    with tensorft.task_context(model, torch.tensor([0, 1])):
        with pytest.raises(TensorftError, match="named keyword arguments"):
            model.generate(prompts, max_new_tokens=2, num_return_sequences=2, do_sample=True, pad_token_id=0)


# --------------------------------------------------------------------------- the model-level step


def test_model_level_step_routes_from_a_base_pass_and_keeps_it_for_decoding():
    model = routed("routing_test_router")
    ids = tokens(batch=4, seq=6, seed=5)
    with tensorft.disable_adapters(model):
        picked = pick_task(model(ids).logits)
    assert len(set(picked.tolist())) > 1  # a mixed batch, so routing per row is exercised
    RoutedByBasePass.base_passes = 0
    torch.testing.assert_close(model(ids).logits, model(ids, task_ids=picked).logits, rtol=0, atol=0)
    assert RoutedByBasePass.base_passes == 1  # one step per outer call; the nested pass skipped it

    RoutedByBasePass.base_passes = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    auto = model.generate(ids, **kw)
    assert RoutedByBasePass.base_passes == 1  # prefill only; decode steps reuse the choice
    assert torch.equal(auto, model.generate(ids, task_ids=picked, **kw))


# --------------------------------------------------------------------------- trainable vs saved


def test_frozen_parameters_are_saved_and_loaded_but_not_trained(tmp_path):
    from tensorft.saving import load_adapter_weights

    model = routed("routing_test_frozen_experts")
    saved, trainable = tensorft.adapter_parameters(model), tensorft.trainable_parameters(model)
    frozen = set(saved) - set(trainable)
    assert frozen and all(n.endswith(".B") for n in frozen) and all(n.endswith(".A") for n in trainable)
    assert all(not saved[n].requires_grad for n in frozen) and all(p.requires_grad for p in trainable.values())
    assert tensorft.count_parameters(model) == sum(p.numel() for p in trainable.values())
    grouped = {id(p) for g in tensorft.optimizer_groups(model, lr=1e-3) for p in g["params"]}
    assert grouped == {id(p) for p in trainable.values()}

    tensorft.save(model, str(tmp_path / "adapter"))
    fresh = tensorft.attach(tiny_llama(), {"kind": "routing_test_frozen_experts", "rank": 2, "targets": TARGETS})
    load_adapter_weights(fresh, str(tmp_path / "adapter"))
    for name, p in tensorft.adapter_parameters(fresh).items():
        assert torch.equal(p, saved[name]), name
        assert p.requires_grad == (name not in frozen)
    ids, t = tokens(), torch.tensor([1, 2])
    torch.testing.assert_close(fresh(ids, task_ids=t).logits, model(ids, task_ids=t).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- auxiliary losses


def test_aux_losses_are_collected_once_per_call_even_with_checkpointing():
    model = routed("routing_test_aux", targets=["q_proj"])  # 2 sites: aux = 2 (w - 3)^2
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    ids = tokens()
    with tensorft.collect_aux_losses(model) as aux:
        loss = model(ids, labels=ids).loss
        loss.backward()  # recompute runs the sites again: not counted twice
        expected = sum((layer.adapter.w.detach() - 3) ** 2 for layer in model.tensorft.layers.values())
    assert set(aux) == {"pull"}
    torch.testing.assert_close(aux["pull"].detach(), expected)


def test_aux_loss_reaches_the_sft_loss_scaled_for_accumulation_and_is_logged(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tensorft.trainers import MetricsCallback, TensorftSFTTrainer

    base = save_tiny_chat_llama(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = tensorft.attach(
        AutoModelForCausalLM.from_pretrained(base), {"kind": "routing_test_aux", "rank": 1, "targets": ["layers.0.self_attn.q_proj"]}
    )
    lr, accumulation = 0.05, 2
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=2, learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, max_length=16,
        activation_checkpointing=True, seed=0,
    )
    data = Dataset.from_list([{"text": f"colour number {i} is red"} for i in range(8)])
    metrics = tmp_path / "metrics.jsonl"
    model.enable_input_require_grads()
    trainer = TensorftSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[MetricsCallback(str(metrics))]
    )
    trainer.train()
    # The aux loss is the only thing w sees: d/dw (w - 3)^2 = 2 (w - 3), taken once per
    # optimizer step however many micro-batches it is split into.
    w1 = 0.0 - lr * 2 * (0.0 - 3.0)
    w2 = w1 - lr * 2 * (w1 - 3.0)
    w = model.tensorft.layers["model.layers.0.self_attn.q_proj"].adapter.w.item()
    assert w == pytest.approx(w2, rel=1e-5), (w, w2, "unscaled" if w > w2 else "")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    # window mean over the 4 micro-batches of steps 1 and 2
    assert rows[0]["aux/pull"] == pytest.approx((9.0 + (w1 - 3.0) ** 2) / 2, rel=1e-5)
    assert os.path.isfile(metrics)
