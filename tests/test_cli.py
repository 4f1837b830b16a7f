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
    assert params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=models/llama-2-13b") == 4 * (5120 + 128 + 40 + 40 + 2)
    # GQA (Mistral): k/v get their own 8-row head factor; all four matrices
    n = params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=models/mistral-7b",
               "adapter.targets=[q_proj,k_proj,v_proj,o_proj]")
    assert n == 4 * (4096 + 128 + 32 + 8 + 32 + 4)
    # the MLP tensor: r (d + d_ffn + L + M_mlp), Llama-3-8B d_ffn = 14336
    n = params(capsys, "cp_llama2_7b.yaml", "model.name_or_path=models/llama-3-8b",
               "adapter.targets=[q_proj,v_proj,gate_proj,up_proj,down_proj]")
    assert n == 4 * (4096 + 128 + 32 + 8 + 32 + 2) + 4 * (4096 + 14336 + 32 + 3)
    # TT: sum of r_{k-1} s_k r_k; 8^4 x 8^4 at r=5 is 40 + 6 * 200 + 40 per matrix
    assert params(capsys, "tt_llama2_7b.yaml") == 64 * (40 + 6 * 200 + 40)


def test_tt_is_a_few_percent_of_lora_on_llama_3_2_1b(capsys):
    """methods.md: TT-LoRA r=5 on q,v is ~2% of LoRA r=16 on q,v (1,703,936)."""
    lora = params(capsys, "lora_llama2_7b.yaml", "model.name_or_path=models/llama-3.2-1b", "adapter.rank=16")
    assert lora == 1_703_936
    tt = params(capsys, "tt_llama2_7b.yaml", "model.name_or_path=models/llama-3.2-1b", "adapter.tt_shapes=null")
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
