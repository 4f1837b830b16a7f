"""bitsandbytes bases (nf4, fp4 4-bit; int8) and bf16: forward, backward, only adapters learn."""

import pytest
import torch

import tensorft
from conftest import ATTN, MLP, randomize_adapters, tiny_llama, tokens
from tensorft.config import ModelConfig
from tensorft.loading import load_base_model

KINDS = ["lora", "cp", "tt"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qbase") / "tiny-llama"
    tiny_llama(kv_heads=2).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_forward_backward(base_dir, quantization, kind):
    import bitsandbytes as bnb

    model = load_base_model(ModelConfig(name_or_path=base_dir, quantization=quantization))
    tensorft.attach(model, {"kind": kind, "rank": 2, "targets": ATTN + MLP})
    expected = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    layers = model.tensorft.layers
    assert all(isinstance(layer.base_layer, expected) for layer in layers.values())
    randomize_adapters(model, scale=0.2)

    # The adapted layer adds exactly the adapter's update on top of the quantized base output.
    layer = layers["model.layers.1.self_attn.o_proj"]
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        delta = torch.nn.functional.linear(x, layer.adapter.delta_weight())
        torch.testing.assert_close(layer(x) - layer.base_layer(x), delta, rtol=1e-4, atol=1e-4)

    model.train()
    ids = tokens()
    loss = model(ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(tensorft.adapter_parameters(model))
    assert all(p.grad.abs().sum() > 0 for p in tensorft.adapter_parameters(model).values())
    with pytest.raises(tensorft.TensorftError, match="cannot merge into a Linear"):
        tensorft.merge(model)
    assert not any(layer.merged for layer in layers.values())


def test_nf4_adapter_saves_and_reloads_quantized(base_dir, tmp_path):
    model = load_base_model(ModelConfig(name_or_path=base_dir, quantization="nf4"))
    tensorft.attach(model, {"kind": "cp", "rank": 2, "targets": ATTN})
    randomize_adapters(model)
    tensorft.save(model, str(tmp_path / "a"))
    loaded = tensorft.from_pretrained(str(tmp_path / "a"))
    import bitsandbytes as bnb

    assert isinstance(loaded.tensorft.layers["model.layers.0.self_attn.q_proj"].base_layer, bnb.nn.Linear4bit)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        # the same adapter on the full-precision base: close to, not equal to, the nf4 result
        full = tensorft.from_pretrained(str(tmp_path / "a"), quantization="none")
        assert isinstance(full.tensorft.layers["model.layers.0.self_attn.q_proj"].base_layer, torch.nn.Linear)
        assert not torch.equal(full(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base_keeps_fp32_adapters(kind):
    model = tensorft.attach(tiny_llama(dtype=torch.bfloat16), {"kind": kind, "rank": 2, "targets": ATTN})
    assert all(p.dtype == torch.float32 for p in tensorft.adapter_parameters(model).values())
    randomize_adapters(model)
    ids = tokens()
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for p in tensorft.adapter_parameters(model).values())


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_4bit_gradients_equal_dense_dequantized_reference_even_after_eval(base_dir, quantization):
    """QLoRA-style gradients are the ones of the dequantized model, also after an eval pass
    (bitsandbytes' CPU inference repacking would otherwise corrupt them silently)."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    adapter = {"kind": "cp", "rank": 2, "targets": ATTN + MLP}
    q = tensorft.attach(load_base_model(ModelConfig(name_or_path=base_dir, quantization=quantization)), adapter)
    randomize_adapters(q, scale=0.2)
    dense = tensorft.attach(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    ids = tokens()
    q.eval()
    with torch.no_grad():
        q(ids)  # an evaluation pass in the middle of training
    with torch.no_grad():
        for name, layer in q.tensorft.layers.items():
            w = layer.base_layer.weight
            dense.tensorft.layers[name].base_layer.weight.copy_(bnbf.dequantize_4bit(w.data, w.quant_state).float())
        for name, p in tensorft.adapter_parameters(q).items():
            tensorft.adapter_parameters(dense)[name].copy_(p)
    q.train()
    dense.train()
    q_loss = q(ids, labels=ids).loss
    d_loss = dense(ids, labels=ids).loss
    q_loss.backward()
    d_loss.backward()
    torch.testing.assert_close(q_loss, d_loss, rtol=1e-4, atol=1e-4)
    for name, p in tensorft.adapter_parameters(q).items():
        torch.testing.assert_close(p.grad, tensorft.adapter_parameters(dense)[name].grad, rtol=1e-3, atol=1e-4)


def test_4bit_bases_use_double_quantization_by_default_as_qlora(base_dir):
    """QLoRA's recipe: nf4 with the blockwise scales quantized too (a nested quant state), the
    compute dtype from model.dtype; ``model.double_quant: false`` turns it off; set for a base
    that is not 4-bit it is refused in one line, not ignored."""
    from tensorft.config import parse_config

    def quant_states(model):
        return [m.weight.quant_state for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]

    on = quant_states(load_base_model(ModelConfig(name_or_path=base_dir, quantization="nf4", dtype="bfloat16")))
    assert on and all(s.nested for s in on) and {s.dtype for s in on} == {torch.bfloat16}
    off = quant_states(load_base_model(ModelConfig(name_or_path=base_dir, quantization="nf4", double_quant=False)))
    assert off and not any(s.nested for s in off)
    with pytest.raises(tensorft.ConfigError, match=r"model.double_quant: applies to 4-bit bases \(nf4, fp4\) only"):
        parse_config({"model": {"name_or_path": base_dir, "quantization": "int8", "double_quant": False},
                          "data": {"train": "rows.jsonl"}, "train": {"output_dir": "out"}})
