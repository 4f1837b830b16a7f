"""Shared fixtures: tiny Hugging Face models built in code (real classes, random weights)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(kv_heads=4, heads=4, hidden=64, layers=2, head_dim=None, seed=0, dtype=torch.float32, intermediate=128):
    """A 2-layer Llama (MHA when kv_heads == heads, GQA otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=intermediate,  # bitsandbytes' CPU kernels want multiples of 64
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def save_tiny_chat_llama(directory, hidden=64, intermediate=128, max_positions=256, tie_embeddings=True,
                         kv_heads=2) -> str:
    """A 2-layer Llama with SmolLM2's real tokenizer (and chat template), saved to ``directory``
    as a Hugging Face model dir, for tests that go through the real loading code (GQA 4/2 heads
    by default, as SmolLM2; ``kv_heads=4``: MHA, as Llama-2-7B)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scripts.demo_assets import smollm2_135m_instruct

    tok = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def tiny_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_bert(seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def randomize_adapters(model, seed=1, scale=0.5):
    """Give every adapter parameter random values (zero-init would hide orientation bugs)."""
    import tensorft

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensorft.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op allocates (views allocate nothing and are
    skipped): tests assert no weight-shaped update is ever built."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (W0.t() in F.linear) allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def tokens(batch=2, seq=7, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@pytest.fixture
def hub_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(frozen tiny chat Llama in eval mode, its tokenizer): the benchmarks' tests train
    adapters on it in-process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_chat_llama(tmp_path_factory.mktemp("tiny_llama"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)
