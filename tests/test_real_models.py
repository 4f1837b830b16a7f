"""The adapter core on small real pretrained models that install offline.

SmolLM2-135M-Instruct: a real Llama-architecture GQA decoder (9 heads, 3 kv heads, hidden 576);
all-MiniLM-L6-v2: a real BERT encoder. Loaded by the ordinary Hugging Face loading code.
"""

import pytest
import torch

import tensorft
from conftest import ATTN, MLP, randomize_adapters
from tensorft.config import ModelConfig
from tensorft.loading import load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from scripts.demo_assets import smollm2_135m_instruct

    return smollm2_135m_instruct()


@pytest.fixture(scope="module")
def prompt(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.mark.parametrize("kind", ["cp", "tt"])
def test_smollm2_adapter_init_merge_export(smollm2, prompt, kind, tmp_path):
    from peft import PeftModel

    ids = prompt["input_ids"]
    base = load_base_model(ModelConfig(name_or_path=smollm2))
    with torch.no_grad():
        base_logits = base(ids).logits
    model = tensorft.attach(base, {"kind": kind, "rank": 4, "alpha": 4, "targets": ATTN + MLP})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    randomize_adapters(model, scale=0.05)
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        tensorft.export_peft(model, str(tmp_path / "peft"))
        peft_model = PeftModel.from_pretrained(load_base_model(ModelConfig(name_or_path=smollm2)), str(tmp_path / "peft"))
        torch.testing.assert_close(peft_model(ids).logits, adapted, rtol=0, atol=2e-4)
        tensorft.merge(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=2e-4)


def test_smollm2_nf4_cp_trains_only_adapters(smollm2, prompt):
    model = load_base_model(ModelConfig(name_or_path=smollm2, quantization="nf4"))
    tensorft.attach(model, {"kind": "cp", "rank": 4, "targets": ATTN})
    assert tensorft.count_parameters(model) == 4 * (576 + 64 + 9 + 3 + 30 + 4)
    ids = prompt["input_ids"]
    optimizer = torch.optim.AdamW(tensorft.adapter_parameters(model).values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(tensorft.adapter_parameters(model))


def test_minilm_encoder_classification_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tensorft.pretrained import minilm_l6_v2

    path = minilm_l6_v2()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a wonderful, moving film", "dull and far too long"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tensorft.attach(model, {"kind": "cp", "rank": 4, "alpha": 8, "targets": ["query", "value"],
                            "modules_to_save": ["classifier"]})
    optimizer = torch.optim.AdamW(tensorft.adapter_parameters(model).values(), lr=1e-2)
    model.train()
    first = None
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < first
    tensorft.save(model, str(tmp_path / "a"))
    loaded = tensorft.from_pretrained(str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
