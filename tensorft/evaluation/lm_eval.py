"""Evaluate a tensorft adapter with lm-eval, loading it natively (no PEFT export needed).

    tensorft eval --adapter DIR [--task-name NAME] [--task-map T=NAME,...] [--base DIR] <lm-eval run arguments>

(also ``python -m tensorft.evaluation.lm_eval``, and ``python -m evaluation.lm_eval`` in a checkout)
runs lm-eval's own command line (``lm_eval run``) with ``--model tensorft`` and this adapter;
every other argument (``--tasks``, ``--include_path``, ``--num_fewshot``, ``--limit``,
``--batch_size``, ``--device``, ``--model_args``, ``--metadata``, ...) means what it means to
lm-eval. The task YAMLs shipped with tensorft (``tensorft/evaluation/tasks``: the offline GLUE
and BBH tasks, ``sst2_local``, ...) are always on lm-eval's include path, next to any
``--include_path`` given. ``--base DIR`` loads the adapter's base model from ``DIR`` instead of
the place recorded in the adapter (the one meaning of ``--base`` in every tensorft command).
``--output_path`` is required: lm-eval writes its results JSON there and this wrapper
writes the same table as markdown next to it (``results_<date>.md``).

The ``tensorft`` model is lm-eval's ``HFLM`` given the model that ``tensorft.from_pretrained``
loads, so any adapter kind evaluates, including kinds that cannot be exported to PEFT.
Task-routed kinds: ``--task-name NAME`` (a name from the adapter's ``tasks``) sets
``tensorft.task_context`` with that task's id around every forward and ``generate`` call;
``--task-map lmeval_task=NAME,...`` routes each lm-eval task's requests with its own task, so
one run evaluates several (lm-eval tasks it leaves out use ``--task-name``; keys are lm-eval's
leaf task names, as in the results table). ``--task-id N`` is the older integer form. From Python::

    from tensorft.evaluation.lm_eval import TensorftLM
    lm_eval.simple_evaluate(model=TensorftLM(adapter="out/adapter", task_name="sst2"), tasks=[...])

Model arguments of ``tensorft`` besides HFLM's own: ``adapter`` (the adapter directory; also
accepted as ``pretrained``, which is what the wrapper passes so lm-eval names its output folder
after the adapter), ``task_name``, ``task_map`` (a dict or the string form), ``task_id``,
``base`` (load the base model from another place than the one recorded in the adapter),
``dtype`` and ``quantization`` (as ``model:`` config keys).
Bad input ends with one line ``tensorft: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys

MODEL_NAME = "tensorft"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")  # shipped task YAMLs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the tensorft command does
        self.exit(2, f"tensorft: error: {message}\n")


# --------------------------------------------------------------------------- the lm-eval model

_CLASS = None


def tensorft_lm_class():
    """Define ``TensorftLM`` and register it with lm-eval as ``tensorft`` (once per process).

    Deferred so that ``python -m evaluation.lm_eval`` reports bad arguments before importing
    lm-eval (seconds).
    """
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    import torch
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM

    import tensorft
    from tensorft.errors import TensorftError
    from tensorft.saving import read_adapter_config

    from .devices import check_device, default_device

    class TensorftLM(HFLM):
        """lm-eval's Hugging Face model class around a tensorft adapter (any kind)."""

        def __init__(
            self,
            adapter: str | None = None,
            pretrained: str | None = None,
            task_id: int | None = None,
            task_name: str | None = None,
            task_map: dict | str | None = None,
            base: str | None = None,
            tokenizer=None,
            device: str | None = None,
            dtype: str | None = None,
            quantization: str | None = None,
            **kwargs,
        ) -> None:
            if adapter and pretrained and os.path.abspath(adapter) != os.path.abspath(str(pretrained)):
                raise TensorftError(f"tensorft model: adapter={adapter} and pretrained={pretrained} disagree")
            adapter = adapter or pretrained
            if not isinstance(adapter, str) or not adapter:
                raise TensorftError("tensorft model: name the adapter directory (model_args adapter=DIR)")
            for key in ("peft", "delta", "parallelize", "tp_plan"):
                if kwargs.get(key):
                    raise TensorftError(f"tensorft model: {key}= is not supported (the adapter is loaded natively)")
            if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0):
                raise TensorftError(f"tensorft model: task_id must be an integer >= 0, got {task_id!r}")
            adapter_cfg, model_cfg, _ = read_adapter_config(adapter)
            self.task_name, self.task_map = task_name, parse_task_map(task_map)
            self.default_task, self.task_ids = routing_ids(adapter_cfg, task_id, task_name, self.task_map)
            overrides = {}
            if base:
                overrides["name_or_path"] = base
            if dtype not in (None, "auto"):
                overrides["dtype"] = str(dtype).replace("torch.", "")
            if quantization:
                overrides["quantization"] = quantization
            device = check_device(device) if device else default_device()
            hf_kwargs = {} if device == "cpu" else {"device_map": {"": device}}
            model = tensorft.from_pretrained(adapter, **overrides, **hf_kwargs)
            model.eval()
            self.adapter = os.path.abspath(adapter)
            self.task_id = self.default_task  # the id the next forwards route with
            self.adapter_config = adapter_cfg
            self.trainable_parameters = tensorft.count_parameters(model)
            base_name = overrides.get("name_or_path") or model_cfg.name_or_path
            super().__init__(pretrained=model, tokenizer=tokenizer or base_name, **kwargs)
            self.base = base_name

        @contextlib.contextmanager
        def _task_scope(self, batch_size: int):
            if self.task_id is None:
                yield
                return
            ids = torch.full((batch_size,), self.task_id, dtype=torch.long, device=self.device)
            with tensorft.task_context(self.model, ids):
                yield

        def _model_call(self, inps, attn_mask=None, labels=None):
            with self._task_scope(inps.shape[0]), self._prompt_routing(inps):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        # A kind that routes by the prompt's text (T-REX's intuition) gets it from each scored
        # row's context alone, as in training, not from the row itself (context + continuation,
        # right-padded with token 0, which decoding would read as text).

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            self._prompts = self._row_prompts(requests)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._prompts = None

        def _row_prompts(self, requests):
            routing = getattr(self.model.tensorft.kind, "routing_for_prompts", None)
            if routing is None or any(r[0] is None for r in requests):  # rolling windows: no context
                return None
            rows = {tuple((ctx + cont)[-(self.max_length + 1):][:-1]): tuple(ctx) for _, ctx, cont in requests}
            contexts = sorted(set(rows.values()))
            inputs = routing(self.model, [self.tokenizer.decode(list(c), skip_special_tokens=True) for c in contexts])
            index = {c: i for i, c in enumerate(contexts)}
            lengths = sorted({len(k) for k in rows}, reverse=True)
            return ({key: index[c] for key, c in rows.items()}, inputs, lengths) if inputs else None

        @contextlib.contextmanager
        def _prompt_routing(self, inps):
            found = getattr(self, "_prompts", None)
            picked = []
            for row in inps.tolist() if found else []:
                rows, _, lengths = found
                hit = next((rows[tuple(row[:n])] for n in lengths if n <= len(row) and tuple(row[:n]) in rows), None)
                if hit is None:  # not a request of this call: the kind reads the row's ids
                    picked = []
                    break
                picked.append(hit)
            if not picked:
                yield
                return
            index = torch.tensor(picked)
            with tensorft.routing_context(self.model, **{k: v[index.to(v.device)] for k, v in found[1].items()}):
                yield

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            with self._task_scope(context.shape[0]):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

        # lm-eval hands every task's requests of one type to one call and batches them by
        # length; with a task map, each lm-eval task's requests run apart with their own id.

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._by_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._by_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._by_task(super().generate_until, requests, disable_tqdm=disable_tqdm)

        def _task_of(self, request) -> int | None:
            if request.task_name in self.task_ids:
                return self.task_ids[request.task_name]
            if self.task_ids and self.default_task is None:
                raise TensorftError(
                    f"lm-eval task {request.task_name!r} has no adapter task: add {request.task_name}=NAME to "
                    "--task-map, or --task-name NAME for the tasks the map leaves out"
                )
            return self.default_task

        def _by_task(self, method, requests, **kwargs) -> list:
            if not self.task_ids:
                return method(requests, **kwargs)
            groups: dict[int | None, list[int]] = {}
            for i, request in enumerate(requests):
                groups.setdefault(self._task_of(request), []).append(i)
            results: list = [None] * len(requests)
            try:
                for task_id, indices in groups.items():
                    self.task_id = task_id
                    for i, result in zip(indices, method([requests[i] for i in indices], **kwargs)):
                        results[i] = result
            finally:
                self.task_id = self.default_task
            return results

        def get_model_info(self) -> dict:
            info = super().get_model_info()
            cfg = self.adapter_config
            info["tensorft"] = {
                "adapter": self.adapter,
                "base": self.base,
                "kind": cfg.kind,
                "rank": cfg.rank,
                "alpha": cfg.alpha,
                "targets": list(cfg.targets),
                "trainable_parameters": self.trainable_parameters,
                "task_id": self.default_task,
                "task_name": self.task_name,
                "task_map": self.task_map or None,
            }
            return info

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(TensorftLM)
    _CLASS = TensorftLM
    return _CLASS


