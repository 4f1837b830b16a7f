"""4-bit (nf4) bases under FSDP2 and DeepSpeed ZeRO-3, every adapter kind (issue 12).

bitsandbytes keeps a 4-bit layer's quantization state on the layer as well as on the packed
weight, and restores it when a sharding wrapper hands the layer a plain parameter, so the
packed weights shard like any other tensor (each rank holds half of them here). One torchrun
launch runs every kind under both: loss and adapter gradients on a batch split over 2 ranks
equal one process on the whole batch (tests/sharded_quantized_kinds.py). The launcher's own
FSDP2 / ZeRO-3 runs on an nf4 base are in test_shipped_configs.py; 8-bit bases under FSDP2 are
refused (test_train.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import save_tiny_chat_llama
from tensorft.registry import adapter_kind, adapter_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sharded_quantized_kinds.py")
# kind -> why this test leaves it out (a kind that is added must run here or say why)
NOT_HERE = {"ttmoe": "its frozen experts come from a stage-1 run; its sharded runs are in test_ttmoe.py"}
# relative to the largest gradient entry / absolute in the loss: float32 sums in another order
GRAD_TOL, LOSS_TOL = 2e-6, 1e-5


def shipped_kinds() -> list[str]:
    """The kinds tensorft ships (other tests register kinds of their own in this process)."""
    return [k for k in adapter_kinds() if adapter_kind(k).__module__.startswith("tensorft.adapters.")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("nf4-sharded")
    model = save_tiny_chat_llama(work / "tiny")
    kinds = [k for k in shipped_kinds() if k not in NOT_HERE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           SCRIPT, model, str(work / "out.json"), *kinds]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(work / "out.json") as f:
        return kinds, json.load(f)


def test_every_kind_is_covered(results):
    kinds, got = results
    assert set(NOT_HERE) <= set(shipped_kinds()), "stale entry"
    assert sorted(got) == sorted(kinds) and len(kinds) >= 9


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_nf4_base_sharded_matches_one_process_for_every_kind(results, strategy):
    _, got = results
    for kind, by_strategy in got.items():
        r = by_strategy[strategy]
        assert r["sharded_4bit"], f"{kind}: the 4-bit weights are not sharded under {strategy}"
        assert r["tensors"] > 0 and r["grad_scale"] > 1e-4, (kind, r)
        assert r["loss_diff"] < LOSS_TOL and r["grad_diff"] < GRAD_TOL, (kind, strategy, r)
