"""The ``tensorft`` command: params on config-only models, merge, export-peft, bad input."""

import os
import subprocess
import sys

import pytest
import torch

import tensorft
from conftest import ATTN, randomize_adapters, tiny_llama, tokens
from tensorft.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def params(capsys, config, *sets):
    argv = ["params", "--config", os.path.join(CONFIGS, config)]
    for s in sets:
        argv += ["--set", s]
    assert run(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("trainable parameters: ")
    return int(last.split(": ")[1])


def test_params_reference_figures(capsys):
    """methods.md: Llama-2-7B q,v: CP r=4 17,160; CP r=64 274,560; LoRA r=4 2,097,152."""
    assert params(capsys, "cp_llama2_7b.yaml") == 17_160
    assert params(capsys, "cp_llama2_7b.yaml", "adapter.rank=64") == 274_560
    assert params(capsys, "lora_llama2_7b.yaml") == 2_097_152
    # 13B: r (d + d_head + H + L + M) with d=5120, H=L=40
    assert params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=configs/models/llama-2-13b") == 4 * (5120 + 128 + 40 + 40 + 2)
    # GQA (Mistral): k/v get their own 8-row head factor; all four matrices
    n = params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=configs/models/mistral-7b",
               "adapter.targets=[q_proj,k_proj,v_proj,o_proj]")
    assert n == 4 * (4096 + 128 + 32 + 8 + 32 + 4)
    # the MLP tensor: r (d + d_ffn + L + M_mlp), Llama-3-8B d_ffn = 14336
    n = params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=configs/models/llama-3-8b",
               "adapter.targets=[q_proj,v_proj,gate_proj,up_proj,down_proj]")
    assert n == 4 * (4096 + 128 + 32 + 8 + 32 + 2) + 4 * (4096 + 14336 + 32 + 3)
    # TT: sum of r_{k-1} s_k r_k; 8^4 x 8^4 at r=5 is 40 + 6 * 200 + 40 per matrix
    assert params(capsys, "tt_llama2_7b.yaml") == 64 * (40 + 6 * 200 + 40)


def test_tt_is_a_few_percent_of_lora_on_llama_3_2_1b(capsys):
    """methods.md: TT-LoRA r=5 on q,v is ~2% of LoRA r=16 on q,v (1,703,936)."""
    lora = params(capsys, "lora_llama2_7b.yaml", "model.name_or_path=configs/models/llama-3.2-1b", "adapter.rank=16")
    assert lora == 1_703_936
    tt = params(capsys, "tt_llama2_7b.yaml", "model.name_or_path=configs/models/llama-3.2-1b", "adapter.tt_shapes=null")
    assert 0.01 < tt / lora < 0.035


def test_params_table_lists_each_module_kind(capsys):
    params(capsys, "cp_llama2_7b.yaml")
    run(["params", "--config", os.path.join(CONFIGS, "cp_llama2_7b.yaml")])
    out = capsys.readouterr().out
    for row in ("q_proj", "v_proj", "shared attention.A", "shared attention.C_layers"):
        assert row in out