def parse_task_map(task_map: dict | str | None) -> dict[str, str]:
    """``lmeval_task=adapter_task,...`` (or a dict) -> {lm-eval task: adapter task name}."""
    from tensorft.errors import TensorftError

    if isinstance(task_map, dict) or not task_map:
        return dict(task_map or {})
    pairs = [item.split("=", 1) for item in task_map.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise TensorftError(f"--task-map {task_map}: expected lmeval_task=adapter_task,...")
    return {lm.strip(): name.strip() for lm, name in pairs}


def routing_ids(adapter_cfg, task_id: int | None, task_name: str | None, task_map: dict[str, str]):
    """(the default task id, {lm-eval task: task id}) from the adapter's task names.

    ``task_id`` is the older integer form, passed through for any kind; names go through
    ``AdapterConfig.task_id`` (unknown names list the known ones; static kinds refuse them)."""
    from tensorft.errors import TensorftError

    if task_id is not None and task_name is not None:
        raise TensorftError("give --task-name or --task-id, not both")
    default = task_id if task_name is None else adapter_cfg.task_id(task_name)
    return default, {lm: adapter_cfg.task_id(name) for lm, name in task_map.items()}


def __getattr__(name):  # ``from evaluation.lm_eval import TensorftLM`` defines it on first use
    if name == "TensorftLM":
        return tensorft_lm_class()
    raise AttributeError(name)


# --------------------------------------------------------------------------- results as markdown


def markdown_table(results: dict) -> str:
    """lm-eval's own results table (markdown), headed by the adapter it evaluated."""
    from lm_eval.utils import make_table

    lines = []
    info = (results.get("config") or {}).get("tensorft")
    if info:
        lines.append(
            f"adapter `{info['adapter']}`: kind {info['kind']}, rank {info['rank']}, "
            f"{info['trainable_parameters']:,} trainable parameters"
            + _routing_note(info)
        )
        lines.append("")
    lines.append(make_table(results).rstrip())
    if results.get("groups"):
        lines += ["", make_table(results, "groups").rstrip()]
    return "\n".join(lines) + "\n"


def _routing_note(info: dict) -> str:
    if info.get("task_map"):
        return ", tasks " + ", ".join(f"{lm} -> {name}" for lm, name in info["task_map"].items())
    if info.get("task_name") is not None:
        return f", task {info['task_name']}"
    return f", task id {info['task_id']}" if info.get("task_id") is not None else ""


def _results_files(output_path: str) -> dict[str, float]:
    """Results JSON files lm-eval may have written for ``--output_path`` (path -> mtime)."""
    if output_path.endswith(".json"):
        stem = os.path.splitext(os.path.basename(output_path))[0]
        pattern = os.path.join(os.path.dirname(os.path.abspath(output_path)), f"{stem}_*.json")
    else:
        pattern = os.path.join(output_path, "*", "results_*.json")
    return {p: os.path.getmtime(p) for p in glob.glob(pattern)}


def write_markdown(results_json: str) -> str:
    from tensorft.saving import write_text

    with open(results_json, encoding="utf-8") as f:
        results = json.load(f)
    out = os.path.splitext(results_json)[0] + ".md"
    write_text(out, markdown_table(results))
    return out


# --------------------------------------------------------------------------- command line


def build_parser(prog: str = "tensorft eval") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,  # never take lm-eval's --tasks for our --task-id
        description="Run lm-eval on a tensorft adapter. Other arguments go to `lm_eval run` "
        "(see `lm_eval run --help`); --output_path is required. The task YAMLs shipped with "
        f"tensorft ({TASKS_DIR}) are always included.",
    )
    parser.add_argument("--adapter", required=True, help="tensorft adapter directory (adapter_config.json)")
    parser.add_argument("--task-name", default=None, metavar="NAME",
                        help="task-routed kinds: route every request as this task (a name from the adapter's tasks)")
    parser.add_argument("--task-map", default=None, metavar="LMEVAL_TASK=NAME,...",
                        help="route each lm-eval task's requests as its own adapter task (--task-name: the rest)")
    parser.add_argument("--task-id", type=int, default=None, help="task id (older form of --task-name)")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="load the adapter's base model from DIR (it moved since training)")
    return parser


