"""lm-eval integration: the standard path (export-peft / merge, then ``--model hf``) and the
native wrapper (``python -m evaluation.lm_eval``) score alike; the wrapper evaluates a kind that
cannot be exported and passes task ids; local GLUE-style and converted BIG-bench tasks; rank
classification checked by hand; bad input.

lm-eval runs in this process through its own command-line entry point (each run re-indexes
lm-eval's tasks, ~5 s); the model is a 2-layer Llama with SmolLM2's tokenizer.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import tensorft
from conftest import randomize_adapters, save_tiny_chat_llama
from tensorft.adapters.base import AdapterKind, SiteAdapter
from tensorft.cli import run as tensorft_cli
from tensorft.errors import TensorftError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "evaluation", "tasks")
sys.path.insert(0, ROOT)  # evaluation/: the checkout's names of tensorft.evaluation (shims; tasks/ links there)

from evaluation import bigbench_to_bbh, lm_eval as wrapper  # noqa: E402
from evaluation.rank_classification import continuation_token_counts, rank_classify  # noqa: E402

SST2 = [
    ("a gripping , beautifully acted film", 1), ("dull , tedious and far too long", 0),
    ("a warm and funny delight", 1), ("a mess from start to finish", 0),
    ("i loved every minute of it", 1), ("boring , lifeless and forgettable", 0),
    ("one of the best films of the year", 1), ("a waste of a good cast", 0),
]


# --------------------------------------------------------------------------- a test-only kind


class TaskLoraSite(SiteAdapter):
    """One LoRA pair per task, picked by the task ids in the adapter state."""

    def __init__(self, site, rank, scale, tasks):
        super().__init__(site)
        self.scale = scale
        self.A = nn.Parameter(torch.zeros(tasks, rank, site.in_features))
        self.B = nn.Parameter(torch.zeros(tasks, site.out_features, rank))

    def forward(self, x, state):
        if state.task_ids is None:
            raise TensorftError("test_task_lora: no task ids (pass task_id)")
        ids = state.task_ids.to(x.device)
        h = torch.einsum("bsi,bri->bsr", x.float(), self.A[ids])
        return torch.einsum("bsr,bor->bso", h, self.B[ids]) * self.scale


@tensorft.register_adapter("test_task_lora")
class TaskLora(AdapterKind):
    """A task-routed kind, as the coming ones will be: neither mergeable nor exportable."""

    mergeable = False
    exportable = False
    why_not_mergeable = "its update depends on the task id"
    TASKS = 2

    def build_site(self, site, shared):
        return TaskLoraSite(site, self.config.rank, self.scale, self.TASKS)

    def parameter_count(self, sites):
        return sum(self.TASKS * self.config.rank * (s.in_features + s.out_features) for s in sites)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On shared cores, two OpenMP threads stall each other while other processes run (measured
    # here: 25 s against 1 s per SmolLM2 training step); one thread is never far from the best.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from transformers import LlamaForCausalLM

    work = tmp_path_factory.mktemp("lm_eval")
    base = save_tiny_chat_llama(work / "tiny")
    for kind, name in (("cp", "cp"), ("test_task_lora", "routed")):
        model = LlamaForCausalLM.from_pretrained(base)
        tensorft.attach(model, {"kind": kind, "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]})
        randomize_adapters(model, seed=1, scale=0.5)
        tensorft.save(model, str(work / name))
    rows = [{"sentence": s, "label": l, "idx": i} for i, (s, l) in enumerate(SST2)]
    _jsonl(str(work / "data" / "glue" / "sst2" / "train.jsonl"), rows)
    _jsonl(str(work / "data" / "glue" / "sst2" / "validation.jsonl"), rows)
    return work


def lm_eval_cli(monkeypatch, *argv):
    """lm-eval's own command line, in this process."""
    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setattr(sys, "argv", ["lm-eval", "run", *argv])
    cli_evaluate()


def common(work, out, tasks="sst2_local", include=TASKS):
    return ["--tasks", tasks, "--include_path", include, "--metadata", json.dumps({"data_dir": str(work / "data")}),
            "--output_path", str(out), "--device", "cpu", "--batch_size", "4", "--log_samples"]


