"""Conventions a user relies on without reading the code (issue 13): tied embeddings survive
merge and export, ``tensorft merge`` writes what the README says, attach leaves the global RNGs
alone, one place for the seed and for precision, one rule for relative paths, and the core
imports no training code.
"""

import os
import subprocess
import sys

import pytest
import torch
import yaml

import tensorft
from conftest import randomize_adapters, tokens
from tensorft.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tied_llama(seed=0):
    """A 2-layer Llama whose lm_head is the embedding (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- tied embeddings


def test_merging_an_adapted_lm_head_of_a_tied_model_leaves_the_embedding(tmp_path):
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    tied_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    tensorft.attach(model, {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj", "lm_head"]})
    randomize_adapters(model, scale=0.3)
    ids = tokens()
    adapted = logits(model, ids)
    tensorft.export_peft(model, str(tmp_path / "peft"))  # PEFT adapts lm_head's output only, as tensorft
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model.eval(), ids), adapted, atol=1e-5, rtol=1e-4)
    tensorft.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input side is the base's
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)
    tensorft.unmerge(model)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-4)

    tensorft.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not again.config.tie_word_embeddings
    assert torch.equal(again.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(logits(again, ids), adapted, atol=1e-5, rtol=1e-4)


def _train_a_bit(model, ids, steps=2):
    opt = torch.optim.SGD([p for p in tensorft.trainable_parameters(model).values()], lr=0.5)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_lm_head_saved_whole_on_a_tied_model_survives_save_merge_and_peft_export(tmp_path):
    from peft import PeftModel

    from transformers import AutoModelForCausalLM

    tied_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    tensorft.attach(model, {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"],
                            "modules_to_save": ["lm_head"]})
    saved = tensorft.adapter_parameters(model)
    assert "lm_head.weight" in saved and "model.embed_tokens.weight" not in saved
    ids = tokens()
    model.train()
    _train_a_bit(model, ids)
    model.eval()
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # training the head left the input alone
    assert not torch.equal(model.lm_head.weight, embedding)
    native = logits(model, ids)

    tensorft.save(model, str(tmp_path / "adapter"))
    reloaded = tensorft.from_pretrained(str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(reloaded, ids), native)

    tensorft.export_peft(model, str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, ids), native, atol=1e-5, rtol=1e-4)

    from tensorft.export import merge_to_dir

    merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(merged.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(logits(merged, ids), native, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- merge precision


def _merged_dtypes(directory) -> set:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(os.path.join(directory, "model.safetensors")).values()}


def test_merge_of_an_nf4_trained_adapter_writes_full_precision(tmp_path):
    """README: ``tensorft merge`` reloads the base in full precision (float32), whatever dtype
    the 4-bit base computed in; ``dtype=`` chooses another."""
    from tensorft.config import ModelConfig
    from tensorft.export import merge_to_dir
    from tensorft.loading import load_base_model
    from transformers import AutoModelForCausalLM

    tied_llama().save_pretrained(tmp_path / "base")
    model = load_base_model(ModelConfig(name_or_path=str(tmp_path / "base"), quantization="nf4", dtype="bfloat16"))
    tensorft.attach(model, {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"]})
    randomize_adapters(model, scale=0.3)
    tensorft.save(model, str(tmp_path / "adapter"))
    assert merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "merged")) == str(tmp_path / "merged")
    assert _merged_dtypes(tmp_path / "merged") == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").dtype == torch.float32
    merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "merged-bf16"), dtype=torch.bfloat16)
    assert _merged_dtypes(tmp_path / "merged-bf16") == {torch.bfloat16}


# --------------------------------------------------------------------------- DeepSpeed's CPU notice


def _python(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd or ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def chat_work(tmp_path_factory):
    """A tiny chat Llama (SmolLM2's tokenizer), a few alpaca rows and a saved adapter."""
    import json

    from conftest import save_tiny_chat_llama
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("conventions")
    save_tiny_chat_llama(work / "tiny")
    with open(work / "alpaca.jsonl", "w") as f:
        for w in ["red", "green", "blue", "black"]:
            f.write(json.dumps({"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"}) + "\n")
    model = AutoModelForCausalLM.from_pretrained(work / "tiny")
    tensorft.attach(model, {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"]})
    tensorft.save(model, str(work / "adapter"))
    return work


def chat_config(work, name, **sections) -> str:
    cfg = {
        "model": {"name_or_path": str(work / "tiny")},
        "adapter": {"kind": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        "data": {"train": str(work / "alpaca.jsonl"), "format": "alpaca"},
        "train": {"output_dir": str(work / name), "max_steps": 1, "batch_size": 2, "lr": 0.01,
                  "logging_steps": 1, "save_steps": 100, "max_length": 64},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed prints the notice only on a machine without a GPU")
def test_single_process_run_and_merge_do_not_print_deepspeed_cpu_notice(chat_work):
    run = _python(
        "import sys; from tensorft.train import main; "
        f"sys.exit(main(['--config', {chat_config(chat_work, 'quiet-run')!r}]))"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "adapter written" in run.stdout
    merge = _python(f"from tensorft.cli import run; import sys; sys.exit(run(['merge', "
                    f"{str(chat_work / 'adapter')!r}, {str(chat_work / 'quiet-merged')!r}]))")
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert os.path.isfile(chat_work / "quiet-merged" / "config.json")
    for p in (run, merge):
        assert "Setting accelerator to CPU" not in p.stdout + p.stderr
    # the filter drops that line only: DeepSpeed's other warnings still reach the user
    other = _python("import deepspeed, logging; from tensorft.loading import quiet_deepspeed_cpu_notice; "
                    "quiet_deepspeed_cpu_notice(); logging.getLogger('DeepSpeed').warning('another warning')")
    assert "another warning" in other.stdout + other.stderr


# --------------------------------------------------------------------------- attach and the global RNGs


def _global_rng_states():
    import random

    import numpy as np

    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].copy()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _same_states(a, b) -> bool:
    import numpy as np

    if set(a) != set(b) or not torch.equal(a["torch"], b["torch"]) or a["python"] != b["python"]:
        return False
    if not np.array_equal(a["numpy"], b["numpy"]):
        return False
    return all(torch.equal(x, y) for x, y in zip(a.get("cuda", []), b.get("cuda", [])))


@pytest.mark.parametrize("kind", ["lora", "cp", "tt", "tensorpoly1"])
def test_attach_leaves_global_rngs_alone_and_is_deterministic(kind, monkeypatch):
    """attach draws its initialization from its own seed and touches no global generator
    (``torch.manual_seed`` would reseed every CUDA generator: recorded here even on a CPU
    machine, where that reseed is deferred and invisible)."""
    from conftest import tiny_llama

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    config = {"kind": kind, "rank": 2, "targets": ["q_proj", "v_proj"], "seed": 5}
    if kind == "tensorpoly1":
        config["n_tasks"] = 2

    def attached(seed):
        model = tiny_llama()
        torch.manual_seed(123)  # a training script's own seeding
        reseeded.clear()
        before = _global_rng_states()
        tensorft.attach(model, {**config, "seed": seed})
        assert _same_states(before, _global_rng_states())
        assert reseeded == []
        return {n: p.detach().clone() for n, p in tensorft.adapter_parameters(model).items()}

    first, again, other = attached(5), attached(5), attached(6)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


# --------------------------------------------------------------------------- layering

TRAINING_MODULES = ("tensorft.data", "tensorft.distributed", "tensorft.trainers", "tensorft.train", "trl", "deepspeed")

CORE_USE = r"""
import sys, torch
import tensorft
from tensorft import config, export, loading, model, params, registry, saving
from tensorft.config import parse_config

work = sys.argv[1]
cfg = parse_config({"model": {"name_or_path": work + "/base"},
                    "adapter": {"kind": "cp", "rank": 2, "targets": ["q_proj", "v_proj"]},
                    "data": {"train": "rows.jsonl", "format": "alpaca", "columns": {"instruction": "question"}}})
m = loading.load_base_model(cfg.model)
tensorft.attach(m, cfg.adapter)
params.parameter_table(m)
tensorft.save(m, work + "/adapter")
again = tensorft.from_pretrained(work + "/adapter")
tensorft.export_peft(again, work + "/peft")
tensorft.merge(again)
tensorft.unmerge(again)
training = %r
print("TRAINING MODULES:", sorted({name.split(".")[0] if name.startswith(("trl.", "deepspeed.")) else name
                                   for name in sys.modules if name in training or name.startswith(("trl.", "deepspeed."))}))
# transformers' save_pretrained imports deepspeed itself (accelerate's unwrap_model, whenever it
# is installed): past that call, tensorft's own training modules and trl only
export.merge_to_dir(work + "/adapter", work + "/merged")
print("AFTER MERGE:", sorted(name for name in sys.modules if name in training[:-1] or name.startswith("trl.")))
"""


def test_the_core_imports_no_training_code(tmp_path):
    """launcher -> training recipe -> core -> adapters: attach, config, save / load, merge and
    export (a fresh process, every step run) leave the training modules unimported."""
    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")  # here: save_pretrained imports deepspeed (below)
    p = subprocess.run([sys.executable, "-c", CORE_USE % (TRAINING_MODULES,), str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=str(tmp_path),
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "TRAINING MODULES: []" in p.stdout, p.stdout
    assert "AFTER MERGE: []" in p.stdout, p.stdout


# --------------------------------------------------------------------------- one seed, one precision rule

BASE_CONFIG = {
    "model": {"name_or_path": "some/model"},
    "adapter": {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"]},
    "data": {"train": "rows.jsonl", "format": "alpaca"},
}


def _config(**sections):
    from tensorft.config import parse_config

    data = {k: dict(v) for k, v in BASE_CONFIG.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


def test_train_seed_seeds_the_adapter_unless_adapter_seed_overrides_it():
    from conftest import tiny_llama

    assert _config(train={"seed": 7}).adapter.seed == 7
    assert _config().adapter.seed == _config().train.seed == 42
    assert _config(train={"seed": 7}, adapter={"seed": 3}).adapter.seed == 3
    # what training attaches is what the Python API attaches with that seed
    from_config = tensorft.attach(tiny_llama(), _config(train={"seed": 7}).adapter)
    by_hand = tensorft.attach(tiny_llama(), {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"], "seed": 7})
    a, b = tensorft.adapter_parameters(from_config), tensorft.adapter_parameters(by_hand)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the Python API without a training config: seed 0, saved as such
    plain = tensorft.attach(tiny_llama(), {"kind": "lora", "rank": 2, "targets": ["q_proj"]})
    assert plain.tensorft.config.seed == 0


@pytest.mark.parametrize("sections,message", [
    ({"model": {"dtype": "float16"}, "train": {"bf16": True}},
     "train.bf16: true computes in bfloat16, but model.dtype: float16 stores the base in float16"),
    ({"model": {"dtype": "float32"}, "train": {"bf16": True}, "distributed": {"strategy": "deepspeed"}},
     "train.bf16: DeepSpeed's bf16 casts the whole base to bfloat16, but model.dtype is float32"),
])
def test_contradictory_precision_is_refused_in_one_line(sections, message, tmp_path, capsys):
    from tensorft.train import main as train_main

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _config(**sections)
    data = {k: dict(v) for k, v in BASE_CONFIG.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert train_main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("tensorft: error: ") and message in err


@pytest.mark.parametrize("sections", [
    {"model": {"dtype": "bfloat16"}, "train": {"bf16": True}},  # bf16 weights, bf16 compute
    {"model": {"dtype": "float32"}, "train": {"bf16": True}},  # float32 weights, bf16 autocast
    {"model": {"dtype": "bfloat16"}, "train": {"bf16": False}},  # bf16 weights, float32 adapter
    {"model": {"dtype": "bfloat16", "quantization": "nf4"}, "train": {"bf16": True}, "distributed": {"strategy": "deepspeed"}},
])
def test_consistent_precision_is_accepted(sections):
    _config(**sections)


def test_every_shipped_config_loads_from_the_repository_root_with_one_seed(monkeypatch):
    import glob

    from tensorft.config import load_config

    monkeypatch.chdir(ROOT)
    paths = sorted(glob.glob(os.path.join("configs", "*.yaml")))
    assert len(paths) >= 10
    for path in paths:
        if "experts" in (yaml.safe_load(open(path)).get("adapter") or {}):
            continue  # names stage 1's output, which exists only once stage 1 ran (test_shipped_configs runs both)
        cfg = load_config(path)
        assert cfg.adapter.seed == cfg.train.seed, path
        name = cfg.model.name_or_path
        if name.startswith("configs/"):  # a config-only model directory of the repository
            assert os.path.isfile(os.path.join(name, "config.json")), path


# --------------------------------------------------------------------------- relative paths


def test_relative_paths_are_relative_to_the_working_directory(chat_work, tmp_path, monkeypatch, capsys):
    """model.name_or_path, data files and output_dir follow one rule: the working directory,
    not the config file's; errors print the path they looked for."""
    import shutil

    from tensorft.config import load_config
    from tensorft.train import main as train_main

    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copytree(chat_work / "tiny", project / "tiny")
    shutil.copy(chat_work / "alpaca.jsonl", project / "rows.jsonl")
    shutil.copytree(chat_work / "tiny", project / "configs" / "tiny")  # beside the config: not used
    config = project / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "tiny"},
        "adapter": {"kind": "lora", "rank": 2, "targets": ["q_proj", "v_proj"]},
        "data": {"train": "rows.jsonl", "format": "alpaca"},
        "train": {"output_dir": "out", "max_steps": 1, "batch_size": 2, "max_length": 64, "save_steps": 100},
    }))
    monkeypatch.chdir(project)
    cfg = load_config(str(config))
    assert (cfg.model.name_or_path, cfg.data.train, cfg.train.output_dir) == ("tiny", "rows.jsonl", "out")
    assert train_main(["--config", str(config)]) == 0
    assert (project / "out" / "adapter_config.json").is_file()
    assert not (project / "configs" / "out").exists()
    capsys.readouterr()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the model beside the config is not looked for
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tensorft: error: data.train: rows.jsonl: no such file")
    assert str(elsewhere / "rows.jsonl") in err and "relative to the working directory" in err
    shutil.copy(project / "rows.jsonl", elsewhere / "rows.jsonl")
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tensorft: error: model.name_or_path: tiny: no such directory")
    assert str(elsewhere / "tiny") in err and "relative to the working directory" in err
    assert not (elsewhere / "out").exists()
