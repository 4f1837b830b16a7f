"""The speed benchmarks of issues 10, 11 and 13 end to end at toy size (one decoder layer of the
SmolLM2-135M shape, tiny vocabulary, one round): bench/routed_step.py with trex against lora at
matched parameters (and the intuition encoder's cost), and bench/ttmoe_inference.py (whose MoE
rows must equal each expert alone)."""

import json
import os
import sys

import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import routed_step  # noqa: E402
import ttmoe_inference  # noqa: E402

# (d_in, d_out) of q, k, v, o, gate, up, down in the SmolLM2-135M shape (GQA: k, v are 576 -> 192)
SITES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def test_trex_step_bench_matches_lora_parameters_and_reports_the_encoder(tmp_path):
    out = tmp_path / "trex.json"
    routed_step.main(["--kinds", "trex,lora", "--lora-rank", "match", "--rank", "3", "--trex-i", "2",
                      "--layers", "1", "--vocab", "256", "--batch", "2", "--seq", "8", "--rounds", "1",
                      "--encoder-examples", "4", "--encoder-repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = {r["kind"]: r for r in saved["rows"]}
    assert list(rows) == ["lora", "trex"]  # lora first: the reference row
    I, J = 2, 3
    trex = sum(I * o + (J + I * J) * i + 1 for i, o in SITES)  # A, B^T, router, gate per site
    assert rows["trex"]["params"] == trex and rows["trex"]["rank_out"] == I
    per_rank = sum(i + o for i, o in SITES)
    assert rows["lora"]["params"] == rows["lora"]["rank"] * per_rank
    assert rows["lora"]["rank"] == round(trex / per_rank)  # the nearest count
    for row in rows.values():
        assert row["median_s"] > 0 and row["step_peak_mb"] > 0
        assert row["round_ratio_min"] <= row["ratio_to_lora"] * 10  # finite, one round
    assert rows["lora"]["ratio_to_lora"] == 1.0
    enc = saved["encoder"]
    assert enc["encoder"] == "all-MiniLM-L6-v2" and enc["examples"] == 4 and enc["mean_tokens"] > 4
    assert 0 < enc["per_example_ms_min"] <= enc["per_example_ms_median"] <= enc["per_example_ms_max"]
    assert "--lora-rank match" in saved["command"] and saved["settings"]["lora_rank_used"] == rows["lora"]["rank"]


def test_ttmoe_inference_bench_end_to_end(tmp_path):
    out = tmp_path / "ttmoe.json"
    ttmoe_inference.main(["--experts", "3,2", "--layers", "1", "--vocab", "256", "--batch", "4", "--prompt", "5",
                          "--decode", "2", "--rank", "2", "--rounds", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = {r["config"]: r for r in saved["rows"]}
    assert list(rows) == ["tt", "moe2", "moe3"]
    assert saved["floor_prefill_median_s"] > saved["base"]["prefill_median_s"] > 0
    for name, row in rows.items():
        assert row["prefill_median_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["prefill_peak_mb"] > 0
    for E in (2, 3):
        row = rows[f"moe{E}"]
        assert row["experts"] == E and row["expert_cores_over_E_experts"] == 1.0  # each expert's cores once
        assert row["router_params"] == 2 * E * (576 + 1)
        assert row["generation_memory_mb"] > 0
        c = row["check"]
        routed = torch.arange(4) % E  # row i goes to expert i % E
        assert c["experts_checked"] == [0, E - 1] and c["rows_checked"] == int(((routed == 0) | (routed == E - 1)).sum())
        assert c["max_abs_logit_diff"] < 1e-5 and c["same_greedy_tokens"]
        assert c["other_expert_logit_diff"] > 1e-2  # the experts differ: the check can fail


def test_ttmoe_grouped_rows_equal_each_expert_alone(tmp_path):
    """Independent of the bench's own check: every row of a batch mixing three experts (routed by
    the steered router, not forced) against its expert loaded alone, prefill and decode."""
    class Args:
        layers, vocab, rank, alpha, core_std, decode, device = 1, 256, 2, 4.0, 0.05, 2, "cpu"
        targets = ["q_proj", "v_proj", "down_proj"]

    dirs = ttmoe_inference.save_experts(Args, 3, tmp_path)
    model = ttmoe_inference.moe(Args, dirs)
    ids = torch.randint(0, 256, (5, 4), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assign = torch.tensor([2, 0, 1, 1, 2])
    ttmoe_inference.steer_router(model, inputs, assign)
    logits, cache = ttmoe_inference.prefill(model, inputs)
    last, tokens = ttmoe_inference.decode(model, logits, cache, Args.decode)
    alone = [ttmoe_inference.expert_alone(Args, d) for d in dirs]
    for i in range(5):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        r_logits, r_cache = ttmoe_inference.prefill(alone[int(assign[i])], row)
        r_last, r_tokens = ttmoe_inference.decode(alone[int(assign[i])], r_logits, r_cache, Args.decode)
        torch.testing.assert_close(logits[i : i + 1], r_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(last[i : i + 1], r_last, rtol=0, atol=1e-5)
        assert torch.equal(tokens[i : i + 1], r_tokens)
    # a row against another expert does not match
    wrong, _ = ttmoe_inference.prefill(alone[0], {k: v[:1] for k, v in inputs.items()})
    assert (wrong - logits[:1]).abs().max() > 1e-2


def test_sft_bench_times_launcher_and_peft_trl_on_the_cpu_clock(tmp_path):
    """bench/train_sft.py (issue 13: SFT tokens/s through the launcher vs PEFT + trl) at toy size:
    both rows train through their real code paths, with the same trainable parameters."""
    import subprocess

    from conftest import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "model")
    out = tmp_path / "sft.json"
    p = subprocess.run(
        [sys.executable, os.path.join(BENCH, "train_sft.py"), "--kinds", "peft-lora,lora", "--model", model,
         "--steps", "3", "--warmup", "1", "--batch", "2", "--seq", "96", "--clock", "cpu", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch threads 1, clock cpu" in p.stdout
    rows = {r["kind"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"peft-lora", "lora"}
    per_layer = 2 * (64 + 64) + 2 * (64 + 32)  # rank 1: q, o 64->64; k, v 64->32
    assert rows["peft-lora"]["trainable_parameters"] == rows["lora"]["trainable_parameters"] == 2 * 8 * per_layer
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["steps_timed"] == 2
        assert row["clock"] == "cpu" and row["torch_threads"] == 1  # as measured in each training process


def test_adapter_layer_bench_times_every_kind_against_the_floor(tmp_path):
    import adapter_layer

    out = tmp_path / "layer.json"
    result = adapter_layer.main(["--d", "64", "--heads", "4", "--tokens", "16", "--rank", "2", "--iters", "1",
                                 "--rounds", "2", "--json", str(out)])
    assert [r["kind"] for r in result["rows"]] == list(adapter_layer.KINDS)
    assert all(len(r["rounds_ms"]) == 2 and r["ms"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["args"]["d"] == 64


def test_step_profile_bench_reports_each_adapter_against_the_floor_in_the_same_round(tmp_path):
    import step_profile

    out = tmp_path / "profile.json"
    summary = step_profile.main(["--adapters", "lora,cp", "--layers", "1", "--vocab", "256", "--batch", "1",
                                 "--seq", "8", "--rounds", "1", "--steps", "1", "--warmup", "0", "--top", "1000",
                                 "--json", str(out)])
    rows = {r["adapter"]: r for r in summary["rows"]}
    assert list(rows) == ["floor", "lora", "cp"]  # the floor is added first when not asked for
    assert rows["floor"]["ratio_to_floor"] == [1.0]
    per_layer = 2 * (576 + 576) + 2 * (576 + 192)  # rank 8 lora: q, o 576 -> 576; k, v 576 -> 192
    assert rows["lora"]["trainable"] == 8 * per_layer
    for name in ("lora", "cp"):
        row = rows[name]
        assert row["step_cpu_ms"][0] > 0
        assert abs(row["ratio_to_floor"][0] - row["step_cpu_ms"][0] / rows["floor"]["step_cpu_ms"][0]) < 1e-2
        # the floor's bias-free projections never call addmm; these kinds add their update with one
        assert row["op_deltas_ms"]["aten::addmm"] > 0
    saved = json.loads(out.read_text())
    assert len(saved["rounds"]) == 1 and saved["settings"]["layers"] == 1
