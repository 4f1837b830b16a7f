"""The ``tensorft`` command.

Core: ``params``, ``merge``, ``export-peft`` (``--task NAME`` for task-routed kinds, ``--base
DIR`` when the adapter's base model moved). Training and evaluation, each the same program as
its module: ``train`` (``launcher/train.py``, :mod:`tensorft.train`), ``eval`` (lm-eval,
:mod:`tensorft.evaluation.lm_eval`), ``mt-bench``, ``report``, ``routing-plot``,
``expert-usage-plot``, ``bigbench-to-bbh`` (:mod:`tensorft.evaluation`); ``tensorft COMMAND
--help`` lists each one's options.

Bad input ends with one line on stderr naming the problem, exit code 2, no traceback; so does
a missing optional dependency (the line names the extra to install, :mod:`tensorft.extras`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Commands that run another module's command line: name -> (module, what it does).
FORWARDED = {
    "train": ("tensorft.train", "fine-tune a model with an adapter (what launcher/train.py runs)"),
    "eval": ("tensorft.evaluation.lm_eval", "lm-eval on an adapter, loaded natively (extra: eval)"),
    "mt-bench": ("tensorft.evaluation.mt_bench", "MT-Bench-style answers and judge scores"),
    "report": ("tensorft.evaluation.report", "one table and plot over several lm-eval runs (extra: plot)"),
    "routing-plot": ("tensorft.evaluation.routing_plot", "heatmap of a task-routed adapter's routing (extra: plot)"),
    "expert-usage-plot": ("tensorft.evaluation.expert_usage_plot", "heatmap of a T-REX adapter's expert usage (extra: plot)"),
    "bigbench-to-bbh": ("tensorft.evaluation.bigbench_to_bbh", "BIG-bench task files -> offline BBH tasks for eval"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print usage first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _params(args) -> int:
    from .config import load_config
    from .loading import build_meta_model
    from .model import adapter_parameters, attach, count_parameters, root_of
    from .params import format_table, parameter_table
    from .train import resolve_tasks, start_fewshot

    cfg = load_config(args.config, args.set)
    if cfg.data.tasks or cfg.adapter.init_from:  # without them a routed kind counts its own n_tasks
        resolve_tasks(cfg)  # as training does: one routing row per task of data.tasks
    model = build_meta_model(cfg.model)
    base = sum(p.numel() for p in model.parameters())
    attach(model, cfg.adapter)
    if cfg.adapter.init_from:  # the new task's routing row; the mode's frozen parameters
        start_fewshot(model, load_weights=False)
    # saved but not trained: few-shot modes, ttmoe's experts
    frozen = sum(p.numel() for p in adapter_parameters(model).values()) - count_parameters(model)
    rows, total = parameter_table(model)
    root = root_of(model)
    expected = root.kind.parameter_count(list(layer.site for layer in root.layers.values()))
    expected += sum(r[3] for r in rows if r[0].startswith("saved "))
    if total - frozen != count_parameters(model) or total != expected:  # pragma: no cover - a bug, not input
        raise AssertionError(f"parameter count mismatch: table {total}, formula {expected}")
    print(f"{cfg.model.name_or_path}: adapter kind {cfg.adapter.kind}, rank {cfg.adapter.rank}")
    print(format_table(rows, total - frozen, base))
    if frozen:
        why = f"few-shot {cfg.adapter.fewshot}" if cfg.adapter.init_from else f"kind {cfg.adapter.kind}"
        print(f"{why}: {frozen:,} of the parameters above are saved but frozen")
    return 0


def _task_note(task) -> str:
    return f" (task {task})" if task is not None else ""


def _base_override(args) -> dict:
    """``--base``: the adapter's base model from another place than the one it records."""
    from .errors import TensorftError

    if args.base is None:
        return {}
    if not args.base.strip():
        raise TensorftError("--base: empty")
    if os.path.exists(args.base) and not os.path.isdir(args.base):
        raise TensorftError(f"--base {args.base}: not a directory")
    return {"name_or_path": os.path.abspath(args.base) if os.path.isdir(args.base) else args.base}


