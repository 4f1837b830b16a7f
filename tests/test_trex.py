"""T-REX (methods.md section 5): the factor-space math against a dense float64 reference, its
special cases (diagonal G: a mixture of rank-one LoRAs; constant G: a LoRA), no dense update,
the parameter formula, the intuition pipeline on the real all-MiniLM-L6-v2 (embedding,
k-means, cache, scores), intuition through checkpointing and generate, save / load, and a
launcher run (expert-usage metrics, load-balancing aux loss, merge / export refused, plot);
2 ranks (DDP, ZeRO-2, ZeRO-3, FSDP2 killed and resumed) and a run resumed from a checkpoint
equal the uninterrupted one-process run."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

import tensorft
from conftest import ATTN, MLP, ShapeRecorder, randomize_adapters, save_tiny_chat_llama, tiny_llama, tokens
from tensorft.adapters.base import AdapterState, Routing
from tensorft.adapters.trex import Trex, TrexOptions, TrexSite, expert_usage, trex_delta
from tensorft.errors import ConfigError, TensorftError
from tensorft.topology import Site

ALL = ATTN + MLP
K = 32  # default 4 x 8


def trex(model, **extra):
    return tensorft.attach(model, {"kind": "trex", "rank": 8, "alpha": 16, "targets": ALL, **extra})


def randomized(model, seed=1, scale=0.2):
    """Random adapter values, the gates kept near 0: w = sigmoid(100 w0) saturates (and stops
    learning) for |w0| >~ 0.1, where a plain random value would put it."""
    randomize_adapters(model, seed=seed, scale=scale)
    with torch.no_grad():
        for i, layer in enumerate(model.tensorft.layers.values()):
            if hasattr(layer.adapter, "gate"):
                layer.adapter.gate.fill_(0.004 * (i % 5 - 2))
    return model


def scores(rows, k=K, seed=0):
    return torch.rand(rows, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def call(site, x, intuition):
    """Run one site inside a call frame, as the model's forward does."""
    state = AdapterState()
    state.begin_call(Routing({"intuition": intuition}))
    try:
        return site(x, state)
    finally:
        state.end_call()


def make_site(I=4, J=8, d_in=24, d_out=20, seed=0, **options):
    torch.manual_seed(seed)
    site = TrexSite(Site("layer", "layer", None, 0, d_in, d_out), I, J, TrexOptions(rank_out=I, **options), 2.0, 0.0, 0.0)
    with torch.no_grad():
        for p in site.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return site


# --------------------------------------------------------------------------- the math


def test_output_equals_the_base_model_at_init():
    model = tiny_llama()
    ids = tokens(batch=3)
    with torch.no_grad():
        base = model(ids).logits
        trex(model)
        out = model(ids, intuition=scores(3)).logits
    assert torch.equal(out, base)
    assert all(layer.adapter.out_vectors.abs().sum() == 0 for layer in model.tensorft.layers.values())


def test_factor_space_equals_a_dense_float64_reference_per_token():
    site = make_site().double()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    intuition = scores(3).double()
    got = call(site, x, intuition)
    A, Bt, Wg = site.out_vectors, site.in_vectors, site.router
    w = torch.sigmoid(100.0 * site.gate)
    want = torch.empty(3, 5, 20, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            p = torch.softmax(Wg @ x[b, t], dim=0)
            G = (K * torch.softmax(w * K * p + (1 - w) * 4.0 * intuition[b], dim=0)).reshape(4, 8)
            dW = sum(G[i, j] * torch.outer(A[:, i], Bt[j]) for i in range(4) for j in range(8))  # d_out x d_in
            want[b, t] = 2.0 * dW @ x[b, t]
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-10)


