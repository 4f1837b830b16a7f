"""TT-LoRA MoE stage 1: one ``tt`` expert per task of a multi-task config, each trained alone on
its own task's data, one adapter directory per task (methods.md section 4).

    python -m tensorft.experts --config FILE [--set key=value ...]
    torchrun --nproc_per_node N -m tensorft.experts --config FILE --set distributed.strategy=ddp

``train.output_dir`` receives ``<task>/`` (a normal tensorft run directory: the expert adapter,
its metrics, checkpoints; loadable, mergeable and exportable as PEFT LoRA; its ``tasks`` is the
task's name, which becomes the expert's name) and, once every expert is trained,
``experts.json`` (the experts in task order), which stage 2 reads:
``adapter: {kind: ttmoe, experts: <train.output_dir>}``.

Re-running the same command resumes: an expert whose run finished is skipped, an interrupted
one resumes from its newest complete checkpoint (each expert is one ``tensorft.train.run``).
"""

from __future__ import annotations

import copy
import os
import sys

from .config import Config, load_config
from .errors import ConfigError, TensorftError, report_error

INDEX = "experts.json"


def plan(cfg: Config) -> list[tuple[str, Config]]:
    """One single-task config per task: its own data only, output in ``output_dir/<task>``."""
    if cfg.adapter.kind != "tt":
        raise ConfigError(f"adapter.kind: stage 1 trains tt experts, got {cfg.adapter.kind!r}")
    if not cfg.data.tasks:
        raise ConfigError("data.tasks: stage 1 trains one expert per task; list the tasks under data.tasks")
    out = []
    for name, task in cfg.data.tasks.items():
        sub = copy.deepcopy(cfg)
        sub.data.tasks = {name: task}
        sub.adapter.tasks = []  # the task's name, set by resolve_tasks (the expert's name)
        sub.train.output_dir = os.path.join(cfg.train.output_dir, name)
        out.append((name, sub))
    return out


def run(cfg: Config) -> int:
    from .saving import write_json
    from .train import FINISHED, _is_main
    from .train import run as train_one

    experts = plan(cfg)
    for name, sub in experts:
        if os.path.isfile(os.path.join(sub.train.output_dir, FINISHED)):
            if _is_main():
                print(f"tensorft: expert {name}: already trained, skipped ({sub.train.output_dir})", file=sys.stderr)
            continue
        if _is_main():
            print(f"tensorft: expert {name}: training on its own data", file=sys.stderr)
        code = train_one(sub)
        if code != 0:
            return code
    if _is_main():
        write_json(os.path.join(cfg.train.output_dir, INDEX), {"experts": [{"name": n, "dir": n} for n, _ in experts]})
        print(f"tensorft: {len(experts)} experts in {os.path.abspath(cfg.train.output_dir)}")
    return 0


def main(argv=None) -> int:
    from .train import build_parser, close_process_group

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    parser.prog = "tensorft.experts"
    args = parser.parse_args(argv)
    try:
        return run(load_config(args.config, args.set))
    except TensorftError as e:
        report_error(str(e))
        return 2
    finally:
        close_process_group()


if __name__ == "__main__":
    from .train import exit_process

    exit_process(main())
