"""Judges for MT-Bench-style grading, and the local chat model that answers (or judges).

A judge turns chat messages into text: :class:`OpenAIJudge` posts them to any
OpenAI-compatible ``/chat/completions`` endpoint with the standard library (the API key comes
from an environment variable only), :class:`HFJudge` generates with a local model.
:func:`judge_with_retries` calls a judge until its output parses, a bounded number of times,
and reports every failed attempt instead of dropping it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from tensorft.errors import TensorftError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"

# MT-Bench's conventions (FastChat llm_judge): categories graded against a reference answer,
# and the sampling temperature per category when sampling is asked for.
NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7


class JudgeError(Exception):
    """One judge call failed in a way worth retrying (network, HTTP 5xx/429, odd response)."""


class JudgeFatalError(TensorftError):
    """The judge refuses every call (bad key, unknown model or URL): stop the run."""


# --------------------------------------------------------------------------- parsing verdicts

_RATING = (re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]"), re.compile(r"\[(\d+(?:\.\d+)?)\]"))


def parse_rating(text: str) -> float | None:
    """The ``[[rating]]`` (or ``[rating]``) in a judgment, if it is a number from 1 to 10."""
    for pattern in _RATING:
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            return value if 1 <= value <= 10 else None
    return None


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise judgment's ``[[A]]``/``[[B]]``/``[[C]]``."""
    found = [v for tag, v in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")) if tag in text]
    return found[0] if len(found) == 1 else None  # several verdicts: ambiguous, ask again


# --------------------------------------------------------------------------- judge specs


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """``openai:MODEL`` -> ("openai", MODEL); ``hf:PATH`` -> ("hf", PATH)."""
    kind, sep, name = spec.partition(":")
    if not sep or kind not in ("openai", "hf") or not name:
        raise TensorftError(f"--judge: unknown judge spec {spec!r}; use openai:MODEL or hf:PATH")
    return kind, name


def check_judge(spec: str, base_url: str, key_env: str) -> None:
    """Everything about the judge that can be checked without calling or loading it."""
    kind, name = parse_judge_spec(spec)
    if kind == "openai":
        check_base_url(base_url)
        if not key_env:
            raise TensorftError("--judge-api-key-env: empty variable name")
        if not os.environ.get(key_env):
            raise TensorftError(
                f"environment variable {key_env} is not set: the judge's API key is read from the "
                "environment only (--judge-api-key-env names another variable)"
            )
    elif name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise TensorftError(f"--judge: {name} is not a directory")


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_base_url(base_url: str) -> None:
    """The API key travels in a header: https only, except to this machine (a local server)."""
    import ipaddress
    import urllib.parse

    if not re.match(r"https?://[^/]", base_url):
        raise TensorftError(f"--judge-base-url: {base_url!r} is not an http(s) URL")
    url = urllib.parse.urlsplit(base_url)
    host = (url.hostname or "").lower()
    try:
        loopback = host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if url.scheme != "https" and not loopback:
        raise TensorftError(
            f"--judge-base-url: {base_url!r} is plain http; the API key is only sent over https "
            "(or to a loopback host: localhost, 127.0.0.1, ::1)"
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would re-send the Authorization header to wherever a redirect points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


def _open(request, timeout: float):
    # built per call, as urlopen's own opener: proxy settings are read from the environment now
    return urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout)


def make_judge(spec: str, *, base_url: str = DEFAULT_BASE_URL, key_env: str = DEFAULT_KEY_ENV,
               timeout: float = 120.0, max_tokens: int = 2048, device: str = "cpu", dtype: str | None = None):
    check_judge(spec, base_url, key_env)
    kind, name = parse_judge_spec(spec)
    if kind == "openai":
        return OpenAIJudge(name, base_url=base_url, api_key=os.environ[key_env], timeout=timeout,
                           max_tokens=max_tokens, key_env=key_env)
    return HFJudge(load_chat_model(name, device=device, dtype=dtype), max_tokens=max_tokens)


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIJudge:
    """``POST {base_url}/chat/completions`` with greedy settings (temperature 0)."""

    def __init__(self, model: str, *, base_url: str, api_key: str, timeout: float = 120.0, max_tokens: int = 2048,
                 key_env: str = DEFAULT_KEY_ENV):
        self.model = model
        self.key_env = key_env
        check_base_url(base_url)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.timeout = timeout
        self.max_tokens = max_tokens
        self._api_key = api_key  # kept out of repr, rows and messages

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, url={self.url!r})"

    def _headers(self) -> dict:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"}

    def check_access(self) -> None:
        """``GET {base_url}/models``: a refused key stops the run before any answer is generated.

        Only 401/403 count; a server without that route (or unreachable now) is left to the
        judging calls, which retry.
        """
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers())
        try:
            with _open(request, self.timeout):
                pass
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise self._refused(e) from None
        except (OSError, http.client.HTTPException):
            pass

    def complete(self, messages: list[dict]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        request = urllib.request.Request(
            self.url,
            data=json.dumps(payload).encode("utf-8"),
            headers=self._headers(),
            method="POST",
        )
        try:
            with _open(request, self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise self._refused(e) from None
            if 300 <= e.code < 400:  # not followed: the key would go along
                where = e.headers.get("Location", "?") if e.headers else "?"
                raise JudgeFatalError(
                    f"judge at {self.url}: HTTP {e.code} redirect to {where}, not followed (the API key is never "
                    "sent across a redirect); give --judge-base-url the final address"
                ) from None
            detail = self._snippet(e.read() if e.fp else b"")
            if e.code == 404:  # unknown model or URL: every later call fails too
                raise JudgeFatalError(f"judge {self.model} at {self.url}: HTTP 404 {e.reason}: {detail}") from None
            raise JudgeError(f"HTTP {e.code} {e.reason}: {detail}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, cut-off bodies
            reason = getattr(e, "reason", None) or e
            raise JudgeError(f"request to {self.url} failed: {reason}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"not a chat-completions response: {self._snippet(body)}") from None
        if not isinstance(content, str):
            raise JudgeError(f"no text in the response: {self._snippet(body)}")
        return content

    def _refused(self, e: urllib.error.HTTPError) -> JudgeFatalError:
        # No response body here: servers tend to echo (part of) the key they refused.
        return JudgeFatalError(
            f"judge at {self.base_url}: the API key in ${self.key_env} was refused (HTTP {e.code} {e.reason})"
        )

    def _snippet(self, body: bytes, limit: int = 200) -> str:
        text = body.decode("utf-8", "replace").strip().replace("\n", " ").replace(self._api_key, "***")
        return text[:limit] + ("..." if len(text) > limit else "")


# --------------------------------------------------------------------------- local models


class ChatModel:
    """A causal LM and its tokenizer answering chat messages through the chat template."""

    def __init__(self, model, tokenizer, task_id: int | None = None):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise TensorftError(f"{name}: the tokenizer has no chat template; pass --tokenizer DIR with one")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task_id = task_id

    def render(self, messages: list[dict]):
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        except Exception as e:  # templates raise jinja's TemplateError, e.g. "no system role"
            if messages and messages[0]["role"] == "system" and "system" in str(e).lower():
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.render(merged + messages[2:])
            raise

    def reply(self, messages: list[dict], max_new_tokens: int, temperature: float = 0.0) -> str:
        import contextlib

        import torch

        import tensorft

        device = next(self.model.parameters()).device
        inputs = self.render(messages).to(device)
        eos = self.tokenizer.eos_token_id
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": eos, "eos_token_id": eos}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        routed = contextlib.nullcontext()
        if self.task_id is not None:
            routed = tensorft.task_context(self.model, torch.tensor([self.task_id], device=device))
        with torch.no_grad(), routed:
            out = self.model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


def load_chat_model(source: str, *, adapter: bool | None = None, tokenizer: str | None = None,
                    device: str = "cpu", dtype: str | None = None, task_id: int | None = None,
                    base: str | None = None) -> ChatModel:
    """A :class:`ChatModel` from a tensorft adapter directory or a Hugging Face model.

    ``base``: an adapter's base model from this directory or id instead of the recorded one.

    ``adapter=None`` decides by looking for ``adapter_config.json`` in ``source``. The tokenizer
    comes from ``tokenizer``, else the base model's directory or id.
    """
    import tensorft
    from tensorft.config import ModelConfig
    from tensorft.loading import load_base_model
    from tensorft.saving import CONFIG_NAME, read_adapter_config
    from transformers import AutoTokenizer

    if adapter is None:
        adapter = os.path.isfile(os.path.join(source, CONFIG_NAME))
    hf_kwargs = {"device_map": {"": device}} if device != "cpu" else {}
    overrides = {"dtype": dtype} if dtype else {}
    if adapter:
        _, model_cfg, _ = read_adapter_config(source)
        if base:
            overrides["name_or_path"] = base
        model = tensorft.from_pretrained(source, **overrides, **hf_kwargs)
        base = base or model_cfg.name_or_path
    else:
        if base:
            raise TensorftError("--base relocates an adapter's base model; a plain model takes none")
        if task_id is not None:
            raise TensorftError("--task-id needs an adapter (--adapter DIR)")
        model = load_base_model(ModelConfig(name_or_path=source, **overrides), **hf_kwargs)
        base = source
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or base)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TensorftError(f"cannot load a tokenizer from {tokenizer or base}: {first}") from None
    return ChatModel(model, tok, task_id=task_id)


class HFJudge:
    """A local model as judge: greedy generation through its chat template."""

    def __init__(self, chat_model: ChatModel, max_tokens: int = 2048):
        self.chat_model = chat_model
        self.max_tokens = max_tokens

    def complete(self, messages: list[dict]) -> str:
        return self.chat_model.reply(messages, max_new_tokens=self.max_tokens)


# --------------------------------------------------------------------------- retries


@dataclass
class Outcome:
    """The result of asking a judge until its output parsed or the attempts ran out."""

    value: object = None  # the parsed rating / verdict; None when every attempt failed
    text: str = ""  # the last raw judge output
    errors: list[str] = field(default_factory=list)  # one entry per failed attempt

    @property
    def attempts(self) -> int:
        return len(self.errors) + (self.value is not None)


def judge_with_retries(judge, messages: list[dict], parse: Callable[[str], object], *, retries: int = 3,
                       backoff: float = 1.0, what: str = "rating",
                       sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Call ``judge`` up to ``1 + retries`` times until ``parse`` accepts its output.

    Transport errors and unparsable outputs both count as failed attempts; waits grow as
    ``backoff * 2**k`` between them. :class:`JudgeFatalError` is not retried.
    """
    outcome = Outcome()
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            outcome.text = judge.complete(messages)
        except JudgeError as e:
            outcome.errors.append(str(e))
            continue
        value = parse(outcome.text)
        if value is not None:
            outcome.value = value
            return outcome
        outcome.errors.append(f"no {what} in the judge's output")
    return outcome
