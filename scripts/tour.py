"""A two-minute tour of the adapter core on a small Llama built in code (no download).

Attaches a CP (LoRTA) adapter, trains it to continue a sequence, then saves it, reloads it,
merges it and exports it as a PEFT LoRA adapter, checking at each step that the model's
outputs stay the same.  Run:  .venv/bin/python scripts/tour.py
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import tensorft  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="tensorft-tour-")
    base_dir = os.path.join(work, "base")
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensorft.attach(model, {"kind": "cp", "rank": 8, "alpha": 16, "targets": targets})
    layers = model.tensorft.layers.values()
    lora = sum(8 * (layer.in_features + layer.out_features) for layer in layers)
    print(f"CP adapter: {tensorft.count_parameters(model):,} trainable parameters "
          f"(a rank-8 LoRA on the same {len(layers)} matrices: {lora:,})")

    data = torch.arange(0, 64).remainder(256).repeat(4, 1)  # learn to count
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step in range(40):
        loss = model(data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    model.eval()

    adapter_dir = os.path.join(work, "adapter")
    tensorft.save(model, adapter_dir)
    reloaded = tensorft.from_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(data).logits
        same = torch.equal(reloaded(data).logits, logits)
        with tensorft.disable_adapters(model):
            base_loss = model(data, labels=data).loss.item()
        tensorft.export_peft(model, os.path.join(work, "peft"))
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(work, "peft"))
        peft_diff = (peft(data).logits - logits).abs().max().item()
        tensorft.merge(model)
        merge_diff = (model(data).logits - logits).abs().max().item()
    print(f"base model loss with adapters switched off: {base_loss:.3f}")
    print(f"saved to {adapter_dir}; reloaded outputs identical: {same}")
    print(f"PEFT LoRA export max |logit diff|: {peft_diff:.2e}; merged max |logit diff|: {merge_diff:.2e}")


if __name__ == "__main__":
    main()
