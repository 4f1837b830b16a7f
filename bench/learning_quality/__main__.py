"""Learning-quality benchmark (issue 8): do tensorft's adapter kinds learn as well as LoRA at
fewer parameters? SmolLM2-135M-Instruct, real multiple-choice tasks that install offline.

    python -m bench.learning_quality --quick [--out DIR]      # 4 tasks x 4 methods, q,v, one lr, 1 seed
    python -m bench.learning_quality [--tasks a,b] [--methods m,n] [--targets qv,all]
        [--mode defaults|sweep] [--seeds 0,1] [--steps N] [--batch B] [--lr LR] [--out DIR]
        [--model DIR] [--jobs N]
    python -m bench.learning_quality --list                   # tasks, methods and parameter counts
    python -m bench.learning_quality --report-only --out DIR  # summary and plot of what is done

Per (task, method, targets): every lr of the grid (defaults: the base lr, the LoRA lr, for every
method; sweep: x0.25, x1, x4 of it) and every seed is trained and evaluated on dev and test; the
lr with the best mean dev accuracy is chosen and its test mean / std over seeds reported.
Writes ``OUT/runs/**.json`` (one per finished run: a rerun skips them), ``OUT/summary.md`` and,
through ``evaluation/report.py``, ``OUT/report/report.md`` and ``report.png`` (test accuracy
averaged over tasks vs trainable parameters, one line per kind and targets).

Runs are independent: ``--jobs N`` (default: the usable cores, at most 8) spreads them, longest
first, over N worker processes of one thread each (a run's small matrices use one core well;
on 2 cores the quick protocol took 39 min so, 2026-12-02). Ctrl-C stops them all; finished runs
are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # nothing comes from the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # evaluation/ and scripts/ are imported from the checkout

from . import engine, protocol  # noqa: E402
from .methods import METHODS, QUICK_METHODS, TARGETS, attach  # noqa: E402
from .tasks import DEFAULT_TASKS, TASKS, load_task  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "learning_quality")
QUICK_OUT = os.path.join(ROOT, "bench", "results", "learning_quality_quick")
BASE_LR = 5e-4
# Seconds per token for the up-front estimate, one thread per run (SmolLM2-135M, q,v; the medians
# of the --quick run of 2026-12-02 06:05 UTC, two one-thread workers on 2 idle cores): a training
# step ~11 ms per token of its batch (tweets 11.2, hyperbaton 11.9, social_iqa 11.4,
# intent_recognition 9.2; all 7 projections ~1.2x), evaluation ~5 ms per token it reads
# (4.4-6.3 over the four tasks; ``Reads.tokens``: each prompt once, then its options' rests).
TRAIN_S_PER_TOKEN = 0.011
EVAL_S_PER_TOKEN = 0.005


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"tensorft: error: {message}\n")


def _names(value: str, known, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise protocol.BenchError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench.learning_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 tasks x 4 methods, q,v, one lr, 1 seed: ~40 min on 2 cores")
    p.add_argument("--tasks", default=None, help=f"comma-separated (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--methods", default=None, help="comma-separated method names (--list shows them)")
    p.add_argument("--targets", default=None, help="qv, all or qv,all (default: qv with --quick, else both)")
    p.add_argument("--mode", choices=sorted(protocol.LR_MULTIPLIERS), default=None,
                   help="defaults: one lr for every method; sweep: x0.25, x1, x4 (default: sweep, defaults with --quick)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0 with --quick, else 0,1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 50 with --quick, else 70)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=BASE_LR, help="the base (LoRA) learning rate")
    p.add_argument("--out", default=None, help="results folder (default bench/results/learning_quality[_quick])")
    p.add_argument("--list", action="store_true", help="print tasks and methods with parameter counts, then exit")
    p.add_argument("--report-only", action="store_true", help="only write the summary and plot of finished runs")
    p.add_argument("--model", default=None,
                   help="a local Hugging Face causal LM to train on (default: SmolLM2-135M-Instruct from the offline assets)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes of one thread each (default: the usable cores, at most 8; 1: this process only)")
    p.add_argument("--worker-share", default=None, help=argparse.SUPPRESS)  # set by --jobs for its workers
    return p


def resolve(args) -> argparse.Namespace:
    """Fill the defaults that depend on --quick; check the names."""
    quick = args.quick
    args.tasks = _names(args.tasks or ",".join(DEFAULT_TASKS), TASKS, "task")
    args.methods = _names(args.methods or ",".join(QUICK_METHODS if quick else METHODS), METHODS, "method")
    args.targets = _names(args.targets or ("qv" if quick else "qv,all"), TARGETS, "targets")
    args.mode = args.mode or ("defaults" if quick else "sweep")
    args.seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1")).split(",")]
    args.steps = args.steps or (50 if quick else 70)  # quick: 16 runs, ~40 min on 2 idle cores (README)
    args.out = os.path.abspath(args.out or (QUICK_OUT if quick else DEFAULT_OUT))
    args.jobs = args.jobs if args.jobs is not None else min(8, len(os.sched_getaffinity(0)))
    if args.jobs < 1:
        raise protocol.BenchError(f"--jobs {args.jobs}: at least 1")
    if args.model is not None:
        args.model = os.path.abspath(args.model)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise protocol.BenchError(f"--model {args.model}: no config.json there (a local Hugging Face model folder)")
    return args


def lr_line(args) -> str:
    if args.report_only:  # the folder may hold runs of several base lrs (e.g. --lr 5e-4 and 1e-3)
        return "learning rates: every lr the folder's runs used, the dev-chosen one per cell in the lr column"
    return (f"base lr {args.lr:g}, mode {args.mode} "
            f"(x{', x'.join(f'{m:g}' for m in protocol.LR_MULTIPLIERS[args.mode])})")


def model_label(args) -> str:
    return os.path.basename(args.model) if args.model else "SmolLM2-135M-Instruct"


def settings_line(args) -> str:
    return (f"{model_label(args)} fp32; {args.steps} steps of batch {args.batch}, AdamW (weight decay 0), "
            f"linear warmup {engine.TrainSettings().warmup} steps then linear decay to 0, grad-norm clip 1.0; "
            f"loss on the gold option's tokens; {lr_line(args)}; "
            "lr chosen by mean dev accuracy; accuracy = rank classification by log-likelihood per option token.")


def eval_tokens(rows: list[engine.Encoded]) -> int:
    """Tokens an evaluation of ``rows`` reads (``engine.option_scores``)."""
    return sum(r.tokens() for r in engine.option_inputs(rows))


def costs(splits: dict, args):
    """Estimated seconds at one thread: {task: its zero-shot evaluation}, and run -> seconds."""
    eval_s = {t: (eval_tokens(s["dev"]) + eval_tokens(s["test"])) * EVAL_S_PER_TOKEN for t, s in splits.items()}
    gold_tokens = {t: sum(len(r.options[r.gold]) for r in s["train"]) / len(s["train"]) for t, s in splits.items()}

    def run_s(spec: protocol.RunSpec) -> float:
        return args.steps * args.batch * gold_tokens[spec.task] * TRAIN_S_PER_TOKEN + eval_s[spec.task]

    return eval_s, run_s


def shares(seconds: list[float], workers: int) -> list[list[int]]:
    """Indices of ``seconds`` per worker: longest first, each to the least-loaded worker (so a
    long intent_recognition run starts first, not last); workers left without work dropped."""
    loads = [0.0] * workers
    out: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(seconds)), key=lambda i: -seconds[i]):
        w = min(range(workers), key=loads.__getitem__)
        out[w].append(i)
        loads[w] += seconds[i]
    return [o for o in out if o]


def _ignore_ctrl_c() -> None:
    """In a forked worker before exec: ignore SIGINT (a pending one is discarded), then let it in."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_workers(argv: list[str], args, shares_of: list[list[dict]], seconds_of: list[float]) -> int:
    """Run each worker's share (``{"zero_shot": task}`` or ``{"run": index into the grid}`` items,
    estimated ``seconds_of`` each) in a process of this command, one thread each; 0 when all of
    them succeed. A worker that fails leaves its finished runs written (each atomically): a rerun
    resumes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    procs = []
    try:
        # Workers ignore the terminal's Ctrl-C (no traceback from each); this process stops them.
        # Ctrl-C is held back until every worker is started and listed in ``procs``: one arriving
        # between a fork and its SIG_IGN would hit a half-started worker nobody stops.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for k, (items, seconds) in enumerate(zip(shares_of, seconds_of), 1):
                print(f"worker {k}: {len(items)} item(s), ~{seconds / 60:.0f} min", flush=True)
                share = json.dumps(items)
                procs.append(subprocess.Popen([sys.executable, "-m", "bench.learning_quality", *argv,
                                               "--out", args.out, "--jobs", "1", "--worker-share", share],
                                              env=env, preexec_fn=_ignore_ctrl_c))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a held-back Ctrl-C lands here
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    failed = [k for k, code in enumerate(codes, 1) if code != 0]
    if failed:
        print(f"tensorft: error: worker(s) {', '.join(map(str, failed))} failed (output above); "
              "finished runs are kept, a rerun resumes", file=sys.stderr)
        return 1
    return 0


def model_path(model_dir: str | None = None) -> str:
    from scripts.demo_assets import smollm2_135m_instruct

    return model_dir or smollm2_135m_instruct()  # ~1 min the first time, then cached


def load_model(model_dir: str):
    """The frozen base model, in eval mode."""
    import tensorft
    from tensorft.loading import load_base_model

    base = load_base_model(tensorft.ModelConfig(name_or_path=model_dir))
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def load_base(model_dir: str | None = None):
    from transformers import AutoTokenizer

    model_dir = model_path(model_dir)
    return load_model(model_dir), AutoTokenizer.from_pretrained(model_dir), model_dir


def list_methods(model_dir: str | None = None) -> None:
    """Every method's trainable-parameter count on each targets set, attached to the model
    (default SmolLM2-135M) built on the meta device (shapes only: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scripts.demo_assets import smollm2_135m_instruct

    config = AutoConfig.from_pretrained(model_dir or smollm2_135m_instruct())
    print("tasks:", ", ".join(TASKS))
    for name, method in METHODS.items():
        counts = []
        for t, targets in TARGETS.items():
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            counts.append(f"{t} {attach(model, method, targets, 1e-3, 0)[2]:>9,}")
        print(f"{name:16s} {'  '.join(counts)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except protocol.BenchError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tensorft: interrupted; finished runs are kept, a rerun resumes", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.report_only:
        protocol.write_report(args.out, settings_line(args), model_label(args))
        return 0
    if args.list:
        list_methods(args.model)
        return 0
    from transformers import AutoTokenizer

    model_dir = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = {name: {s: engine.encode(tokenizer, rows) for s, rows in load_task(name).items()} for name in args.tasks}
    # The weights are loaded where runs train (this process, or each worker), not in a parent of workers.
    bench = protocol.Bench(None, tokenizer, splits, engine.TrainSettings(steps=args.steps, batch=args.batch),
                           args.out, os.path.basename(model_dir), verbose=True)
    specs = protocol.grid(args.tasks, [METHODS[m] for m in args.methods], args.targets, args.lr, args.mode, args.seeds)
    if args.worker_share is not None:  # one worker of --jobs: its share only, no summary
        import torch

        torch.set_num_threads(1)
        bench.base = load_model(model_dir)
        bench.verbose = False  # the workers' step lines would interleave; each run's result line names it
        for item in json.loads(args.worker_share):
            if "zero_shot" in item:
                show_zero_shot(bench, item["zero_shot"])
            else:
                show_run(bench, specs[item["run"]], item["run"] + 1, len(specs))
        return 0
    for name, s in splits.items():
        print(f"task {name}: {', '.join(f'{k} {len(v)}' for k, v in s.items())}")
    eval_s, run_s = costs(splits, args)
    work = ([{"zero_shot": t} for t in args.tasks if bench.finished(bench.zero_shot_path(t)) is None]
            + [{"run": i} for i, s in enumerate(specs) if bench.finished(s.path(args.out)) is None])
    seconds = [eval_s[w["zero_shot"]] if "zero_shot" in w else run_s(specs[w["run"]]) for w in work]
    groups = shares(seconds, min(args.jobs, len(work))) if work else []
    done = (f"{len(specs)} runs and {len(args.tasks)} zero-shot evaluations, "
            f"{len(specs) + len(args.tasks) - len(work)} of them already done")
    if len(groups) > 1:
        wall = max(sum(seconds[i] for i in group) for group in groups)
        print(f"{done}; estimated {wall / 60:.0f} min in {len(groups)} processes of one thread each "
              f"({sum(seconds) / 60:.0f} min of work) -> {args.out}", flush=True)
        code = run_workers(argv, args, [[work[i] for i in group] for group in groups],
                           [sum(seconds[i] for i in group) for group in groups])
        if code:
            return code
    else:
        print(f"{done}; estimated {sum(seconds) / 60:.0f} min at one thread -> {args.out}", flush=True)
        t = time.perf_counter()
        bench.base = load_model(model_dir)
        print(f"model: {model_dir} [{time.perf_counter() - t:.0f} s]", flush=True)
        for name in args.tasks:
            show_zero_shot(bench, name)
        for i, spec in enumerate(specs, 1):
            show_run(bench, spec, i, len(specs))
    protocol.write_report(args.out, settings_line(args), os.path.basename(model_dir))
    print(f"written: {os.path.join(args.out, 'summary.md')}, {os.path.join(args.out, 'report', 'report.png')}")
    return 0


def show_zero_shot(bench: protocol.Bench, task: str) -> None:
    z = bench.zero_shot(task)
    print(f"  zero-shot {task}: dev {z['dev_acc']:.3f} test {z['test_acc']:.3f}", flush=True)


def show_run(bench: protocol.Bench, spec: protocol.RunSpec, i: int, n: int) -> None:
    r = bench.run(spec)
    print(f"  [{i}/{n}] {spec.task} {spec.method.name}@{spec.targets} lr {spec.lr:g} seed {spec.seed}: "
          f"params {r['params']:,} dev {r['dev_acc']:.3f} test {r['test_acc']:.3f} "
          f"loss {r['loss_first']:.2f}->{r['loss_last10']:.2f} [{r['total_s']:.0f} s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