def _option_value(args: list[str], names: tuple[str, ...]) -> str | None:
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif name.startswith("--") and arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _has_option(args: list[str], names: tuple[str, ...]) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names if n.startswith("--")) for a in args)


def main(argv: list[str] | None = None, prog: str = "tensorft eval") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, rest = build_parser(prog).parse_known_args(argv)
    except SystemExit as e:  # --help, or a bad option of ours (already printed as one line)
        return _exit_code(e)
    error = _check(ns, rest)
    if error:
        print(f"tensorft: error: {error}", file=sys.stderr)
        return 2
    output_path = _option_value(rest, ("--output_path", "-o"))
    model_args = {"pretrained": os.path.abspath(ns.adapter)}
    for key in ("task_id", "task_name", "task_map"):
        if getattr(ns, key) is not None:
            model_args[key] = getattr(ns, key)
    if ns.base:
        model_args["base"] = os.path.abspath(ns.base)
    # JSON, not key=value: an adapter path may contain commas.
    lm_argv = ["lm-eval", "run", *rest, "--model", MODEL_NAME, "--model_args", json.dumps(model_args)]
    from tensorft.errors import TensorftError

    from .devices import check_device, default_device

    device = _option_value(rest, ("--device",))
    if not device:  # lm-eval's own default is cuda:0, even without CUDA
        lm_argv += ["--device", default_device()]
    try:
        if device:
            check_device(device)  # before lm-eval indexes its tasks (seconds)
    except TensorftError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2

    before = _results_files(output_path)
    saved_argv = sys.argv
    try:
        from tensorft.extras import require

        require("lm_eval", "tensorft eval")  # one line naming the extra, not an ImportError
        tensorft_lm_class()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = lm_argv
        with shipped_tasks():
            cli_evaluate()
    except SystemExit as e:  # lm-eval's own argument parser
        return _exit_code(e)
    except (TensorftError, ValueError, OSError) as e:  # OSError: a task's hub data offline or missing
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tensorft: error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    written = [p for p, m in _results_files(output_path).items() if p not in before or m > before[p]]
    for path in sorted(written):
        print(f"results: {path}\ntable:   {write_markdown(path)}")
    return 0