def outputs(out):
    """(results dict, {task: samples}) of the one run written under ``out``."""
    (folder,) = [os.path.join(out, d) for d in os.listdir(out)]
    (results_file,) = [f for f in os.listdir(folder) if f.startswith("results_") and f.endswith(".json")]
    with open(os.path.join(folder, results_file)) as f:
        results = json.load(f)
    samples = {}
    for name in os.listdir(folder):
        if name.startswith("samples_"):
            task = name[len("samples_"):].rsplit("_", 1)[0]
            with open(os.path.join(folder, name)) as f:
                samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return results, samples, os.path.join(folder, results_file)


def loglikelihoods(samples):
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)


@pytest.fixture(scope="module")
def sst2_runs(work, tmp_path_factory):
    """sst2 on local files: base model; cp adapter via PEFT export, via merge, via the wrapper."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("runs")
    try:
        assert tensorft_cli(["export-peft", str(work / "cp"), str(out / "peft")]) == 0
        assert tensorft_cli(["merge", str(work / "cp"), str(out / "merged")]) == 0
        lm_eval_cli(mp, "--model", "hf", "--model_args", f"pretrained={work / 'tiny'},peft={out / 'peft'}",
                    *common(work, out / "hf_peft"))
        lm_eval_cli(mp, "--model", "hf", "--model_args", f"pretrained={out / 'merged'}", *common(work, out / "hf_merged"))
        lm_eval_cli(mp, "--model", "hf", "--model_args", f"pretrained={work / 'tiny'}", *common(work, out / "base"))
        assert wrapper.main(["--adapter", str(work / "cp"), *common(work, out / "wrapper")]) == 0
    finally:
        mp.undo()
    return {name: outputs(out / name) for name in ("hf_peft", "hf_merged", "base", "wrapper")}


# --------------------------------------------------------------------------- both paths


def test_export_merge_and_wrapper_score_identically(sst2_runs, work):
    lls = {name: loglikelihoods(samples["sst2"]) for name, (_, samples, _) in sst2_runs.items()}
    torch.testing.assert_close(lls["wrapper"], lls["hf_peft"], rtol=0, atol=1e-4)
    torch.testing.assert_close(lls["wrapper"], lls["hf_merged"], rtol=0, atol=1e-4)
    assert (lls["wrapper"] - lls["base"]).abs().max() > 1e-2  # the adapter really is applied
    scores = {name: results["results"]["sst2"] for name, (results, _, _) in sst2_runs.items()}
    for metric in ("acc,none", "acc_norm_tok,none"):
        assert scores["wrapper"][metric] == scores["hf_peft"][metric] == scores["hf_merged"][metric]
    assert len(sst2_runs["wrapper"][1]["sst2"]) == len(SST2)  # the local files, all of them

    results, _, results_file = sst2_runs["wrapper"]
    info = results["config"]["tensorft"]
    assert (info["kind"], info["rank"], info["task_id"]) == ("cp", 4, None)
    model = tensorft.from_pretrained(str(work / "cp"))
    assert info["trainable_parameters"] == tensorft.count_parameters(model)
    table = open(results_file[: -len(".json")] + ".md").read()
    assert "kind cp, rank 4" in table and "acc_norm_tok" in table and "sst2" in table


def test_rank_classification_by_hand(sst2_runs):
    from transformers import AutoTokenizer

    from scripts.demo_assets import smollm2_135m_instruct

    tok = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    # lm-eval moves the context's trailing space to the continuation, then counts what the
    # continuation adds to the encoding of the context.
    context = "Q: Is the sky blue?\nA: "
    whole = len(tok.encode("Q: Is the sky blue?\nA: absolutely not", add_special_tokens=False))
    head = len(tok.encode("Q: Is the sky blue?\nA:", add_special_tokens=False))
    assert continuation_token_counts(tok, context, ["absolutely not"]) == [whole - head]
    # per token -1.2 > -4/3 picks choice 0; per character (4 vs 15 chars) would pick choice 1
    lls, counts = [-1.2, -4.0], [1, 3]
    assert rank_classify(lls, counts) == 0
    assert max(range(2), key=lambda i: lls[i] / [4, 15][i]) == 1

    # lm-eval's acc_norm_tok on the sst2 run, document by document, against the same rule
    _, samples, _ = sst2_runs["wrapper"]
    for s in samples["sst2"]:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        n = [continuation_token_counts(tok, c, [x])[0] for c, x in pairs]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert s["acc_norm_tok"] == float(rank_classify(lls, n) == s["doc"]["label"])


# --------------------------------------------------------------------------- non-exportable, task ids


def test_wrapper_evaluates_a_kind_that_cannot_be_exported(work, tmp_path, monkeypatch, capsys, sst2_runs):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    routed = str(work / "routed")
    assert tensorft_cli(["export-peft", routed, str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tensorft: error: adapter kind 'test_task_lora' cannot be exported") and "\n" not in err
    assert not (tmp_path / "peft").exists()

    assert wrapper.main(["--adapter", routed, "--task-id", "1", *common(work, tmp_path / "task1")]) == 0
    results1, samples1, _ = outputs(tmp_path / "task1")
    assert results1["config"]["tensorft"]["task_id"] == 1 and results1["config"]["tensorft"]["kind"] == "test_task_lora"

    # task 0 through the Python API: the same model class, given to lm-eval as an object
    lm = wrapper.TensorftLM(adapter=routed, task_id=0, batch_size=4)
    tm = TaskManager(include_path=TASKS, metadata={"data_dir": str(work / "data"), "pretrained": routed})
    results0 = simple_evaluate(model=lm, tasks=["sst2_local"], task_manager=tm, log_samples=True)
    lls0 = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in
                         sorted(results0["samples"]["sst2"], key=lambda s: s["doc_id"])], dtype=torch.float64)
    lls1 = loglikelihoods(samples1["sst2"])
    base = loglikelihoods(sst2_runs["base"][1]["sst2"])
    assert (lls0 - lls1).abs().max() > 1e-2  # the id reaches the adapter
    assert (lls0 - base).abs().max() > 1e-2 and (lls1 - base).abs().max() > 1e-2


# --------------------------------------------------------------------------- BIG-bench -> BBH


def _bigbench(root):
    """BIG-bench-style task.json files (the sdist's layout) for four BBH tasks."""
    tasks = {
        "sports_understanding": {
            "task_prefix": "Determine whether the following statement or statements are plausible or implausible:",
            "examples": [{"input": "Lionel Messi scored a penalty kick", "target_scores": {"plausible": 1, "implausible": 0}},
                         {"input": "Tom Brady hit a home run in the Stanley Cup", "target_scores": {"plausible": 0, "implausible": 1}}],
        },
        "hyperbaton": {
            "examples": [{"input": 'Which sentence has the correct adjective order: a " old red wooden ship " b " wooden red old ship " ?',
                          "target_scores": {"a": 1, "b": 0}},
                         {"input": 'Which sentence has the correct adjective order: a " plastic big cup " b " big plastic cup " ?',
                          "target_scores": {"a": 0, "b": 1}}],
        },
        "date_understanding": {
            "examples": [{"input": "Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?",
                          "multiple_choice_targets": ["05/01/2021", "04/29/2021", "05/02/2021"],
                          "multiple_choice_scores": [1, 0, 0]}],
        },
        "object_counting": {
            "examples": [{"input": "I have a flute, a piano and two drums. How many musical instruments do I have?",
                          "target": ["four", "4"]}],
        },
    }
    for name, task in tasks.items():
        _write_json(os.path.join(root, "bigbench", "benchmark_tasks", name, "task.json"), task)
    return tasks


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_bigbench_converted_to_bbh_runs_locally(work, tmp_path, capsys):
    _bigbench(tmp_path / "sdist")
    data, tasks_dir = tmp_path / "bbh_data", tmp_path / "bbh_tasks"
    argv = ["--bigbench", str(tmp_path / "sdist"), "--out", str(data), "--tasks-dir", str(tasks_dir)]
    assert bigbench_to_bbh.main(argv) == 0
    rows = {n: [json.loads(l) for l in open(data / f"{n}.jsonl")] for n in
            ("sports_understanding", "hyperbaton", "date_understanding", "object_counting")}
    assert rows["sports_understanding"][1] == {
        "input": 'Is the following sentence plausible? "Tom Brady hit a home run in the Stanley Cup."',
        "target": "no", "choices": ["yes", "no"], "label": 1}
    assert rows["hyperbaton"][1] == {
        "input": "Which sentence has the correct adjective order:\nOptions:\n(A) plastic big cup\n(B) big plastic cup",
        "target": "(B)", "choices": ["plastic big cup", "big plastic cup"], "label": 1}
    assert rows["date_understanding"][0]["input"].endswith("MM/DD/YYYY?\nOptions:\n(A) 05/01/2021\n(B) 04/29/2021\n(C) 05/02/2021")
    assert rows["date_understanding"][0]["target"] == "(A)"
    assert rows["object_counting"] == [{"input": "I have a flute, a piano and two drums. How many musical instruments do I have?",
                                        "target": "4"}]
    assert {"bbh_zeroshot_local.yaml", "bbh_rc_local.yaml", "bbh_rc_hyperbaton.yaml", "_tensorft.py"} <= set(os.listdir(tasks_dir))
    assert not (tasks_dir / "bbh_rc_object_counting.yaml").exists()  # free-form: no choices to rank

    # the generated YAMLs: lm-eval's BBH zero-shot tasks and rank classification, on the local files
    out = tmp_path / "out"
    assert wrapper.main(["--adapter", str(work / "cp"), *common(work, out, "bbh_zeroshot_local,bbh_rc_local", str(tasks_dir)),
                         "--gen_kwargs", "max_gen_toks=4"]) == 0
    results, samples, _ = outputs(out)
    assert results["results"]["bbh_zeroshot_sports_understanding"]["sample_len"] == 2
    assert "exact_match,flexible-extract" in results["results"]["bbh_zeroshot_hyperbaton"]
    assert "exact_match,flexible-extract" in results["groups"]["bbh_zeroshot_local"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work / "tiny"))
    for task in ("bbh_rc_hyperbaton", "bbh_rc_date_understanding", "bbh_rc_sports_understanding"):
        for s in samples[task]:
            pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            assert pairs[0][0].startswith("Q: ") and pairs[0][0].endswith("\nA:")
            n = [continuation_token_counts(tok, c, [x])[0] for c, x in pairs]
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert s["acc_norm_tok"] == float(rank_classify(lls, n) == s["doc"]["label"])
        assert results["results"][task]["acc_norm_tok,none"] == pytest.approx(
            sum(s["acc_norm_tok"] for s in samples[task]) / len(samples[task]))