BAD = [
    (["--set", "adapter.colour=red"], "adapter.colour: unknown key"),
    (["--set", "adapter.rank=0"], "adapter.rank: must be at least 1"),
    (["--set", "adapter.alpha=-1"], "adapter.alpha: must be positive, got -1"),
    (["--set", "adapter.lr_scale=0"], "adapter.lr_scale: must be positive"),
    (["--set", "adapter.targets=[q_proj,qkv]"], "adapter.targets: 'qkv' matches no module"),
    (["--set", "modle.dtype=float32"], "modle: unknown section"),
    (["--set", "model.quantization=int3"], "model.quantization: 'int3' is not one of"),
    (["--set", "model.name_or_path=./no/such/dir"], "model.name_or_path: ./no/such/dir is not a directory"),
    (["--set", "adapter.kind=tt", "--set", "adapter.tt_shapes={in: [64, 60], out: [4096]}"],
     "adapter.tt_shapes.in: product of [64, 60] is 3840, but model.layers.0.self_attn.q_proj has input dim 4096"),
    (["--set", "adapter.kind=tt", "--set", "adapter.tt_shapes={o_proj: {in: [4096], out: [4096]}}"],
     "adapter.tt_shapes.o_proj: 'o_proj' is not in adapter.targets"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_is_one_line_exit_2(capsys, extra, message):
    code = run(["params", "--config", os.path.join(CONFIGS, "cp_llama2_7b.yaml"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tensorft.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_process_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\nadapter:\n  kind: cp\n  rnak: 4\n")
    p = _cli("params", "--config", str(bad))
    assert p.returncode == 2 and p.stdout == ""
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("tensorft: error: adapter.rnak: unknown key for kind 'cp' (known: alpha, ")
    assert ", rank, " in line
    p = _cli("params", "--config", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "config file not found" in p.stderr and "Traceback" not in p.stderr
    p = _cli("merge", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert p.returncode == 2 and "no adapter_config.json" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    p = _cli("frobnicate")
    assert p.returncode == 2 and p.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["cp", "tt"])
def test_merge_and_export_commands(tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = tmp_path / "base"
    tiny_llama(kv_heads=2).save_pretrained(base_path)
    model = tensorft.attach(AutoModelForCausalLM.from_pretrained(base_path), {"kind": kind, "rank": 3, "targets": ATTN})
    randomize_adapters(model, scale=0.3)
    tensorft.save(model, str(tmp_path / "adapter"))
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits

    assert run(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("tensorft" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert run(["export-peft", str(tmp_path / "adapter"), str(tmp_path / "peft")]) == 0
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=1e-5)
    # float32 by default (the base reloaded in full precision), --dtype for another
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {torch.float32}
    assert run(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged-bf16"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "merged-bf16" / "model.safetensors").values()} == {torch.bfloat16}

    # an existing output is never overwritten, and nothing is left half-written
    assert run(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_every_shipped_config_validates():
    from tensorft.config import load_config

    names = [n for n in os.listdir(CONFIGS) if n.endswith(".yaml")]
    assert len(names) >= 6
    # stage 2 of TT-LoRA MoE reads stage 1's output: without it, the one-line error names the key
    # (tests/test_shipped_configs.py runs the two stages chained)
    needs_output = {"ttmoe_stage2.yaml": "adapter.experts: runs/ttmoe-experts: no such directory"}
    for name in names:
        if name in needs_output:
            with pytest.raises(tensorft.ConfigError, match=needs_output[name]):
                load_config(os.path.join(CONFIGS, name))
            continue
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.adapter.kind in tensorft.adapter_kinds(), name


def test_numbers_written_the_usual_way_are_numbers(tmp_path):
    """PyYAML reads ``1e-4`` (no dot) as a string; a config means the number."""
    from tensorft.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: x\ntrain:\n  lr: 1e-4\n")
    assert load_config(str(path), ["train.weight_decay=1e-2"]).train.lr == 1e-4
    assert load_config(str(path), ["train.weight_decay=1e-2"]).train.weight_decay == 0.01
    with pytest.raises(tensorft.ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(str(path), ["train.lr=fast"])


# --------------------------------------------------------------------------- commands, extras, --base

FORWARDED = ["train", "eval", "mt-bench", "report", "routing-plot", "expert-usage-plot", "bigbench-to-bbh"]


def test_every_command_is_listed_and_prints_its_help(capsys):
    assert run([]) == 2
    listing = capsys.readouterr().out
    for name in ["params", "merge", "export-peft", *FORWARDED]:
        assert f"    {name} " in listing or f"    {name}\n" in listing, name
    for name in ["params", "merge", "export-peft", *FORWARDED]:
        try:
            code = run([name, "--help"])
        except SystemExit as e:  # the core commands: argparse exits after --help
            code = e.code
        assert code in (0, None), name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: tensorft {name} "), (name, out[:200])
        if name in ("merge", "export-peft", "eval", "mt-bench", "expert-usage-plot"):  # every adapter loader
            assert "--base DIR" in out, name


def test_forwarded_commands_run_their_module(tmp_path, capsys):
    # the same program as python -m tensorft.evaluation.<module>: same one-line errors, exit 2
    assert run(["eval", "--adapter", str(tmp_path / "none"), "--tasks", "x", "-o", str(tmp_path / "o")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert run(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert run(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("tensorft: error: ")
    assert run(["mt-bench", "--base", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "for a plain model use --model MODEL" in capsys.readouterr().err


def _without(module, *argv, cwd=ROOT):
    """``tensorft ARGV`` in a process where ``module`` cannot be imported (an extra not installed)."""
    modules = [module] if isinstance(module, str) else list(module)
    code = (f"import sys; sys.modules.update(dict.fromkeys({modules!r}))\n"
            "from tensorft.cli import main\n"
            f"main({list(argv)!r})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)


def _tiny_adapter(tmp_path, kind="cp"):
    from transformers import AutoModelForCausalLM

    base_path = tmp_path / "base"
    tiny_llama(kv_heads=2).save_pretrained(base_path)
    model = tensorft.attach(AutoModelForCausalLM.from_pretrained(base_path), {"kind": kind, "rank": 3, "targets": ATTN})
    randomize_adapters(model, scale=0.3)
    tensorft.save(model, str(tmp_path / "adapter"))
    return model, base_path


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    # the core needs none of them
    p = _without(["deepspeed", "bitsandbytes", "lm_eval", "matplotlib"], "params", "--config",
                 os.path.join(CONFIGS, "cp_llama2_7b.yaml"))
    assert p.returncode == 0 and p.stdout.strip().endswith("trainable parameters: 17160"), p.stderr[-2000:]

    _, base = _tiny_adapter(tmp_path)
    adapter = str(tmp_path / "adapter")
    p = _without("lm_eval", "eval", "--adapter", adapter, "--tasks", "sst2_local", "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr == "tensorft: error: tensorft eval needs lm-eval; install it with: pip install 'tensorft[eval]'\n"

    results = tmp_path / "results.json"
    results.write_text('{"results": {"sst2": {"acc,none": 0.5}}, "configs": {"sst2": {"metric_list": [{"metric": "acc"}]}},'
                       ' "config": {"model": "hf", "model_args": "pretrained=x"}}')
    p = _without("matplotlib", "report", str(results), "--out", str(tmp_path / "report"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "pip install 'tensorft[plot]'" in p.stderr, p.stderr
    assert not (tmp_path / "report").exists()

    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name_or_path: {base}\nadapter:\n  kind: cp\n  rank: 2\n"
                      f"data:\n  train: {tmp_path / 'none.jsonl'}\ntrain:\n  output_dir: {tmp_path / 'run'}\n")
    p = _without("deepspeed", "train", "--config", str(config), "--set", "distributed.strategy=deepspeed")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "distributed.strategy: deepspeed needs deepspeed; install it with: pip install 'tensorft[deepspeed]'" in p.stderr
    p = _without("bitsandbytes", "train", "--config", str(config), "--set", "model.quantization=nf4")
    assert p.returncode == 2 and "pip install 'tensorft[quant]'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_base_relocates_the_adapter_base_in_merge_and_export(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, base = _tiny_adapter(tmp_path)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    moved = tmp_path / "elsewhere" / "base"
    os.makedirs(moved.parent)
    os.rename(base, moved)
    adapter = str(tmp_path / "adapter")

    capsys.readouterr()
    assert run(["merge", adapter, str(tmp_path / "m0")]) == 2  # the recorded base is gone: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.name_or_path" in err, err
    assert run(["merge", adapter, str(tmp_path / "merged"), "--base", str(moved)]) == 0
    assert run(["export-peft", adapter, str(tmp_path / "peft"), "--base", str(moved)]) == 0
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        import json

        assert json.load(f)["base_model_name_or_path"] == str(moved)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert run(["export-peft", adapter, str(tmp_path / "p2"), "--base", str(tmp_path / "adapter" / "adapter_config.json")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_old_evaluation_names_are_the_package_modules():
    """``python -m evaluation.<tool>`` / ``from evaluation import <tool>`` in a checkout are the
    shipped modules themselves (monkeypatching either name patches both), and the checkout's
    ``evaluation/tasks`` and ``configs/deepspeed`` are the shipped files."""
    import importlib

    sys.path.insert(0, ROOT)
    for name in ("lm_eval", "mt_bench", "report", "judges", "devices", "routing_plot", "expert_usage_plot",
                 "bigbench_to_bbh"):
        assert importlib.import_module(f"evaluation.{name}") is importlib.import_module(f"tensorft.evaluation.{name}")
    from tensorft.evaluation.lm_eval import TASKS_DIR
    from tensorft.train import shipped_deepspeed_config

    assert os.path.realpath(os.path.join(ROOT, "evaluation", "tasks")) == os.path.realpath(TASKS_DIR)
    for name in ("zero2", "zero3.json"):
        shipped = shipped_deepspeed_config(name)
        assert os.path.isfile(shipped) and os.path.dirname(shipped) == os.path.join(ROOT, "tensorft", "configs", "deepspeed")
    by_path = os.path.join("configs", "deepspeed", "zero2.json")  # a config naming the file by path
    assert shipped_deepspeed_config(by_path) == by_path
    assert os.path.samefile(os.path.join(ROOT, by_path), shipped_deepspeed_config("zero2"))
