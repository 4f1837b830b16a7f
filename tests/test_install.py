"""The installed package is usable on its own: a wheel built from this repository, installed
into a fresh virtual environment, runs ``tensorft eval`` / ``report`` / ``train`` from another
directory, with the offline task YAMLs and the DeepSpeed JSONs found inside the package.

The fresh environment sees this environment's packages (torch, transformers, lm-eval, ...)
through a ``.pth`` line, not their ``.pth`` hooks, so the editable install of the checkout is
not visible there: only the wheel's ``tensorft`` is.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml

import tensorft
from conftest import randomize_adapters, save_tiny_chat_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = [("a gripping , beautifully acted film", 1), ("dull , tedious and far too long", 0),
        ("a warm and funny delight", 1), ("a mess from start to finish", 0)]


def _sh(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python, tensorft script, environment) of a fresh venv holding the built wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: building never writes build/ or *.egg-info into the checkout
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "tensorft"), src / "tensorft", ignore=shutil.ignore_patterns("__pycache__"))
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)])
    (wheel,) = glob.glob(str(tmp / "dist" / "tensorft-*.whl"))

    _sh([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")])
    python = str(tmp / "venv" / "bin" / "python")
    site = _sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "_deps_from_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # a path line: that directory, none of its .pth hooks
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PATH=os.path.dirname(python) + os.pathsep + env.get("PATH", ""))
    elsewhere = tmp / "elsewhere"  # the working directory of every command: not the checkout
    os.makedirs(elsewhere)
    return {"python": python, "tensorft": str(tmp / "venv" / "bin" / "tensorft"), "env": env, "cwd": str(elsewhere),
            "site": site, "tmp": tmp}


def _run(venv, *argv):
    return subprocess.run(list(argv), capture_output=True, text=True, env=venv["env"], cwd=venv["cwd"])


def test_the_wheel_ships_the_package_and_its_data(venv):
    code = ("import os, tensorft, tensorft.evaluation.lm_eval as w\n"
            "from tensorft.train import shipped_deepspeed_config as ds\n"
            "print(tensorft.__file__); print(w.TASKS_DIR); print(ds('zero3')); print(ds('zero2.json'))\n")
    lines = _run(venv, venv["python"], "-c", code).stdout.split()
    assert len(lines) == 4, lines
    for path in lines:
        assert path.startswith(venv["site"]), (path, venv["site"])  # the wheel's copy, not the checkout's
    assert os.path.isfile(os.path.join(lines[1], "glue", "sst2_local.yaml"))
    assert os.path.isfile(os.path.join(lines[1], "_tensorft.py"))
    assert json.load(open(lines[2]))["zero_optimization"]["stage"] == 3
    assert json.load(open(lines[3]))["zero_optimization"]["stage"] == 2
    # the repository's own helpers are not installed
    for module in ("evaluation", "scripts.demo_assets"):
        assert _run(venv, venv["python"], "-c", f"import {module}").returncode != 0, module
    proc = _run(venv, venv["tensorft"], "--help")
    for name in ("train", "eval", "mt-bench", "report"):
        assert f"    {name} " in proc.stdout, name
    # the heavy dependencies are extras, not requirements of a plain install
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps([m.metadata('tensorft').get_all('Provides-Extra'), m.requires('tensorft')]))")
    extras, requires = json.loads(_run(venv, venv["python"], "-c", code).stdout)
    assert {"deepspeed", "quant", "eval", "plot", "all"} <= set(extras)
    plain = [r for r in requires if "extra ==" not in r]
    for heavy in ("deepspeed", "bitsandbytes", "lm-eval", "matplotlib"):
        assert not any(r.startswith(heavy) for r in plain), heavy
        assert any(r.startswith(heavy) and "extra ==" in r for r in requires), heavy


def test_installed_tensorft_eval_report_and_train(venv, tmp_path):
    from transformers import LlamaForCausalLM

    base = save_tiny_chat_llama(tmp_path / "tiny")
    model = LlamaForCausalLM.from_pretrained(base)
    tensorft.attach(model, {"kind": "cp", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]})
    randomize_adapters(model, seed=1, scale=0.5)
    tensorft.save(model, str(tmp_path / "cp"))
    for split in ("train", "validation"):
        path = tmp_path / "data" / "glue" / "sst2" / f"{split}.jsonl"
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("".join(json.dumps({"sentence": s, "label": l, "idx": i}) + "\n" for i, (s, l) in enumerate(SST2)))

    moved = str(tmp_path / "moved")  # the base moved since the adapter was saved: --base says where
    os.rename(base, moved)
    base = moved
    # the shipped offline task, found without --include_path
    proc = _run(venv, venv["tensorft"], "eval", "--adapter", str(tmp_path / "cp"), "--base", moved, "--tasks", "sst2_local",
                "--metadata", json.dumps({"data_dir": str(tmp_path / "data")}), "--device", "cpu",
                "--batch_size", "4", "-o", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = glob.glob(str(tmp_path / "eval" / "*" / "results_*.json"))
    with open(results) as f:
        data = json.load(f)
    assert data["config"]["tensorft"]["kind"] == "cp" and data["config"]["tensorft"]["base"] == moved
    assert "acc_norm_tok,none" in data["results"]["sst2"]  # the group sst2_local holds the task sst2
    assert os.path.isfile(results[: -len(".json")] + ".md")

    proc = _run(venv, venv["tensorft"], "report", str(tmp_path / "eval"), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(tmp_path / "report" / "report.png") > 0

    cfg = {
        "model": {"name_or_path": base},
        "adapter": {"kind": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        "data": {"train": str(tmp_path / "train.jsonl"), "format": "prompt-completion"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "max_length": 32,
                  "save_steps": 100},
    }
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": s, "completion": " ok"}) + "\n" for s, _ in SST2))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run(venv, venv["tensorft"], "train", "--config", str(tmp_path / "c.yaml"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert os.path.isfile(tmp_path / "run" / "adapter_config.json")