def test_bigbench_converter_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--bigbench", str(tmp_path / "missing")], "neither a folder nor a .tar.gz"),
        (["--bigbench", str(tmp_path), "--tasks", "boolean_expressions"], "Python-generated"),
        (["--bigbench", str(tmp_path), "--tasks", "nope"], "unknown BBH subtask 'nope'"),
    ]
    _write_json(str(tmp_path / "hyperbaton" / "task.json"), {"examples": [{"input": "x", "target_scores": {"a": 1}},
                                                                          {"target_scores": {"a": 1}}]})
    cases.append((["--bigbench", str(tmp_path)], "example 1: an example without an 'input' string"))
    for argv, message in cases:
        assert bigbench_to_bbh.main([*argv, "--out", str(out), "--tasks-dir", str(out / "tasks")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tensorft: error: ") and message in err and "\n" not in err, err
        assert not out.exists()


# --------------------------------------------------------------------------- wrapper bad input


def test_wrapper_bad_input(work, tmp_path, capsys):
    cp = str(work / "cp")
    cases = [
        (["--adapter", str(tmp_path), "--tasks", "x", "-o", str(tmp_path / "o")], "no adapter_config.json here"),
        (["--adapter", cp, "--tasks", "x"], "--output_path is required"),
        (["--adapter", cp, "--model", "hf", "--tasks", "x", "-o", str(tmp_path / "o")], "--model is set by this wrapper"),
        (["--adapter", cp, "--task-id", "-1", "--tasks", "x", "-o", str(tmp_path / "o")], "--task-id must be >= 0"),
        (["--tasks", "x"], "the following arguments are required: --adapter"),
    ]
    for argv, message in cases:
        assert wrapper.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tensorft: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()
    # as users run it: one line, no traceback
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.lm_eval", "--adapter", str(tmp_path / "none"),
                           "--tasks", "sst2_local", "-o", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("tensorft: error: ") and "no adapter_config.json" in proc.stderr


# --------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_smollm2_with_and_without_a_trained_cp_adapter(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct on a local sst2-format task, before and after training a CP adapter."""
    from transformers import AutoTokenizer

    from tensorft.config import ModelConfig
    from tensorft.loading import load_base_model
    from scripts.demo_assets import smollm2_135m_instruct

    smollm = smollm2_135m_instruct()
    tok = AutoTokenizer.from_pretrained(smollm)
    good = ["wonderful", "delightful", "moving", "brilliant", "charming", "superb", "touching", "gripping",
            "hilarious", "stunning", "joyful", "masterful"]
    bad = ["boring", "dreadful", "tedious", "clumsy", "lifeless", "awful", "painful", "shallow",
           "pointless", "dull", "irritating", "sloppy"]
    frames = ["the film is {}", "a {} story from start to finish", "{} acting and a {} script",
              "i found it {}", "simply {}", "what a {} movie"]

    def rows(words, label, frame_ids):
        return [{"sentence": frames[f].format(w, w), "label": label} for w in words for f in frame_ids]

    train = rows(good[:8], 1, [0, 1, 2]) + rows(bad[:8], 0, [0, 1, 2])
    test = rows(good[8:], 1, [3, 4, 5]) + rows(bad[8:], 0, [3, 4, 5])  # unseen words and frames
    data = tmp_path / "data"
    _jsonl(str(data / "glue" / "sst2" / "train.jsonl"), [dict(r, idx=i) for i, r in enumerate(train)])
    _jsonl(str(data / "glue" / "sst2" / "validation.jsonl"), [dict(r, idx=i) for i, r in enumerate(test)])

    # train: cross-entropy of the answer word after lm-eval's sst2 prompt
    model = load_base_model(ModelConfig(name_or_path=smollm))
    tensorft.attach(model, {"kind": "cp", "rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    opt = torch.optim.AdamW(tensorft.adapter_parameters(model).values(), lr=5e-3)
    prompt = "{}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    answer = {1: tok.encode(" positive")[0], 0: tok.encode(" negative")[0]}
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(16):
        batch = [train[i] for i in torch.randint(len(train), (8,), generator=g).tolist()]
        enc = [tok.encode(prompt.format(r["sentence"])) for r in batch]
        ids = torch.full((len(enc), max(map(len, enc))), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(enc)), mask.sum(1) - 1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([answer[r["label"]] for r in batch]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    tensorft.save(model, str(tmp_path / "cp"))

    args = ["--tasks", "sst2_local", "--include_path", TASKS, "--metadata", json.dumps({"data_dir": str(data)}),
            "--device", "cpu", "--batch_size", "8"]
    lm_eval_cli(monkeypatch, "--model", "hf", "--model_args", f"pretrained={smollm}", *args, "--output_path", str(tmp_path / "base"))
    assert wrapper.main(["--adapter", str(tmp_path / "cp"), *args, "--output_path", str(tmp_path / "cp_eval")]) == 0
    base = outputs(tmp_path / "base")[0]["results"]["sst2"]
    tuned = outputs(tmp_path / "cp_eval")[0]["results"]["sst2"]
    print(f"\nSmolLM2-135M local sst2 ({len(test)} sentences): base acc {base['acc,none']:.3f} "
          f"acc_norm_tok {base['acc_norm_tok,none']:.3f}; with cp r=8 adapter acc {tuned['acc,none']:.3f} "
          f"acc_norm_tok {tuned['acc_norm_tok,none']:.3f}")
    assert tuned["acc,none"] >= 0.85
    assert tuned["acc,none"] > base["acc,none"]
