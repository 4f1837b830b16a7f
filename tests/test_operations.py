"""Merge/unmerge, on/off switch, save/load, PEFT export: every operation, every mergeable kind."""

import json
import os

import pytest
import torch

import tensorft
from conftest import ATTN, MLP, randomize_adapters, tiny_bert, tiny_llama, tokens

KINDS = [
    {"kind": "lora", "rank": 4, "alpha": 8},
    {"kind": "cp", "rank": 4, "alpha": 8},
    {"kind": "tt", "rank": 4, "alpha": 2},
]
IDS = [k["kind"] for k in KINDS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama(kv_heads=2).save_pretrained(path)
    return str(path)


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def trained(path, adapter, targets=ATTN + MLP):
    model = tensorft.attach(load_base(path), {**adapter, "targets": targets})
    return randomize_adapters(model, scale=0.3)


@pytest.mark.parametrize("adapter", KINDS, ids=IDS)
def test_merge_unmerge(base_dir, adapter):
    model = trained(base_dir, adapter)
    ids = tokens()
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in model.tensorft.layers.items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        tensorft.merge(model)
        assert all(l.merged for l in model.tensorft.layers.values())
        assert any(not torch.equal(l.base_layer.weight, w0[n]) for n, l in model.tensorft.layers.items())
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=1e-5)
        tensorft.unmerge(model)
        for name, layer in model.tensorft.layers.items():
            torch.testing.assert_close(layer.base_layer.weight, w0[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", KINDS, ids=IDS)
def test_disable_adapters_gives_base_model(base_dir, adapter):
    base = load_base(base_dir)
    model = trained(base_dir, adapter)
    ids = tokens()
    with torch.no_grad():
        adapted = model(ids).logits
        with tensorft.disable_adapters(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        assert torch.equal(model(ids).logits, adapted)
        assert not torch.allclose(adapted, base(ids).logits)
        tensorft.merge(model)
        with pytest.raises(tensorft.TensorftError, match="unmerge"):
            with tensorft.disable_adapters(model):
                pass


@pytest.mark.parametrize("adapter", KINDS, ids=IDS)
def test_save_from_pretrained_round_trip_is_exact(base_dir, adapter, tmp_path):
    model = trained(base_dir, adapter)
    out = tmp_path / "adapter"
    tensorft.save(model, str(out))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["kind"] == adapter["kind"] and cfg["rank"] == 4 and cfg["base_model_name_or_path"] == base_dir
    loaded = tensorft.from_pretrained(str(out))
    for name, p in tensorft.adapter_parameters(model).items():
        assert torch.equal(p, tensorft.adapter_parameters(loaded)[name]), name
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # only adapter parameters are trainable after loading
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == set(tensorft.adapter_parameters(loaded))


def test_load_rejects_weights_of_another_adapter(base_dir, tmp_path):
    tensorft.save(trained(base_dir, KINDS[0], targets=["q_proj"]), str(tmp_path / "a"))
    other = tensorft.attach(load_base(base_dir), {"kind": "lora", "rank": 4, "targets": ["v_proj"]})
    with pytest.raises(tensorft.TensorftError, match="does not fit"):
        tensorft.load_adapter_weights(other, str(tmp_path / "a"))


@pytest.mark.parametrize("adapter", KINDS, ids=IDS)
def test_export_peft_gives_same_logits(base_dir, adapter, tmp_path):
    from peft import PeftModel

    model = trained(base_dir, adapter)
    out = tmp_path / "peft"
    tensorft.export_peft(model, str(out))
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4
    peft_model = PeftModel.from_pretrained(load_base(base_dir), str(out)).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_export_refuses_existing_output(base_dir, tmp_path):
    model = trained(base_dir, KINDS[1])
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "keep.txt").write_text("mine")
    with pytest.raises(tensorft.TensorftError, match="already exists"):
        tensorft.export_peft(model, str(tmp_path / "peft"))
    assert os.listdir(tmp_path / "peft") == ["keep.txt"]


def test_classification_head_is_trained_saved_and_exported(tmp_path):
    """BERT-style encoder for classification: adapters plus the new head (modules_to_save)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_path = tmp_path / "bert"
    tiny_bert().save_pretrained(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_path).eval()
    tensorft.attach(model, {"kind": "cp", "rank": 2, "targets": ["query", "value"], "modules_to_save": ["classifier"]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    randomize_adapters(model)
    ids = tokens()
    tensorft.save(model, str(tmp_path / "adapter"))
    loaded = tensorft.from_pretrained(str(tmp_path / "adapter"))
    assert type(loaded).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        tensorft.export_peft(model, str(tmp_path / "peft"))
        fresh = AutoModelForSequenceClassification.from_pretrained(base_path).eval()
        peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_attach_errors_are_one_clear_line():
    with pytest.raises(tensorft.ConfigError, match="adapter.targets: 'nope' matches no module"):
        tensorft.attach(tiny_llama(), {"kind": "lora", "targets": ["nope"]})
    with pytest.raises(tensorft.ConfigError, match="adapter.rank: must be at least 1"):
        tensorft.attach(tiny_llama(), {"kind": "cp", "rank": 0})
    with pytest.raises(tensorft.ConfigError, match=r"adapter.tt_shapes.in: product of \[4, 4\] is 16"):
        tensorft.attach(tiny_llama(), {"kind": "tt", "targets": ["q_proj"], "tt_shapes": {"in": [4, 4], "out": [8, 8]}})
    with pytest.raises(tensorft.ConfigError, match="adapter.kind: unknown kind 'cpx'"):
        tensorft.attach(tiny_llama(), {"kind": "cpx"})
    with pytest.raises(tensorft.ConfigError, match="adapter.tt_path: unknown key for kind 'lora'"):
        tensorft.attach(tiny_llama(), {"kind": "lora", "tt_path": "cores"})
    with pytest.raises(tensorft.ConfigError, match="cp needs to know which matrix"):
        tensorft.attach(tiny_llama(), {"kind": "cp", "targets": ["lm_head"]})
    model = tensorft.attach(tiny_llama(), {"kind": "lora", "targets": ["q_proj"]})
    with pytest.raises(tensorft.TensorftError, match="already has tensorft adapters"):
        tensorft.attach(model, {"kind": "lora", "targets": ["q_proj"]})


def test_unmergeable_kind_says_so_in_one_line(base_dir, tmp_path):
    """A kind whose update depends on the input (the routed kinds to come) refuses merge/export."""
    from tensorft.adapters.lora import Lora
    from tensorft.registry import _ADAPTERS, register_adapter

    @register_adapter("test-routed")
    class Routed(Lora):
        mergeable = exportable = False
        why_not_mergeable = "its router makes the update depend on the input"

    try:
        model = tensorft.attach(load_base(base_dir), {"kind": "test-routed", "rank": 2, "targets": ["q_proj"]})
        with pytest.raises(tensorft.TensorftError, match="'test-routed' cannot be merged: its router"):
            tensorft.merge(model)
        with pytest.raises(tensorft.TensorftError, match="cannot be exported as a PEFT LoRA adapter"):
            tensorft.export_peft(model, str(tmp_path / "x"))
        assert not (tmp_path / "x").exists()
    finally:
        del _ADAPTERS["test-routed"]


def test_corrupt_adapter_files_are_reported(base_dir, tmp_path):
    tensorft.save(trained(base_dir, KINDS[1], targets=["q_proj"]), str(tmp_path / "a"))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    model = tensorft.attach(load_base(base_dir), {"kind": "cp", "rank": 4, "targets": ["q_proj"]})
    with pytest.raises(tensorft.TensorftError, match="adapter_model.safetensors: cannot read"):
        tensorft.load_adapter_weights(model, str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(tensorft.TensorftError, match="adapter_config.json: invalid JSON"):
        tensorft.from_pretrained(str(tmp_path / "a"))
    with pytest.raises(tensorft.ConfigError, match="adapter: expected a mapping"):
        tensorft.config.parse_config({"adapter": ["q_proj"]})