def _merge(args) -> int:
    from .export import merge_to_dir

    dtype = {} if args.dtype == "float32" else {"dtype": args.dtype}  # float32: merge_to_dir's default
    merge_to_dir(args.adapter_dir, args.out_dir, args.task, args.expert, **_base_override(args), **dtype)
    note = f" (expert {args.expert})" if args.expert is not None else _task_note(args.task)
    print(f"merged model{note} written to {os.path.abspath(args.out_dir)}")
    return 0


def _export_peft(args) -> int:
    from .export import export_dir

    # with --base, the PEFT config names the base it was loaded from
    export_dir(args.adapter_dir, args.out_dir, args.task, args.expert, **_base_override(args))
    note = f" (expert {args.expert})" if args.expert is not None else _task_note(args.task)
    print(f"PEFT LoRA adapter{note} written to {os.path.abspath(args.out_dir)}")
    return 0


def _add_base_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", default=None, metavar="DIR",
        help="load the adapter's base model from DIR (or a hub id) instead of the place recorded in "
        "the adapter, e.g. after moving it; the same option in every command that loads an adapter",
    )


def _add_task_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", default=None, metavar="NAME",
        help="task-routed kinds: the task whose LoRA to write (a name from the adapter's tasks; "
        "an id only if the adapter has no names)",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="tensorft", description="Tensor-factorized adapters for LLM fine-tuning.")
    parser.add_argument("--version", action="version", version=f"tensorft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("params", help="count adapter parameters from a config (no weights read)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_params)

    p = sub.add_parser("merge", help="merge an adapter into its base and write a dense HF model",
                       description="Reload the adapter's base model, add the adapter's update to its weights "
                       "and write a plain Hugging Face model (loads with AutoModelForCausalLM.from_pretrained).")
    p.add_argument("adapter_dir", help="a tensorft adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("out_dir", help="where the merged model goes; must not exist or be empty")
    _add_task_option(p)
    p.add_argument("--expert", default=None, metavar="NAME", help="ttmoe: the one expert to merge")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="what the merged weights are written in (default float32: the base is reloaded "
                   "unquantized in full precision; auto: the dtype the adapter was trained with)")
    _add_base_option(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("export-peft", help="write an adapter as a standard PEFT LoRA adapter",
                       description="Write the adapter as the exactly equal PEFT LoRA adapter (for "
                       "peft.PeftModel.from_pretrained, or lm_eval --model hf --model_args "
                       "pretrained=BASE,peft=OUT_DIR).")
    p.add_argument("adapter_dir", help="a tensorft adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("out_dir", help="where the PEFT adapter goes; must not exist or be empty")
    _add_task_option(p)
    p.add_argument("--expert", default=None, metavar="NAME", help="ttmoe: the one expert to write")
    _add_base_option(p)
    p.set_defaults(func=_export_peft)

    for name, (_, what) in FORWARDED.items():  # listed here; run() hands their arguments over whole
        sub.add_parser(name, help=what, add_help=False)
    return parser


def _user_errors_as_one_line(call) -> int:
    """``call()``'s exit code; a user error (bad input, a missing extra) becomes one line on
    stderr and exit code 2, as every command reports them."""
    from .errors import TensorftError, report_error
    from .extras import missing_extra

    try:
        return call()
    except TensorftError as e:
        report_error(str(e))
        return 2
    except ImportError as e:
        line = missing_extra(e)
        if line is None:
            raise
        report_error(line)
        return 2


def forward(name: str, argv: list[str]) -> int:
    """Run a forwarded command (``tensorft eval ...``) with its module's own argument parser."""
    module_name, _ = FORWARDED[name]

    def call() -> int:
        try:
            code = importlib.import_module(module_name).main(argv, prog=f"tensorft {name}")
        except SystemExit as e:  # argparse (--help, a bad option: already printed) or a main that exits
            code = e.code
        return 0 if code is None else code if isinstance(code, int) else 2

    return _user_errors_as_one_line(call)


def run(argv=None) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return forward(argv[0], argv[1:])
    parser = build_parser()
    if not argv:  # bare `tensorft`: what it can do, not an error line
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    return _user_errors_as_one_line(lambda: args.func(args))


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `torchrun -m tensorft.cli train ...`
        from .train import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
