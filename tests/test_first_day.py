"""What a new user trips over on the first day (issue 13): one line and exit 2 instead of a
traceback, nothing dropped or hidden, Hugging Face conventions, files colleagues can read.

Training runs in this process (``tensorft.train.main``) on a 2-layer Llama with SmolLM2's
tokenizer; each run is a couple of steps.
"""

import json
import os
import shutil
import signal
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

import tensorft
from conftest import save_tiny_chat_llama
from tensorft.errors import TensorftError
from tensorft.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the evaluation package lives at the repository root

WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "brown"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("first_day")
    save_tiny_chat_llama(work / "tiny")
    _jsonl(work / "alpaca.jsonl", [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"} for w in WORDS])
    model = AutoModelForCausalLM.from_pretrained(work / "tiny")
    tensorft.attach(model, {"kind": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]})
    tensorft.save(model, str(work / "adapter"))
    return work


def write_config(work, name, **sections):
    cfg = {
        "model": {"name_or_path": str(work / "tiny")},
        "adapter": {"kind": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        "data": {"train": str(work / "alpaca.jsonl"), "format": "alpaca"},
        "train": {"output_dir": str(work / name), "max_steps": 2, "batch_size": 4, "lr": 0.01,
                  "logging_steps": 1, "save_steps": 100, "max_length": 64},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_error_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err, err
    assert last.startswith("tensorft: error: "), err
    for part in parts:
        assert part in last, last
    return last


# --------------------------------------------------------------------------- errors: one line, exit 2


def test_mistyped_model_path_is_one_line_naming_the_key_and_path(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    config = write_config(work, "smoll")
    assert train_main(["--config", config, "--set", "model.name_or_path=models/smoll"]) == 2
    one_error_line(capsys, "model.name_or_path", os.path.join(str(work), "models", "smoll"))
    assert not (work / "smoll").exists()


def test_no_row_fits_max_length_is_one_line_and_nothing_written(work, capsys):
    config = write_config(work, "too-short", train={"max_length": 8})  # the Alpaca template alone is longer
    assert train_main(["--config", config]) == 2
    one_error_line(capsys, "train.max_length: 8", "no row of data.train fits", "all 8 rows")
    assert not (work / "too-short").exists()  # no config.yaml, checkpoints/ or tensorboard/


def test_messages_without_chat_template_refused_before_the_model_loads(work, capsys, monkeypatch):
    plain = work / "no-template"
    if not plain.exists():
        shutil.copytree(work / "tiny", plain)
        for name in os.listdir(plain):
            if name.endswith(".jinja"):
                os.remove(plain / name)
        tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
        tok_cfg.pop("chat_template", None)
        (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    _jsonl(work / "messages.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]} for w in WORDS
    ])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tensorft.loading.load_base_model", no_model)
    config = write_config(work, "chat", model={"name_or_path": str(plain)},
                          data={"train": str(work / "messages.jsonl"), "format": "messages"})
    assert train_main(["--config", config]) == 2
    one_error_line(capsys, "data.format: messages", "no chat template")
    assert not (work / "chat").exists()


def test_ddp_under_plain_python_is_refused(work, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    config = write_config(work, "ddp-plain", distributed={"strategy": "ddp"})
    assert train_main(["--config", config]) == 2
    one_error_line(capsys, "distributed.strategy: ddp needs a distributed launch", "torchrun")
    assert not (work / "ddp-plain").exists()


def test_refused_rerun_leaves_the_partial_run_untouched(work, capsys):
    """A run killed after its last checkpoint, rerun with another adapter rank: refused with
    nothing overwritten; rerun with its own config: resumed."""
    out = work / "partial"
    config = write_config(work, "partial", train={"save_steps": 2})
    assert train_main(["--config", config]) == 0
    for name in ("FINISHED", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    saved = (out / "config.yaml").read_text()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    other = write_config(work, "partial-rank4", adapter={"rank": 4}, train={"save_steps": 2, "output_dir": str(out)})
    assert train_main(["--config", other, "--set", "train.seed=3"]) == 2
    one_error_line(capsys, "holds an unfinished run of another config", "adapter.rank: 2 there, 4 now",
                   "train.seed: 42 there, 3 now")  # every differing key is named
    assert (out / "config.yaml").read_text() == saved
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert train_main(["--config", config, "--set", "adapter.rank=2"]) == 0  # the same config (an unchanged --set) resumes
    assert "resuming from" in capsys.readouterr().err and (out / "FINISHED").exists()


# --------------------------------------------------------------------------- nothing dropped or hidden


def test_long_rows_are_reported_and_eval_runs_at_the_end(work, capsys):
    long_prompt = " ".join(WORDS * 12)  # ~100 tokens: the prompt alone fills max_length
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"} for w in WORDS[:5]]
    rows += [{"instruction": long_prompt, "input": "", "output": "red"}] * 2  # dropped
    rows += [{"instruction": "Say it.", "input": "", "output": long_prompt}]  # truncated, kept
    _jsonl(work / "long.jsonl", rows)
    config = write_config(work, "long", data={"train": str(work / "long.jsonl"), "eval": str(work / "alpaca.jsonl")})
    assert train_main(["--config", config]) == 0
    err = capsys.readouterr().err
    assert "train.max_length 64: 3 of 8 training rows are longer and were truncated; 2 of them were dropped" in err
    assert "evaluation at the end of training: eval_loss" in err
    rows = [json.loads(line) for line in open(work / "long" / "metrics.jsonl")]
    evaluation = [r for r in rows if "eval_loss" in r]
    assert len(evaluation) == 1 and evaluation[0]["step"] == 2, rows


def test_long_pairs_are_reported_for_dpo(work, capsys):
    long_text = " ".join(WORDS * 12)
    pairs = [{"prompt": f"Colour {w}?", "chosen": f" {w}", "rejected": " none"} for w in WORDS[:6]]
    pairs += [{"prompt": long_text, "chosen": " red", "rejected": " blue"}]  # dropped: the prompt fills it
    pairs += [{"prompt": "Say it.", "chosen": long_text, "rejected": " no"}]  # truncated by the collator
    _jsonl(work / "pairs.jsonl", pairs)
    config = write_config(work, "dpo-long", data={"train": str(work / "pairs.jsonl"), "format": "preference"},
                          train={"objective": "dpo", "max_steps": 1})
    assert train_main(["--config", config]) == 0
    assert "train.max_length 64: 2 of 8 training rows are longer and were truncated; 1 of them were dropped" in (
        capsys.readouterr().err)


def _send_sigint_at_first_log(monkeypatch, times):
    from tensorft import trainers

    real = trainers.MetricsCallback.on_log
    sent = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not sent:
            sent.append(True)
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, args, state, control, logs=logs, **kwargs)

    monkeypatch.setattr(trainers.MetricsCallback, "on_log", on_log)


@pytest.fixture
def ctrl_c_reaches_python():
    """Python's own Ctrl-C handler, as in a terminal (a background job starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_like_sigterm(work, capsys, monkeypatch, ctrl_c_reaches_python):
    from tensorft.trainers import complete_checkpoints

    _send_sigint_at_first_log(monkeypatch, times=1)
    config = write_config(work, "ctrl-c", train={"max_steps": 50})
    assert train_main(["--config", config]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ours = [line for line in err.splitlines() if line.startswith("tensorft:")]
    assert ours[-1].startswith("tensorft: stopped by SIGINT; checkpoint written to"), err
    done = complete_checkpoints(str(work / "ctrl-c" / "checkpoints"))
    assert [os.path.basename(d) for d in done] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's Ctrl-C is back


def test_second_ctrl_c_stops_at_once(work, capsys, monkeypatch, ctrl_c_reaches_python):
    _send_sigint_at_first_log(monkeypatch, times=2)
    config = write_config(work, "ctrl-c-twice", train={"max_steps": 50})
    assert train_main(["--config", config]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("tensorft:")]  # tqdm may close its bar after
    assert ours[-1] == "tensorft: interrupted; no checkpoint written by this interruption", err
    assert not os.path.exists(work / "ctrl-c-twice" / "checkpoints" / "checkpoint-2")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored_while_training(ctrl_c_reaches_python):
    from tensorft.trainers import CheckpointOnSignal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with `&` from a script
    previous_term = signal.getsignal(signal.SIGTERM)
    watcher = CheckpointOnSignal()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == watcher._handle  # preemption still checkpoints
    watcher.restore()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == previous_term


# --------------------------------------------------------------------------- the Python API


def test_save_into_a_file_is_a_tensorft_error(work, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tensorft.attach(AutoModelForCausalLM.from_pretrained(work / "tiny"),
                            {"kind": "lora", "rank": 2, "targets": ["q_proj"]})
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(TensorftError, match="exists and is not a directory"):
        tensorft.save(model, str(target))


def test_from_pretrained_takes_hugging_face_dtype_and_device_map(work, monkeypatch):
    import transformers

    adapter = str(work / "adapter")
    real, seen = transformers.AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):  # what reaches Hugging Face
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}, {"dtype": "bfloat16"}):
        model = tensorft.from_pretrained(adapter, **kwargs)
        own = set(tensorft.adapter_parameters(model))  # the adapter keeps its own dtype
        assert {p.dtype for n, p in model.named_parameters() if n not in own} == {torch.bfloat16}, kwargs
    assert tensorft.from_pretrained(adapter, dtype="auto").dtype == torch.float32  # as saved
    assert "torch_dtype" not in seen[1] and seen[1]["dtype"] == torch.bfloat16  # not lost beside dtype
    tensorft.from_pretrained(adapter, device_map={"": "cpu"})
    assert seen[-1]["device_map"] == {"": "cpu"}
    with pytest.raises(TensorftError, match="disagree"):
        tensorft.from_pretrained(adapter, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_written_files_respect_the_umask(work, tmp_path):
    from tensorft.saving import new_output_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(str(tmp_path / "report.md"), "x")
        with new_output_dir(str(tmp_path / "merged")) as tmp:
            write_text(os.path.join(tmp, "config.json"), "{}")
        os.umask(0o077)
        write_text(str(tmp_path / "private.md"), "x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "report.md") == 0o644
    assert mode(tmp_path / "merged") == 0o755 and mode(tmp_path / "merged" / "config.json") == 0o644
    assert mode(tmp_path / "private.md") == 0o600


# --------------------------------------------------------------------------- command lines


def test_tensorft_without_arguments_prints_usage_and_has_a_version(capsys):
    from tensorft.cli import run

    assert run([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: tensorft") and "merge" in out and "export-peft" in out
    with pytest.raises(SystemExit) as e:
        run(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tensorft {tensorft.__version__}"
    for command in ("merge", "export-peft"):
        with pytest.raises(SystemExit):
            run([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "adapter_dir a tensorft adapter directory" in text and "out_dir where the" in text, text


def test_config_headers_name_their_own_config_and_script():
    configs = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(configs)):
        if not name.endswith(".yaml"):
            continue
        header = []
        for line in open(os.path.join(configs, name)):
            if not line.startswith("#"):
                break
            header.append(line)
        for line in header:
            for word in line.split():
                if word.startswith("configs/") and word.endswith(".yaml") and "--config" in line:
                    assert word == f"configs/{name}", (name, line)
                if word.startswith("slurm/") and word.endswith(".sh") and "sbatch" in line:
                    assert os.path.isfile(os.path.join(ROOT, word)), (name, line)
                    script = open(os.path.join(ROOT, word)).read()
                    default = f"CONFIG=${{CONFIG:-configs/{name}}}"
                    assert default in script or f"CONFIG=configs/{name}" in line, (name, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_lm_eval_wrapper_on_cpu_and_its_errors(work, tmp_path, capsys):
    from evaluation import lm_eval as wrapper

    rows = [{"sentence": "a warm and funny delight", "label": 1, "idx": 0}, {"sentence": "dull", "label": 0, "idx": 1}]
    for split in ("train", "validation"):
        os.makedirs(tmp_path / "data" / "glue" / "sst2", exist_ok=True)
        _jsonl(tmp_path / "data" / "glue" / "sst2" / f"{split}.jsonl", rows)
    base = ["--adapter", str(work / "adapter"), "-o", str(tmp_path / "out")]
    local = ["--include_path", os.path.join(ROOT, "evaluation", "tasks"), "--tasks", "sst2_local",
             "--metadata", json.dumps({"data_dir": str(tmp_path / "data")})]
    assert wrapper.main(base + local) == 0, capsys.readouterr().err[-3000:]  # lm-eval alone would pick cuda:0
    capsys.readouterr()
    assert wrapper.main(base + local + ["--device", "cuda"]) == 2
    one_error_line(capsys, "--device cuda: CUDA is not available")
    assert wrapper.main(base + ["--tasks", "sst2"]) == 2  # GLUE from the hub, offline
    one_error_line(capsys, "nyu-mll/glue")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_mt_bench_device_cuda_without_cuda_is_one_line(work, tmp_path, capsys):
    from evaluation import mt_bench

    out = tmp_path / "mtb"
    assert mt_bench.run(["--adapter", str(work / "adapter"), "--device", "cuda", "--out", str(out)]) == 2
    one_error_line(capsys, "--device cuda: CUDA is not available on this machine")
    assert not out.exists()


# --------------------------------------------------------------------------- the MT-Bench judge's key


def test_judge_url_must_be_https_unless_loopback(monkeypatch):
    from evaluation import judges

    for url in ("https://api.example.com/v1", "http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:8/v1"):
        judges.check_base_url(url)
    for url in ("http://api.example.com/v1", "http://10.0.0.5/v1"):
        with pytest.raises(TensorftError, match="plain http"):
            judges.check_base_url(url)
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    with pytest.raises(TensorftError, match="plain http"):
        judges.make_judge("openai:gpt-4", base_url="http://api.example.com/v1", key_env="JUDGE_KEY")


def test_judge_never_sends_the_key_across_a_redirect(monkeypatch):
    from evaluation import judges

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            if self.path.startswith("/v1/"):  # urllib follows a 302 of a POST as a GET, headers and all
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = json.dumps({"choices": [{"message": {"content": "[[5]]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        judge = judges.OpenAIJudge("m", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="sk-secret")
        judge.check_access()  # GET /v1/models: redirected, not followed
        with pytest.raises(judges.JudgeFatalError, match="redirect .* not followed"):
            judge.complete([{"role": "user", "content": "hi"}])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [(method, path) for method, path, _ in seen] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
