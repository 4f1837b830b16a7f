"""MT-Bench evaluation (tensorft/evaluation/mt_bench.py) against a deterministic judge on loopback HTTP.

The judge server scores an answer by its content (``score_of``), so every expected average is
computed here from answers.jsonl; it records each request (headers, body) for the checks.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import tensorft
from conftest import randomize_adapters, save_tiny_chat_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # evaluation/ is a folder of the repository, not an installed package

from evaluation import judges, mt_bench  # noqa: E402

KEY_ENV = "MTB_TEST_JUDGE_KEY"
KEY = "sk-loopback-7f3a9c"
JUDGE_MODEL = "loopback-judge"

QUESTIONS = [
    {"question_id": 901, "category": "writing", "turns": ["Write a haiku about tensors.", "Now make it rhyme."]},
    # math: graded against the reference in REFERENCES (a --reference file)
    {"question_id": 902, "category": "math", "turns": ["What is 3 + 4?", "And that times two?"]},
    # reasoning: its reference comes from the question row itself
    {"question_id": 903, "category": "reasoning", "turns": ["Is a square a rectangle?", "Is a rectangle a square?"],
     "reference": ["Yes, always.", "Only when its sides are equal."]},
]
REFERENCES = [{"question_id": 902, "model_id": "ref", "choices": [{"index": 0, "turns": ["It is 7.", "It is 14."]}]}]


# --------------------------------------------------------------------------- the judge server


def score_of(answer: str) -> int:
    return 1 + sum(answer.encode("utf-8")) % 10


def _between(text: str, start: str, end: str, occurrence: int = -1) -> str:
    piece = text.split(start)[occurrence]
    return piece.split(end)[0]


def answers_in(prompt: str) -> dict:
    """The answer(s) graded in an MT-Bench judge prompt: {"": x} single, {"A": a, "B": b} pairwise."""
    if "[The Start of Assistant's Answer]\n" in prompt:
        return {"": _between(prompt, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")}
    if "[The Start of Assistant A's Answer]\n" in prompt:
        return {s: _between(prompt, f"[The Start of Assistant {s}'s Answer]\n",
                            f"\n[The End of Assistant {s}'s Answer]") for s in "AB"}
    if "<|The Start of Assistant B's Conversation" in prompt:  # pairwise, turn 2
        conversations = {s: _between(prompt, f"<|The Start of Assistant {s}'s Conversation",
                                     f"<|The End of Assistant {s}") for s in "AB"}
        return {s: _between(c, f"### Assistant {s}:\n", "\n\n") for s, c in conversations.items()}
    # single, turn 2: the last assistant message of the conversation
    return {"": _between(prompt, "### Assistant A:\n", "\n\n<|The End of Assistant A's Conversation")}


def question_of(prompt: str) -> tuple[int, int]:
    """(question_id, turn) a judge prompt is about."""
    turn = 2 if "### User:" in prompt else 1
    for q in QUESTIONS:
        if q["turns"][0] in prompt:
            return q["question_id"], turn
    raise AssertionError("judge prompt names no test question")


def fair_judge(body: dict):
    """Rate 1-10 by content; pairwise: the answer with the higher score_of wins."""
    prompt = body["messages"][-1]["content"]
    found = answers_in(prompt)
    if "" in found:
        return 200, f"Reasonable answer. Rating: [[{score_of(found[''])}]]"
    a, b = score_of(found["A"]), score_of(found["B"])
    return 200, "Verdict: " + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")


class JudgeServer:
    """A chat-completions endpoint on 127.0.0.1; ``behave(body) -> (status, text)``."""

    def __init__(self, behave=fair_judge, models_status=200):
        self.behave = behave
        self.models_status = models_status  # GET /v1/models, the wrapper's key check
        self.gets = []  # headers of each GET
        self.requests = []  # (headers dict, body dict, path) of each POST, in arrival order
        self.answered = []  # (question_id, turn) of every rating / verdict sent back
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body, self.path))
                status, text = server.behave(body)
                if status == "hang":  # no answer until the test releases it (or `text` seconds pass)
                    server.release.wait(float(text or 60))
                    return
                if status == 200:
                    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                    server.answered.append(question_of(body["messages"][-1]["content"]))
                else:
                    payload = {"error": {"message": text}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.gets.append(dict(self.headers))
                data = json.dumps({"data": [{"id": JUDGE_MODEL}]}).encode()
                self.send_response(server.models_status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(behave=fair_judge, models_status=200):
        servers.append(JudgeServer(behave, models_status))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def judge_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # loopback must never go to a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- model and data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (chat template), a saved cp adapter, the data."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("mtb")
    base = save_tiny_chat_llama(root / "base", hidden=32, intermediate=64, max_positions=2048, tie_embeddings=False)
    model = LlamaForCausalLM.from_pretrained(base)  # so the adapter records where its base is
    tensorft.attach(model, {"kind": "cp", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]})
    randomize_adapters(model)
    adapter = str(root / "adapter")
    tensorft.save(model, adapter)
    questions, reference = root / "questions.jsonl", root / "reference.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    reference.write_text("".join(json.dumps(r) + "\n" for r in REFERENCES))
    return {"root": root, "base": base, "adapter": adapter, "questions": str(questions), "reference": str(reference)}


def argv(files, out, srv=None, *extra, source=None):
    """The command line for a run; ``srv``: judge with that server; ``source``: not the adapter."""
    args = list(source or ("--adapter", files["adapter"]))
    args += ["--questions", files["questions"], "--reference", files["reference"], "--out", str(out),
             "--max-new-tokens", "6", "--device", "cpu"]
    if srv is not None:
        args += ["--judge", f"openai:{JUDGE_MODEL}", "--judge-base-url", srv.url,
                 "--judge-api-key-env", KEY_ENV, "--judge-backoff", "0"]
    return args + list(extra)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_scores(out, questions=QUESTIONS):
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in read_rows(os.path.join(out, "answers.jsonl"))}
    scores = {(q["question_id"], t): score_of(answers[q["question_id"]][t - 1]) for q in questions for t in (1, 2)}
    return answers, scores


@pytest.fixture
def replies(monkeypatch):
    """Record every ChatModel.reply call (messages, answer); ``fail_at`` interrupts the n-th."""
    log = {"calls": [], "fail_at": None, "rendered": []}
    real = judges.ChatModel.reply

    def reply(self, messages, max_new_tokens, temperature=0.0):
        if log["fail_at"] is not None and len(log["calls"]) + 1 == log["fail_at"]:
            raise KeyboardInterrupt  # as if Ctrl-C hit in the middle of generating
        answer = real(self, messages, max_new_tokens, temperature)
        log["calls"].append(([dict(m) for m in messages], answer))
        log["rendered"].append(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return answer

    monkeypatch.setattr(judges.ChatModel, "reply", reply)
    return log


def no_key_anywhere(out, *texts):
    for name in os.listdir(out):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            assert KEY not in f.read(), name
    for text in texts:
        assert KEY not in text


# --------------------------------------------------------------------------- the tests


def test_end_to_end_scores_and_resume_after_interrupted_generation(files, server, replies, tmp_path, capsys):
    srv = server()
    out = tmp_path / "run"
    replies["fail_at"] = 3  # question 902, turn 1: question 901 is complete, nothing else
    assert mt_bench.run(argv(files, out, srv)) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["question_id"] for r in read_rows(out / "answers.jsonl")] == [901]
    assert not (out / "judgments.jsonl").exists() and not (out / "scores.json").exists()
    assert srv.requests == []

    replies["fail_at"] = None
    first_run = list(replies["calls"])
    assert mt_bench.run(argv(files, out, srv)) == 0
    printed = capsys.readouterr()
    # generation resumed: 901 was not asked again, 902 and 903 twice each (two turns)
    assert len(first_run) == 2 and len(replies["calls"]) == 6
    assert [m[0]["content"] for m, _ in replies["calls"][2:]] == [
        t for q in QUESTIONS[1:] for t in (q["turns"][0], q["turns"][0])]
    answers, expected = expected_scores(out)
    assert [r["question_id"] for r in read_rows(out / "answers.jsonl")] == [901, 902, 903]
    for i, q in enumerate(QUESTIONS):  # turn 2 saw the model's own turn-1 answer, via the chat template
        (m1, a1), (m2, a2) = replies["calls"][2 * i: 2 * i + 2]
        assert [m["role"] for m in m2] == ["user", "assistant", "user"]
        assert m2[1]["content"] == a1 == answers[q["question_id"]][0] and a2 == answers[q["question_id"]][1]
        assert "<|im_start|>assistant\n" + a1 + "<|im_end|>" in replies["rendered"][2 * i + 1]

    # every (question, turn) judged once, with the key from the environment, greedy
    assert sorted(srv.answered) == sorted(expected)
    assert len(srv.gets) == 2 and all(h["Authorization"] == f"Bearer {KEY}" for h in srv.gets)  # the key check
    for headers, body, path in srv.requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == f"Bearer {KEY}"
        assert body["model"] == JUDGE_MODEL and body["temperature"] == 0
        assert body["messages"][0]["role"] == "system"
    prompts = {question_of(b["messages"][-1]["content"]): b["messages"][-1]["content"] for _, b, _ in srv.requests}
    assert "It is 7." in prompts[(902, 1)] and "It is 14." in prompts[(902, 2)]  # --reference file
    assert "Only when its sides are equal." in prompts[(903, 2)]  # the question's own reference
    assert "Reference" not in prompts[(901, 1)] + prompts[(901, 2)]
    for q in QUESTIONS:  # the turn-2 judge prompt holds both turns of the conversation
        turn2 = prompts[(q["question_id"], 2)]
        assert all(t in turn2 for t in q["turns"] + answers[q["question_id"]])

    scores = json.loads((out / "scores.json").read_text())
    values = list(expected.values())
    assert scores["overall"] == pytest.approx(sum(values) / len(values))
    assert scores["turn_2"] == pytest.approx(sum(expected[(q["question_id"], 2)] for q in QUESTIONS) / 3)
    for q in QUESTIONS:
        cat = scores["categories"][q["category"]]
        pair = [expected[(q["question_id"], 1)], expected[(q["question_id"], 2)]]
        assert (cat["turn_1"], cat["turn_2"], cat["average"]) == pytest.approx((pair[0], pair[1], sum(pair) / 2))
    assert scores["failed"] == 0 and scores["judged"] == 6
    md = (out / "scores.md").read_text()
    assert f"**{scores['overall']:.2f}**" in md and "| math |" in md
    rows = read_rows(out / "judgments.jsonl")
    assert {(r["question_id"], r["turn"]): r["score"] for r in rows} == expected
    assert {r["judge"][1] for r in rows if r["question_id"] == 902} == {"single-math-v1", "single-math-v1-multi-turn"}
    no_key_anywhere(out, printed.out, printed.err)

    # a finished run does nothing more
    calls = len(replies["calls"])
    assert mt_bench.run(argv(files, out, srv)) == 0
    assert len(replies["calls"]) == calls and len(srv.requests) == 6


def test_killed_while_judging_resumes_without_judging_twice(files, server, replies, tmp_path):
    """The CLI in a subprocess, SIGKILLed while its third judge request hangs; then a rerun."""
    first = server(lambda body: ("hang", "") if len(first.requests) == 3 else fair_judge(body))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "evaluation.mt_bench", *argv(files, out, first)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(first.requests) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert len(first.requests) == 3, proc.communicate(timeout=5)[0] if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL
    rows = read_rows(out / "judgments.jsonl")
    assert len(rows) == 2 and not (out / "scores.json").exists()
    with open(out / "judgments.jsonl", "a") as f:
        f.write('{"question_id": 902, "turn": 1, "sco')  # a row torn by a kill mid-write
    answers_before = (out / "answers.jsonl").read_text()

    second = server()
    assert mt_bench.run(argv(files, out, second)) == 0
    assert replies["calls"] == []  # every answer was there: nothing generated again
    assert (out / "answers.jsonl").read_text() == answers_before
    _, expected = expected_scores(out)
    assert sorted(first.answered + second.answered) == sorted(expected)  # each judged exactly once
    rows = read_rows(out / "judgments.jsonl")  # the torn row was cut off, not kept
    assert len(rows) == 6 and {(r["question_id"], r["turn"]): r["score"] for r in rows} == expected
    scores = json.loads((out / "scores.json").read_text())
    assert scores["overall"] == pytest.approx(sum(expected.values()) / 6)
    no_key_anywhere(out, output)


def test_garbage_and_errors_are_retried_then_recorded(files, server, replies, tmp_path):
    seen = {}

    def flaky(body):
        key = question_of(body["messages"][-1]["content"])
        seen[key] = seen.get(key, 0) + 1
        if key == (901, 1):
            return 200, "What a lovely poem!"  # never a rating
        if key == (902, 2):
            return 200, "Rating: [[42]]"  # out of the 1-10 scale
        if key == (901, 2) and seen[key] == 1:
            return 503, "overloaded"  # transient: the second attempt succeeds
        return fair_judge(body)

    srv = server(flaky)
    out = tmp_path / "run"
    assert mt_bench.run(argv(files, out, srv, "--judge-retries", "2", "--limit", "2")) == 0
    assert seen == {(901, 1): 3, (901, 2): 2, (902, 1): 1, (902, 2): 3}
    rows = {(r["question_id"], r["turn"]): r for r in read_rows(out / "judgments.jsonl")}
    bad = rows[(901, 1)]
    assert bad["score"] == -1 and bad["attempts"] == 3 and bad["judgment"] == "What a lovely poem!"
    assert bad["error"] == "no [[rating]] in the judge's output" and len(bad["attempt_errors"]) == 3
    assert rows[(901, 2)]["attempts"] == 2 and "HTTP 503" in rows[(901, 2)]["attempt_errors"][0]
    assert rows[(902, 2)]["score"] == -1 and rows[(902, 2)]["judgment"] == "Rating: [[42]]"
    _, expected = expected_scores(out, QUESTIONS[:2])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["failed"] == 2 and scores["judged"] == 2
    assert [(f["question_id"], f["turn"]) for f in scores["failed_judgments"]] == [(901, 1), (902, 2)]
    assert scores["overall"] == pytest.approx((expected[(901, 2)] + expected[(902, 1)]) / 2)
    assert scores["categories"]["writing"]["failed"] == 1 and scores["categories"]["writing"]["turn_1"] is None
    assert "2 judgment(s) failed" in (out / "scores.md").read_text()

    # a rerun retries only the failed judgments; the latest row of each counts
    good = server()
    assert mt_bench.run(argv(files, out, good, "--limit", "2")) == 0
    assert sorted(good.answered) == [(901, 1), (902, 2)]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["failed"] == 0 and scores["overall"] == pytest.approx(sum(expected.values()) / 4)


def test_judge_timeout_is_retried_and_a_rejected_key_stops_the_run(files, server, replies, tmp_path, capsys):
    slow = server(lambda body: ("hang", "5") if len(slow.requests) == 1 else fair_judge(body))
    out = tmp_path / "run"
    assert mt_bench.run(argv(files, out, slow, "--limit", "1", "--judge-retries", "1", "--judge-timeout", "0.5")) == 0
    first = read_rows(out / "judgments.jsonl")[0]
    assert first["error"] is None and first["attempts"] == 2 and "timed out" in first["attempt_errors"][0]
    capsys.readouterr()

    # a refused key is found by GET /models before the model is even loaded
    refusing = server(lambda body: (401, "Incorrect API key provided"), models_status=401)
    out, generated = tmp_path / "refused", len(replies["calls"])
    assert mt_bench.run(argv(files, out, refusing, "--limit", "1")) == 2
    err = capsys.readouterr().err
    refused = f"tensorft: error: judge at {refusing.url}: the API key in ${KEY_ENV} was refused (HTTP 401"
    assert err == refused + " Unauthorized)\n"
    assert refusing.requests == [] and len(replies["calls"]) == generated and not out.exists()
    assert KEY not in err

    # a server without that route refusing the judging call itself: stop, keep the answers
    url_1, refusing = refusing.url, server(lambda body: (401, "Incorrect API key provided"), models_status=404)
    out = tmp_path / "rejected"
    assert mt_bench.run(argv(files, out, refusing, "--limit", "1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert last.startswith(refused.replace(url_1, refusing.url))
    assert len(refusing.requests) == 1  # not retried: every later call would be refused too
    assert (out / "answers.jsonl").exists() and not (out / "scores.json").exists()  # the answers are kept
    no_key_anywhere(out, last)


def test_pairwise_baseline_against_adapter(files, server, replies, tmp_path):
    out_a, out_b = tmp_path / "adapter", tmp_path / "base"
    assert mt_bench.run(argv(files, out_a, None, "--limit", "2")) == 0  # answers only, no judge
    assert not (out_a / "judgments.jsonl").exists()
    srv = server()
    args = argv(files, out_b, srv, "--limit", "2", "--compare-to", str(out_a), source=("--model", files["base"]))
    assert mt_bench.run(args) == 0
    mine, _ = expected_scores(out_b, QUESTIONS[:2])
    theirs, _ = expected_scores(out_a, QUESTIONS[:2])
    assert mine != theirs  # the adapter changes the answers
    rows = read_rows(out_b / "pairwise.jsonl")
    assert len(rows) == 8 and {r["game"] for r in rows} == {1, 2}
    want = {"win": 0, "tie": 0, "loss": 0}
    for q in QUESTIONS[:2]:
        for t in (0, 1):
            a, b = score_of(mine[q["question_id"]][t]), score_of(theirs[q["question_id"]][t])
            want["win" if a > b else "loss" if a < b else "tie"] += 1
    pair = json.loads((out_b / "scores.json").read_text())["pairwise"]
    assert pair["opponent"] == "adapter" and pair["failed"] == 0 and pair["inconsistent"] == 0
    assert {k: pair[k] for k in want} == want
    assert pair["win_rate"] == pytest.approx(want["win"] / 4)
    assert {r["model_a"] for r in rows if r["game"] == 1} == {"base"}
    assert {r["judge"][1] for r in rows if r["question_id"] == 902} == {"pair-math-v1", "pair-math-v1-multi-turn"}


def test_local_hf_judge_failures_are_recorded(files, tmp_path):
    """A random tiny model as judge never gives a rating: both turns fail, are kept, are counted."""
    out = tmp_path / "run"
    args = argv(files, out, None, "--limit", "1", "--judge", f"hf:{files['base']}", "--judge-retries", "1",
                "--judge-backoff", "0", "--judge-max-tokens", "4")
    assert mt_bench.run(args) == 0
    rows = read_rows(out / "judgments.jsonl")
    assert [(r["turn"], r["score"], r["attempts"]) for r in rows] == [(1, -1, 2), (2, -1, 2)]
    assert all(r["judge"] == [f"hf:{files['base']}", n] for r, n in zip(rows, ["single-v1", "single-v1-multi-turn"]))
    scores = json.loads((out / "scores.json").read_text())
    assert scores["failed"] == 2 and scores["overall"] is None


def test_task_id_and_seeded_category_temperature(files, replies, tmp_path, monkeypatch):
    """--task-id reaches tensorft.task_context; sampled answers repeat exactly (seeded per question)."""
    seen = []
    real = tensorft.task_context

    def recording(model, ids):
        seen.append(ids.tolist())
        return real(model, ids)

    monkeypatch.setattr(tensorft, "task_context", recording)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert mt_bench.run(argv(files, out, None, "--limit", "1", "--task-id", "3", "--category-temperature")) == 0
    assert seen == [[3]] * 4  # two runs, two turns
    rows = [read_rows(out / "answers.jsonl")[0] for out in outs]
    assert rows[0]["temperature"] == 0.7  # MT-Bench's writing temperature
    assert rows[0]["choices"] == rows[1]["choices"]


def _bad_questions(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing-file", "bad-json", "no-turns", "dup-id", "no-reference", "judge-spec",
                                  "no-key", "two-models", "task-id-base", "no-adapter-dir", "bad-url",
                                  "base-without-adapter"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "out"
    q1 = json.dumps(QUESTIONS[0])
    args = argv(files, out, None, "--judge", f"openai:{JUDGE_MODEL}", "--judge-api-key-env", KEY_ENV)
    message = {
        "missing-file": "--questions {q}: no such file",
        "bad-json": "{q}:2: not valid JSON",
        "no-turns": "{q}:1: 'turns' must be a non-empty list of strings",
        "dup-id": "{q}:2: duplicate question_id 901 (first on line 1)",
        "no-reference": "question 904 (coding) needs a reference answer",
        "judge-spec": "--judge: unknown judge spec 'gpt4'",
        "no-key": f"environment variable {KEY_ENV} is not set",
        "two-models": "give exactly one of --adapter DIR and --model MODEL",
        "task-id-base": "--task-id needs an adapter",
        "no-adapter-dir": "--adapter /nonexistent/adapter: not a directory",
        "bad-url": "--judge-base-url: 'localhost:8000' is not an http(s) URL",
        "base-without-adapter": "--base DIR relocates an adapter's base model; for a plain model use --model MODEL",
    }[case]
    q = files["questions"]
    if case == "missing-file":
        q = str(tmp_path / "nope.jsonl")
    elif case == "bad-json":
        q = _bad_questions(tmp_path, q1 + "\n{not json\n")
    elif case == "no-turns":
        q = _bad_questions(tmp_path, json.dumps({"question_id": 1, "category": "writing"}) + "\n")
    elif case == "dup-id":
        q = _bad_questions(tmp_path, q1 + "\n" + q1 + "\n")
    elif case == "no-reference":
        q = _bad_questions(tmp_path, json.dumps({"question_id": 904, "category": "coding", "turns": ["x", "y"]}) + "\n")
    elif case == "judge-spec":
        args += ["--judge", "gpt4"]
    elif case == "no-key":
        monkeypatch.delenv(KEY_ENV)
    elif case == "two-models":
        args += ["--model", files["base"]]
    elif case == "task-id-base":
        args = argv(files, out, None, "--task-id", "1", source=("--model", files["base"]))
    elif case == "base-without-adapter":
        args = argv(files, out, None, source=("--base", files["base"]))
    elif case == "no-adapter-dir":
        args = argv(files, out, None, source=("--adapter", "/nonexistent/adapter"))
    elif case == "bad-url":
        args += ["--judge-base-url", "localhost:8000"]
    args[args.index("--questions") + 1] = q
    assert mt_bench.run(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tensorft: error: {message.format(q=q)}"), err
    assert not out.exists()


def test_cli_subprocess_errors(files, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "evaluation.mt_bench", "--adapter", files["adapter"],
           "--questions", str(tmp_path / "missing.jsonl"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"tensorft: error: --questions {tmp_path / 'missing.jsonl'}: no such file\n"
    assert not out.exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        mt_bench.run(["--adapter", "x", "--out", "y", "--judge-retries", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorft: error: argument --judge-retries: must be at least 0")


def test_rating_and_verdict_parsing():
    assert judges.parse_rating("fine.\nRating: [[7]]") == 7
    assert judges.parse_rating("Rating: [[8.5]] (was [[3]] before)") == 8.5
    assert judges.parse_rating("score [6]") == 6
    assert judges.parse_rating("Rating: [[0]]") is None and judges.parse_rating("[[11]]") is None
    assert judges.parse_rating("no number here") is None
    assert judges.parse_verdict("so [[B]]") == "B" and judges.parse_verdict("[[C]]") == "tie"
    assert judges.parse_verdict("[[A]] or [[B]]") is None and judges.parse_verdict("A is better") is None


def test_out_dir_of_other_settings_is_refused(files, server, replies, tmp_path, capsys):
    out = tmp_path / "run"
    assert mt_bench.run(argv(files, out, None, "--limit", "1")) == 0
    capsys.readouterr()
    assert mt_bench.run(argv(files, out, None, "--limit", "1", "--max-new-tokens", "7")) == 2
    assert "holds answers made with max_new_tokens=6, this command has max_new_tokens=7" in capsys.readouterr().err


def test_base_relocates_the_adapter_base(files, tmp_path, capsys):
    """``--base DIR``: the adapter's base model from DIR (it moved), as in every command."""
    import shutil

    moved = tmp_path / "moved-base"
    shutil.copytree(files["base"], moved)
    out = tmp_path / "out"
    assert mt_bench.run(argv(files, out, None, "--limit", "1", "--base", str(tmp_path / "gone"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "gone") in err, err  # the base it was told, not the recorded one
    assert mt_bench.run(argv(files, out, None, "--limit", "1", "--base", str(moved))) == 0
    with open(out / "run.json") as f:
        assert json.load(f)["base"] == str(moved)
    assert len(read_rows(out / "answers.jsonl")) == 1