def test_diagonal_G_is_a_mixture_of_rank_one_lora_experts():
    torch.manual_seed(0)
    I = J = 5
    A, Bt, x = torch.randn(12, I, dtype=torch.float64), torch.randn(J, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    g = torch.rand(4, I, dtype=torch.float64)
    G = torch.diag_embed(g)  # (4, I, I): one diagonal routing per token
    experts = torch.stack([torch.outer(A[:, i], Bt[i]) for i in range(I)])  # rank-one LoRAs a_i b_i^T
    want = torch.einsum("ti,iod,td->to", g, experts, x)
    torch.testing.assert_close(trex_delta(x, A, Bt, G), want, rtol=0, atol=1e-12)


def test_constant_G_is_a_lora():
    # router zero and no intuition weight: G = 1 for every expert and token
    site = make_site(intuition_scale=0.0).double()
    with torch.no_grad():
        site.router.zero_()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    got = call(site, x, scores(2).double())
    lora_A, lora_B = site.in_vectors, site.out_vectors @ torch.ones(4, 8, dtype=torch.float64)  # (A G) B^T, G = 1
    torch.testing.assert_close(got, 2.0 * F.linear(F.linear(x, lora_A), lora_B), rtol=0, atol=1e-10)


def test_no_dense_update_in_a_training_step():
    # K = 18, so no router-shaped tensor (K x d_in) can be mistaken for a weight (GQA k/v: 32 x 64)
    model = randomized(trex(tiny_llama(kv_heads=2), rank=6, rank_out=3))
    model.train()
    weight_shapes = set()
    for layer in model.tensorft.layers.values():
        weight_shapes |= {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    ids = tokens()
    recorder = ShapeRecorder()
    with recorder:
        model(ids, labels=ids, intuition=scores(2, k=18)).loss.backward()
    assert not (recorder.shapes & weight_shapes), recorder.shapes & weight_shapes
    trainable = tensorft.trainable_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_parameter_count_formula_matches_the_modules():
    model = trex(tiny_llama(kv_heads=2))
    sites = [layer.site for layer in model.tensorft.layers.values()]
    by_hand = sum(4 * s.out_features + (8 + 32) * s.in_features + 1 for s in sites)
    assert tensorft.count_parameters(model) == by_hand
    # the formula covers every saved tensor, the frozen 32 x 384 centroids included
    assert model.tensorft.kind.parameter_count(sites) == by_hand + 32 * 384
    # the centroids are saved but neither trained nor counted
    saved = tensorft.adapter_parameters(model)
    assert "tensorft.shared.centroids" in saved and tuple(saved["tensorft.shared.centroids"].shape) == (32, 384)
    assert "tensorft.shared.centroids" not in tensorft.trainable_parameters(model)
    plain = tensorft.attach(tiny_llama(), {"kind": "trex", "rank": 3, "rank_out": 2, "targets": ALL, "intuition": False})
    sites = [layer.site for layer in plain.tensorft.layers.values()]
    assert tensorft.count_parameters(plain) == sum(2 * s.out_features + 9 * s.in_features for s in sites)


def test_without_intuition_the_router_alone_routes():
    model = randomize_adapters(tensorft.attach(tiny_llama(), {"kind": "trex", "rank": 2, "rank_out": 2,
                                                              "targets": ALL, "intuition": False}), scale=0.3)
    ids = tokens()
    out = model(ids).logits  # no routing input needed
    with tensorft.disable_adapters(model):
        assert not torch.allclose(out, model(ids).logits)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_through_activation_checkpointing_equals_without(reentrant):
    model = randomized(trex(tiny_llama()))
    ids, intuition = tokens(batch=3, seq=6), scores(3)

    def grads(checkpointing):
        model.zero_grad()
        model.train()
        if checkpointing is None:
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable({"use_reentrant": checkpointing})
            model.enable_input_require_grads()
        model(ids, labels=ids, intuition=intuition).loss.backward()
        model.eval()
        return {n: p.grad.clone() for n, p in tensorft.trainable_parameters(model).items()}

    want = grads(None)
    assert all(g.abs().sum() > 0 for g in want.values())
    got = grads(reentrant)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # and the intuition matters: other scores give other gradients
    model.zero_grad()
    model.train()
    model(ids, labels=ids, intuition=scores(3, seed=5)).loss.backward()
    model.eval()
    gate = next(n for n in want if n.endswith(".gate"))
    assert not torch.allclose(dict(tensorft.trainable_parameters(model))[gate].grad, want[gate])


def test_training_forward_without_intuition_is_refused():
    model = trex(tiny_llama())
    model.train()
    with pytest.raises(TensorftError, match="needs each row's intuition scores"):
        model(tokens())


def test_load_balancing_loss_is_an_aux_loss():
    model = randomized(trex(tiny_llama(), load_balance_weight=0.5), scale=0.3)
    model.train()
    ids = tokens()
    with tensorft.collect_aux_losses(model) as aux:
        model(ids, labels=ids, intuition=scores(2)).loss
    assert set(aux) == {"load_balance"}
    # K sum f_k P_k >= 1 (equality for perfectly balanced routing), times the weight
    assert 0.5 <= float(aux["load_balance"].detach()) <= 0.5 * K


# --------------------------------------------------------------------------- intuition


def test_intuition_pipeline_on_minilm_reproducible_and_cached(tmp_path):
    from tensorft.intuition import compute, similarity

    texts = [f"What is {a} plus {b}?" for a in range(6) for b in range(2)] + [
        f"Translate '{w}' into French." for w in ("cat", "dog", "house", "tree", "water", "bread")
    ]
    first = compute(texts, "all-MiniLM-L6-v2", k=4, seed=0, cache_dir=str(tmp_path))
    assert not first.cached and first.embeddings.shape == (18, 384) and first.centroids.shape == (4, 384)
    torch.testing.assert_close(first.embeddings.norm(dim=-1), torch.ones(18))
    manual = F.normalize(first.embeddings, dim=-1) @ F.normalize(first.centroids, dim=-1).T
    torch.testing.assert_close(first.scores, manual)
    # arithmetic and translation prompts fall in different clusters
    nearest = first.scores.argmax(-1)
    assert not set(nearest[:12].tolist()) & set(nearest[12:].tolist())
    again = compute(texts, "all-MiniLM-L6-v2", k=4, seed=0, cache_dir=str(tmp_path))
    assert again.cached
    torch.testing.assert_close(again.scores, first.scores, rtol=0, atol=0)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 1
    fresh = compute(texts, "all-MiniLM-L6-v2", k=4, seed=0, cache_dir=None)  # recomputed: same
    torch.testing.assert_close(fresh.scores, first.scores, rtol=0, atol=1e-5)
    other = compute(texts[:-1], "all-MiniLM-L6-v2", k=4, seed=0, cache_dir=str(tmp_path))  # other data: a miss
    assert not other.cached
    torch.testing.assert_close(similarity(first.embeddings, first.centroids), first.scores)


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    return save_tiny_chat_llama(tmp_path_factory.mktemp("trex") / "tiny")


def chat_trex(chat_base, seed=1):
    from transformers import AutoModelForCausalLM

    model = randomized(trex(AutoModelForCausalLM.from_pretrained(chat_base), rank=2, rank_out=2), seed, scale=0.3)
    with torch.no_grad():
        model.tensorft.shared.centroids.copy_(F.normalize(torch.randn(4, 384, generator=torch.Generator().manual_seed(3)), dim=-1))
    return model.eval()


def test_generate_several_prompts_equals_each_alone_and_intuition_holds(chat_base):
    from transformers import AutoTokenizer

    model = chat_trex(chat_base)
    tok = AutoTokenizer.from_pretrained(chat_base)
    texts = ["Name a red fruit please", "Add two and three now", "Write a poem about snow"]
    ids = tok(texts, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == tok(texts[0], return_tensors="pt")["input_ids"].shape[1]  # same length: no padding
    kind = model.tensorft.kind
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    mask = torch.ones_like(ids)
    kind.intuition_calls = 0
    together = model.generate(ids, attention_mask=mask, **kw)
    assert kind.intuition_calls == 1  # at prefill; every decode step keeps the prompt's intuition
    computed = kind.intuition_of(model, ids, mask)
    assert computed.shape == (3, 4) and len({tuple(r) for r in computed.round(decimals=4).tolist()}) == 3
    assert torch.equal(together, model.generate(ids, attention_mask=mask, intuition=computed, **kw))
    for i in range(3):
        alone = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **kw)
        assert torch.equal(together[i : i + 1], alone), i
    # the intuition steers decoding: another prompt's scores for every row change the logits
    with torch.no_grad():
        a = model(ids, intuition=computed).logits
        b = model(ids, intuition=computed[[1, 2, 0]]).logits
    assert not torch.allclose(a, b)
    # several sequences per prompt: the intuition is expanded per sequence
    beams = model.generate(ids, attention_mask=mask, num_beams=2, num_return_sequences=2, **kw)
    assert beams.shape[0] == 6


def test_save_and_load_round_trip(chat_base, tmp_path):
    model = chat_trex(chat_base)
    tensorft.save(model, str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == "trex" and saved["encoder"] == "all-MiniLM-L6-v2" and saved["rank_out"] == 2
    loaded = tensorft.from_pretrained(str(tmp_path / "adapter")).eval()
    for name, p in tensorft.adapter_parameters(model).items():
        assert torch.equal(tensorft.adapter_parameters(loaded)[name], p), name
    ids = tokens(batch=2, seq=6, vocab=1000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)  # intuition from the prompt
    usage = expert_usage(loaded, [{"input_ids": ids}])
    assert len(usage) == len(loaded.tensorft.layers) and all(abs(sum(u) - 1) < 1e-4 for u in usage.values())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("extra, message", [
    ({"rank_out": 0}, "adapter.rank_out: must be at least 1, got 0"),
    ({"rank": 0}, "adapter.rank: must be at least 1, got 0"),
    ({"encoder": "/no/such/encoder"}, "adapter.encoder: /no/such/encoder: no such encoder directory"),
    ({"gate_sharpness": 0}, "adapter.gate_sharpness: must be positive"),
    ({"load_balance_weight": -1}, "adapter.load_balance_weight: must be at least 0"),
])
def test_bad_options_are_one_line_config_errors(extra, message):
    from tensorft.config import parse_adapter

    with pytest.raises(ConfigError, match=message) as e:
        parse_adapter({"kind": "trex", **extra})
    assert "\n" not in str(e.value)


def test_any_encoder_by_path_is_kept_absolute(tmp_path, monkeypatch):
    from tensorft.config import parse_adapter
    from tensorft.pretrained import minilm_l6_v2

    monkeypatch.chdir(os.path.dirname(minilm_l6_v2()))
    cfg = parse_adapter({"kind": "trex", "encoder": "./model"})
    assert cfg.options.encoder == minilm_l6_v2()  # saved with the adapter, usable from anywhere


def test_merge_and_export_are_refused():
    model = trex(tiny_llama())
    with pytest.raises(TensorftError, match="cannot be merged: its update depends on the input"):
        tensorft.merge(model)
    assert Trex.mergeable is False and Trex.exportable is False


# --------------------------------------------------------------------------- through the launcher


def write_config(work, name, adapter=None, train=None, data=None, distributed=None):
    cfg = {
        "model": {"name_or_path": str(work / "tiny")},
        "adapter": {"kind": "trex", "rank": 4, "rank_out": 2, "alpha": 8, "targets": ALL, **(adapter or {})},
        "data": data or {"train": str(work / "train.jsonl"), "format": "prompt-completion"},
        "train": {"output_dir": str(work / name), "max_steps": 8, "batch_size": 8, "lr": 0.01, "logging_steps": 2,
                  "save_steps": 100, "max_length": 48, **(train or {})},
        **({"distributed": distributed} if distributed else {}),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def work(chat_base):
    import pathlib

    work = pathlib.Path(chat_base).parent
    words = ["red", "green", "blue", "black", "white", "pink", "gray", "brown"]
    rows = [{"prompt": f"Colour: say {w}.", "completion": f" {w} {w}"} for w in words]
    rows += [{"prompt": f"Number: count to {n}.", "completion": " " + " ".join(map(str, range(1, n + 1)))} for n in range(2, 10)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::5]))
    pairs = [{"prompt": f"Colour: {w}?", "chosen": f" {w}", "rejected": f" {words[(i + 1) % 8]}"}
             for i, w in enumerate(words)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return work


def launch(config, *extra):
    from tensorft.train import main

    return main(["--config", config, *extra])


@pytest.fixture(scope="module")
def trained(work):
    data = {"train": str(work / "train.jsonl"), "eval": str(work / "dev.jsonl"), "format": "prompt-completion"}
    config = write_config(work, "sft", adapter={"load_balance_weight": 0.01}, data=data, train={"eval_steps": 8})
    code = launch(config)
    assert code == 0
    return work / "sft"


def test_sft_through_the_launcher_logs_router_health_and_learns(trained):
    logged = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert any("eval_loss" in r for r in logged)  # the held-out rows carry their intuition too
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    layers = [f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    for row in rows:
        assert "aux/load_balance" in row and row["aux/load_balance"] > 0
        for layer in layers:
            assert 0 < row[f"router/entropy/{layer}"] <= 1 + 1e-6
            usage = row["router/usage"][layer]
            assert len(usage) == 8 and abs(sum(usage) - 1) < 1e-4
        assert 0 < row["router/gate_mean"] < 1
    saved = json.loads((trained / "adapter_config.json").read_text())
    assert saved["encoder"] == "all-MiniLM-L6-v2"
    from safetensors.torch import load_file

    centroids = load_file(str(trained / "adapter_model.safetensors"))["tensorft.shared.centroids"]
    assert centroids.shape == (8, 384) and centroids.abs().sum() > 0
    cache = os.listdir(trained / "intuition")
    assert len([f for f in cache if f.endswith(".safetensors")]) == 1 and any(f.endswith(".json") for f in cache)


def test_dpo_carries_the_intuition_of_chosen_and_rejected(work):
    # a training forward without intuition is refused, so finishing proves the collator carried it
    data = {"train": str(work / "pairs.jsonl"), "format": "preference"}
    config = write_config(work, "dpo", data=data, train={"objective": "dpo", "max_steps": 2, "batch_size": 4,
                                                        "logging_steps": 1})
    assert launch(config) == 0
    first = json.loads(open(work / "dpo" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)  # A = 0: the policy is the reference
    assert "router/usage" in first


def test_collator_carries_intuition_per_row_and_per_copy():
    from tensorft.trainers import TaskIdsCollator

    def inner(features):
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}

    rows = [{"input_ids": [1, 2], "intuition": [0.1, 0.2, 0.3]}, {"input_ids": [3, 4], "intuition": [0.4, 0.5, 0.6]}]
    batch = TaskIdsCollator(inner, copies=2)(rows)
    assert batch["intuition"].dtype == torch.float32 and batch["intuition"].shape == (4, 3)
    torch.testing.assert_close(batch["intuition"][2:], batch["intuition"][:2])
    assert "task_ids" not in batch


def test_trained_adapter_generates_with_no_extra_step(trained):
    from transformers import AutoTokenizer

    model = tensorft.from_pretrained(str(trained)).eval()
    tok = AutoTokenizer.from_pretrained(str(trained.parent / "tiny"))
    ids = tok(["Colour: say red."], return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    assert model.tensorft.kind.intuition_calls == 1


def test_merge_and_export_commands_refuse_in_one_line(trained, tmp_path, capsys):
    from tensorft.cli import run

    for command in ("merge", "export-peft"):
        assert run([command, str(trained), str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "adapter kind 'trex' cannot be" in err and "depends on the input" in err, err
        assert not (tmp_path / command).exists()


def test_expert_usage_plot(trained, tmp_path):
    from evaluation.expert_usage_plot import main

    out = tmp_path / "usage.png"
    assert main([str(trained), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = tmp_path / "measured.png"  # usage measured on prompts, the adapter loaded
    assert main([str(trained), "--out", str(measured), "--data", str(trained.parent / "dev.jsonl"),
                 "--format", "prompt-completion", "--limit", "3"]) == 0
    assert measured.read_bytes()[:4] == b"\x89PNG"
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("adapter, message", [
    ({"encoder": "/no/such/encoder"}, "adapter.encoder: /no/such/encoder: no such encoder directory"),
    ({"rank": 8, "rank_out": 4}, "32 intuition centroids, but there are only 16 examples"),
    ({"rank_out": 0}, "adapter.rank_out: must be at least 1"),
])
def test_bad_input_one_line_exit_2_nothing_written(work, capsys, adapter, message):
    assert launch(write_config(work, "bad-run", adapter=adapter)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("tensorft: error: ") and message in lines[-1], lines
    assert not (work / "bad-run").exists()


def test_lm_eval_wrapper_evaluates_a_trex_adapter_with_no_extra_step(trained, tmp_path):
    import sys

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)  # the evaluation package lives at the repository root
    from evaluation.lm_eval import TensorftLM

    rows = [{"sentence": s, "label": l, "idx": i} for i, (s, l) in enumerate(
        [("a warm and funny delight", 1), ("dull and far too long", 0), ("i loved it", 1), ("a mess", 0)])]
    for split in ("train", "validation"):
        path = tmp_path / "data" / "glue" / "sst2" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = TensorftLM(adapter=str(trained), batch_size=4)
    tm = TaskManager(include_path=os.path.join(root, "evaluation", "tasks"),
                     metadata={"data_dir": str(tmp_path / "data"), "pretrained": str(trained)})
    results = simple_evaluate(model=lm, tasks=["sst2_local"], task_manager=tm)
    assert 0 <= results["results"]["sst2"]["acc,none"] <= 1
    # each row's intuition came from its context alone (lm-eval's requests), never from its ids
    assert lm.model.tensorft.kind.intuition_calls == 0
    contexts = [f"{r['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:" for r in rows]
    assert len(lm._row_prompts([((c, " positive"), lm.tok_encode(c), lm.tok_encode(" positive")) for c in contexts])[0]) == 4
    assert results["config"]["tensorft"]["kind"] == "trex"


# --------------------------------------------------------------------------- 2 ranks


def two_rank_config(work, name, batch_size, distributed=None, save_steps=100):
    # no load-balancing loss: it is a per-micro-batch statistic, so 2 x 4 rows differ from 8
    return write_config(work, name, train={"max_steps": 4, "batch_size": batch_size, "logging_steps": 1,
                                           "save_steps": save_steps}, distributed=distributed)


@pytest.fixture(scope="module")
def one_process(work):
    # checkpoints at steps 2 and 4: the stopped-at-a-checkpoint run below starts from the first
    assert launch(two_rank_config(work, "single", batch_size=8, save_steps=2)) == 0
    return work / "single"


DISTRIBUTED = {"zero2": {"strategy": "deepspeed", "zero_stage": 2}, "zero3": {"strategy": "deepspeed", "zero_stage": 3}}


@pytest.mark.slow  # 4 torchrun launches (5 for fsdp: killed, then resumed): ~2 min here, more on contended cores
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_ranks_match_one_process(work, one_process, strategy):
    """DDP and ZeRO-2 replicate the adapter, ZeRO-3 and FSDP2 shard it; the FSDP2 run is
    SIGKILLed after its first checkpoint and started again: it resumes (factors, router, gates,
    optimizer state, data position; the intuition scores from the run's cache) and ends where
    the uninterrupted one-process run does."""
    from test_train import assert_same_run, kill_after_first_checkpoint, run_info, torchrun

    distributed = DISTRIBUTED.get(strategy, {"strategy": strategy})
    config = two_rank_config(work, strategy, batch_size=4, distributed=distributed,
                             save_steps=1 if strategy == "fsdp" else 100)
    if strategy == "fsdp":
        kill_after_first_checkpoint(config, work / strategy)
    p = torchrun(config)
    assert p.returncode == 0, p.stderr[-3000:]
    if strategy == "fsdp":
        assert "resuming from" in p.stderr and "checkpoint-1" in p.stderr, p.stderr[-3000:]
    info = run_info(work / strategy)
    assert info["world_size"] == 2 and info["process_group"] == 2
    if strategy in ("ddp", "zero2"):  # parameters stay whole on every rank
        assert info["adapter"]["local"] == info["adapter"]["full"]
        tol = (2e-3, 1e-4) if strategy == "ddp" else (1e-4, 1e-5)
        assert_same_run(work / strategy, one_process, loss_tol=tol[0], weight_tol=tol[1])
    else:  # really sharded: about half of the adapter on each rank; each layer's 1-element gate
        # is split too, but one element cannot be smaller on rank 0 than in full
        assert info["adapter"]["sharded_tensors"] == info["adapter"]["tensors"] - 14 > 0, info
        assert info["adapter"]["local"] <= info["adapter"]["full"] // 2 + 64, info
        assert_same_run(work / strategy, one_process, loss_tol=1e-4, weight_tol=1e-5)
    rows = [json.loads(line) for line in open(work / strategy / "metrics.jsonl") if '"loss"' in line]
    ref = [json.loads(line) for line in open(one_process / "metrics.jsonl") if '"loss"' in line]
    for got, want in zip(rows, ref):  # router usage summed over the ranks: the one-process usage
        assert abs(got["router/entropy_mean"] - want["router/entropy_mean"]) < 1e-4


def test_run_stopped_at_a_checkpoint_then_resumed_equals_the_uninterrupted_run(work, one_process, capsys):
    """The output directory as a run stopped after checkpoint-2 leaves it (final adapter and
    checkpoint-4 gone, a metrics line cut short): the same command resumes from checkpoint-2
    (router, gates, factors, optimizer state, data position, the cached intuition) and ends
    with the uninterrupted run's adapter and losses."""
    import shutil

    from test_train import assert_same_run

    out = work / "resumed"
    shutil.copytree(one_process, out)
    for leftover in ("FINISHED", "adapter_model.safetensors", "adapter_config.json", "checkpoints/checkpoint-4"):
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a line cut short by the stop
    capsys.readouterr()
    assert launch(two_rank_config(work, "resumed", batch_size=8, save_steps=2)) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-2" in err, err[-2000:]
    assert "read from the cache" in err  # the embeddings and centroids the run computed before
    assert_same_run(out, one_process, loss_tol=1e-6, weight_tol=1e-6)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_only_the_adapter(tmp_path, quantization):
    from tensorft.config import ModelConfig
    from tensorft.loading import load_base_model

    tiny_llama(kv_heads=2).save_pretrained(tmp_path / "base")
    model = load_base_model(ModelConfig(name_or_path=str(tmp_path / "base"), quantization=quantization))
    randomized(trex(model, rank=2, rank_out=2))
    model.train()
    ids = tokens()
    model(ids, labels=ids, intuition=scores(2, k=4)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(tensorft.trainable_parameters(model))  # adapter only; centroids frozen
    assert all(p.grad.abs().sum() > 0 for p in tensorft.trainable_parameters(model).values())


# --------------------------------------------------------------------------- memory per step


def old_forward(site, x, intuition, state):
    """The plain-autograd formulation before the routing function (issue 10's first version):
    the same math, but autograd keeps the logits and B^T x, both softmax outputs and h."""
    rows = x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x
    if isinstance(site.dropout, torch.nn.Identity):
        logits, v = F.linear(rows, torch.cat([site.router, site.in_vectors])).split([site.K, site.J], dim=-1)
    else:
        logits, v = F.linear(rows, site.router), F.linear(site.dropout(rows), site.in_vectors)
    P = torch.softmax(logits, dim=-1)
    if site.use_intuition:
        w = site.gate_value()
        score = intuition.to(P.dtype).expand(rows.shape[0], site.K).reshape(rows.shape[0], 1, site.K)
        P = torch.softmax(w * site.K * P + (1 - w) * site.intuition_scale * score, dim=-1)
    P = P.reshape(*P.shape[:-1], site.I, site.J)
    h = torch.einsum("...ij,...j->...i", P, v)
    y = F.linear(h, site.out_vectors * (site.scale * site.K))
    if site.training:
        site._router_statistics(P, state, rows.shape[:2])
    return y.reshape(*x.shape[:-1], site.out_features)


@pytest.mark.parametrize("case", ["intuition", "router-only", "dropout", "2d", "load-balance"])
def test_routing_function_equals_the_plain_autograd_formulation(case):
    # float64: output and every gradient (parameters, x, the intuition, the aux loss's) agree
    options = {"intuition": case != "router-only"}
    site = make_site(**options).double()
    site.lb_weight = 0.3 if case == "load-balance" else 0.0
    if case == "dropout":
        site.dropout = torch.nn.Dropout(0.25)
    site.train()
    shape = (15, 24) if case == "2d" else (3, 5, 24)
    x0 = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    intuition0 = scores(1 if case == "2d" else 3).double()

    def run(forward):
        site.zero_grad()
        x, intuition = x0.clone().requires_grad_(), intuition0.clone().requires_grad_()
        state = AdapterState()
        state.begin_call(Routing({"intuition": intuition}))
        with state.collect_aux() as aux:
            torch.manual_seed(7)  # the same dropout mask
            y = forward(site, x, state) if forward is not None else old_forward(site, x, intuition, state)
            state.end_call()
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + sum(aux.values(), 0.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in site.named_parameters()}
        grads |= {"x": x.grad, "intuition": intuition.grad if site.use_intuition else None}
        return y.detach(), grads, {k: float(v.detach()) for k, v in aux.items()}

    y_new, g_new, aux_new = run(lambda s, x, state: s(x, state))
    y_old, g_old, aux_old = run(None)
    torch.testing.assert_close(y_new, y_old, rtol=0, atol=1e-13)
    assert aux_new.keys() == aux_old.keys() == ({"load_balance"} if case == "load-balance" else set())
    for k in aux_new:
        assert aux_new[k] == pytest.approx(aux_old[k], rel=1e-13)
    for name, want in g_old.items():
        if want is None:
            assert g_new[name] is None
            continue
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(g_new[name], want, rtol=0, atol=1e-12, msg=name)


def saved_bytes(layer, x, *params):
    """Bytes of the distinct storages autograd keeps for backward of ``layer(x)``, leaving out
    x's (the base layer keeps x for its own backward) and the parameters'."""
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def test_saved_for_backward_is_at_most_loras_at_equal_parameters():
    from tensorft.adapters.lora import LoraSite

    # issue 10: peak memory per step no higher than lora at equal trainable parameters; per
    # token and adapted layer plain autograd kept ~108 values at 4 x 8 against lora's r = 22
    d, rows, seq = 64, 4, 128
    site = make_site(d_in=d, d_out=d)
    site.train()
    trex_params = sum(p.numel() for p in site.parameters())
    rank = round(trex_params / (2 * d))  # 2817 / 128 -> 22
    lora = LoraSite(Site("layer", "layer", None, 0, d, d), rank, 2.0, 0.0)
    assert abs(sum(p.numel() for p in lora.parameters()) - trex_params) <= d
    x = torch.randn(rows, seq, d, requires_grad=True)
    intuition = scores(rows)

    def trex_layer(forward):
        def layer(x):
            state = AdapterState()
            state.begin_call(Routing({"intuition": intuition}))
            try:
                return forward(x, state)
            finally:
                state.end_call()
        return layer

    params = list(site.parameters()) + list(lora.parameters())
    lora_bytes = saved_bytes(lambda x: lora(x, AdapterState()), x, *params)
    new_bytes = saved_bytes(trex_layer(site), x, *params)
    old_bytes = saved_bytes(trex_layer(lambda x, state: old_forward(site, x, intuition, state)), x, *params)
    tokens_ = rows * seq
    assert lora_bytes == (tokens_ * rank + rank * d) * 4  # x A^T, and B^T in row-major (lora_update)
    # margin 0: at most lora's; per token only h (I = 4 values), plus per layer the scaled A
    # (d_out x I), the intuition (rows x K) and w
    assert new_bytes <= lora_bytes, (new_bytes / tokens_ / 4, lora_bytes / tokens_ / 4)
    assert new_bytes <= (tokens_ * 4 + d * 4 + rows * K + 1) * 4
    assert old_bytes > 4 * lora_bytes  # what the test guards against: ~108 values per token


def test_routing_function_under_bf16_autocast_matches_float32():
    """The trainers run forward under bf16 autocast and backward outside it (train.bf16): the
    routing function computes in the parameters' dtype both times (a bf16 forward and a float32
    recompute met in backward: "expected scalar type Float but found BFloat16")."""
    site = make_site(intuition=True).train()
    with torch.no_grad():
        site.out_vectors.normal_()
    x0 = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(3))

    def run(autocast: bool):
        site.zero_grad()
        x = x0.clone().requires_grad_()
        state = AdapterState()
        state.begin_call(Routing({"intuition": scores(3)}))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = site(x, state)
        state.end_call()
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.float().detach(), {n: p.grad.clone() for n, p in site.named_parameters()}

    y16, g16 = run(True)
    y32, g32 = run(False)
    # bf16 outside the routing function (the output product): bf16's relative precision
    torch.testing.assert_close(y16, y32, rtol=0, atol=0.02 * y32.abs().max().item())
    for name, want in g32.items():
        assert torch.isfinite(g16[name]).all(), name
        torch.testing.assert_close(g16[name], want, rtol=0.1, atol=0.05 * want.abs().max().item() + 1e-6, msg=name)