@contextlib.contextmanager
def shipped_tasks():
    """Put the shipped task YAMLs on every lm-eval ``TaskManager``'s include path while the
    wrapper runs (first, so that a user's ``--include_path`` can override a task of the same
    name; lm-eval's command line takes one directory only)."""
    import inspect

    from lm_eval import tasks as lm_tasks

    cls = lm_tasks.TaskManager
    original = cls.__init__
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [] if not given else list(given) if isinstance(given, (list, tuple)) else [given]
        seen = {os.path.realpath(str(p)) for p in paths}
        if os.path.realpath(TASKS_DIR) not in seen:
            paths.insert(0, TASKS_DIR)
        bound.arguments["include_path"] = paths
        original(*bound.args, **bound.kwargs)

    cls.__init__ = __init__
    try:
        yield
    finally:
        cls.__init__ = original


def _exit_code(e: SystemExit) -> int:
    return 0 if e.code is None else e.code if isinstance(e.code, int) else 2


def _check(ns, rest: list[str]) -> str | None:
    """The problem with the command line, before anything is loaded (None when fine)."""
    from tensorft.errors import TensorftError
    from tensorft.saving import read_adapter_config

    if _has_option(rest, ("--model", "-M")):
        return "--model is set by this wrapper (tensorft); drop it"
    if ns.task_id is not None and ns.task_id < 0:
        return f"--task-id must be >= 0, got {ns.task_id}"
    if not _option_value(rest, ("--output_path", "-o")):
        return "--output_path is required (lm-eval's results JSON and the markdown table go there)"
    if ns.base and not os.path.isdir(ns.base):
        return f"--base {ns.base}: not a directory"
    try:
        adapter_cfg, _, _ = read_adapter_config(ns.adapter)
        routing_ids(adapter_cfg, ns.task_id, ns.task_name, parse_task_map(ns.task_map))
    except TensorftError as e:
        return str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
