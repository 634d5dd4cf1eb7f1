"""surgery.rl.dpo: the preference loop on a LoRA over one frozen base, its accuracy, and the Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import assert_state_equal, bits, state_bits
from models import CharTokenizer, tiny_llama

import surgery
from surgery.errors import ConfigError
from surgery.rl import data as D
from surgery.rl.dpo import DPOLoss, pair_loss, preference_accuracy, preference_margins, train_dpo
from surgery.rl.logprobs import logprobs
from surgery.rl.reference import reference

WORDS = ["cat", "dog", "sun", "tree", "milk", "rain", "bird", "fish", "lamp", "road", "star", "wolf", "leaf", "rock"]


@pytest.fixture(scope="module")
def pairs():
    """A learnable toy: say the word (chosen), not its mirror image (rejected)."""
    rows = [{"prompt": f"say {w}", "chosen": w, "rejected": w[::-1]} for w in WORDS]
    return D.encode(CharTokenizer(), rows, max_length=32)


def policy():
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    surgery.inject(base, "lora", targets="@linear", r=4, name="pol")
    return base, pristine


def test_dpo_learns_the_toy_and_leaves_the_base_alone(pairs):
    model, pristine = policy()
    base_before = state_bits(pristine)
    assert preference_accuracy(model, pairs, delta="pol") == 0.0  # a fresh LoRA is the reference: margins 0
    seen = []
    history = train_dpo(model, pairs, delta="pol", epochs=6, lr=5e-3, batch_size=7, on_step=lambda s, r: seen.append(s))
    assert seen == list(range(12)) and [r["step"] for r in history] == seen
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert history[0]["accuracy"] == 0.0 and history[0]["margin"] == 0.0
    first, last = history[:2], history[-2:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first) - 0.05
    assert sum(r["margin"] for r in last) > 0
    assert preference_accuracy(model, pairs, delta="pol") >= 0.9
    assert_state_equal(base_before, {k: bits(v) for k, v in surgery.base_state_dict(model).items()})
    b = D.collate(pairs[:5], 0)
    with torch.no_grad(), reference(model):
        ref = logprobs(model, b)
    want = logprobs(pristine, b)
    assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])  # the reference is the pristine base
    with torch.no_grad(), surgery.use(model, "pol"):
        assert not torch.equal(logprobs(model, b)[0], want[0])


@pytest.mark.parametrize("loss", ["ipo", "kto", "orpo"])
def test_other_losses_train_in_the_loop(pairs, loss):
    model, _ = policy()
    history = train_dpo(model, pairs, delta="pol", loss=loss, epochs=4, lr=5e-3, batch_size=7)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["margin"] > history[0]["margin"]


def test_kto_in_the_loop_uses_a_mismatched_kl_estimate(pairs):
    model, _ = policy()
    b = D.collate(pairs[:4], 0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    loss, m = pair_loss(model, b, loss="kto", delta="pol")
    assert m["kl"] >= 0.0 and math.isfinite(float(loss.detach()))
    # the estimate: prompt i with the chosen completion of row i+1, policy minus reference
    rows = [D.Encoded(pairs[i].prompt, pairs[(i + 1) % 4].chosen, []) for i in range(4)]
    kb = D.collate(rows, 0)
    with torch.no_grad(), surgery.use(model, "pol"):
        pol = logprobs(model, kb)[0]
    with torch.no_grad(), surgery.disable(model):
        ref = logprobs(model, kb)[0]
    assert m["kl"] == pytest.approx(max(0.0, float((pol - ref).mean())), abs=1e-6)


def test_preference_margins_against_the_reference(pairs):
    model, pristine = policy()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    h = preference_margins(model, pairs, delta="pol", batch_size=5)
    b = D.collate(list(pairs), 0)
    with torch.no_grad(), surgery.use(model, "pol"):
        c, r = logprobs(model, b)
    rc, rr = logprobs(pristine, b)
    assert torch.allclose(h, (c - r) - (rc - rr), atol=1e-4)
    assert preference_accuracy(model, pairs, delta="pol") == pytest.approx(float((h > 0).float().mean()))
    own = preference_accuracy(model, pairs, delta="pol", against_reference=False)
    assert own == pytest.approx(float((c > r).float().mean()))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_rpo_alpha_adds_the_chosen_nll(pairs, loss):
    model, _ = policy()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    b = D.collate(pairs[:6], 0)
    plain, m0 = pair_loss(model, b, loss=loss, delta="pol")
    rpo, m1 = pair_loss(model, b, loss=loss, delta="pol", rpo_alpha=0.5)
    # TRL's nll_loss: the mean cross-entropy over every chosen completion token, as transformers computes it
    with torch.no_grad(), surgery.use(model, "pol"):
        ce = model(
            input_ids=b["chosen_input_ids"], attention_mask=b["chosen_attention_mask"], labels=b["chosen_labels"]
        ).loss
    assert "nll" not in m0 and m1["nll"] == pytest.approx(float(ce), rel=1e-5)
    assert float(rpo.detach()) == pytest.approx(float(plain.detach()) + 0.5 * float(ce), rel=1e-5)
    assert float(pair_loss(model, b, loss=loss, delta="pol", rpo_alpha=0)[0]) == pytest.approx(float(plain), rel=1e-6)


def test_rpo_alpha_keeps_the_chosen_text_likely(pairs):
    """DPO alone may push both completions down; its NLL term holds the chosen one up."""
    b = D.collate(list(pairs), 0)
    chosen = []
    for alpha in (None, 0.1):
        torch.manual_seed(0)
        model, _ = policy()
        history = train_dpo(model, pairs, delta="pol", epochs=6, lr=5e-3, batch_size=7, rpo_alpha=alpha)
        assert ("nll" in history[-1]) == (alpha is not None)
        with torch.no_grad(), surgery.use(model, "pol"):
            chosen.append(float(logprobs(model, b)[0].mean()))
        assert preference_accuracy(model, pairs, delta="pol") >= 0.9
    assert chosen[1] > chosen[0] + 0.5


def test_train_dpo_refuses_bad_input(pairs):
    bare = tiny_llama()
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_dpo(bare.requires_grad_(False), pairs, delta=None)
    model, _ = policy()
    with pytest.raises(ConfigError, match="no delta 'nope'"):
        train_dpo(model, pairs, delta="nope")
    with pytest.raises(ConfigError, match="loss must be one of"):
        train_dpo(model, pairs, delta="pol", loss="ppo")
    with pytest.raises(ConfigError, match="beta must be > 0"):
        train_dpo(model, pairs, delta="pol", beta=0)
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="rpo_alpha must be"):
            train_dpo(model, pairs, delta="pol", rpo_alpha=bad)
    with pytest.raises(ConfigError, match="ORPO already adds"):
        DPOLoss(loss="orpo", rpo_alpha=1.0)
    sft = D.encode(CharTokenizer(), [{"prompt": "a", "chosen": "b"}], max_length=16)
    with pytest.raises(ConfigError, match="rejected completion"):
        train_dpo(model, sft, delta="pol")
    with pytest.raises(ConfigError, match="encode"):
        train_dpo(model, [{"prompt": "a", "chosen": "b", "rejected": "c"}], delta="pol")
    surgery.merge(model, "pol")
    with pytest.raises(ConfigError, match="merged"):
        train_dpo(model, pairs, delta="pol")


def test_two_steps_of_transformers_trainer(pairs, tmp_path):
    from transformers import TrainingArguments

    model, pristine = policy()
    base_before = state_bits(pristine)
    loss = DPOLoss(beta=0.1, delta="pol")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        learning_rate=5e-3,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = loss.trainer()(model=model, args=args, train_dataset=list(pairs), data_collator=DPOLoss.collator(0))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(loss.history) == 2 and loss.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert_state_equal(base_before, {k: bits(v) for k, v in surgery.base_state_dict(model).items()})
    assert type(trainer).__name__ == "PreferenceTrainer"
    ev = trainer.evaluate(eval_dataset=list(pairs[:6]))  # the pair loss, not model(**pair batch)
    with torch.no_grad():
        by_hand = [float(pair_loss(model, D.collate(pairs[i : i + 3], 0), delta="pol")[0]) for i in (0, 3)]
    assert ev["eval_loss"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert len(loss.history) == 2  # evaluation steps are not training history


def test_dpo_against_the_sft_delta_kept_in_the_reference(pairs):
    """TRL's ref_adapter_name: the reference is the SFT delta, the policy a copy of it that trains."""
    model = tiny_llama()
    surgery.inject(model, "lora", targets="@linear", r=4, name="sft")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "sft").values():
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.05)
    sft_before = state_bits(model)
    surgery.apply(model, surgery.delta(model, "sft"), name="pol")
    b = D.collate(pairs[:7], 0)
    with torch.no_grad():
        against_base = float(pair_loss(model, b, delta="pol")[0])
    assert against_base != pytest.approx(math.log(2), abs=1e-3)  # the SFT policy is not the base
    assert preference_accuracy(model, pairs, delta="pol", ref_delta="sft") == 0.0  # margins exactly 0
    history = train_dpo(model, pairs, delta="pol", ref_delta="sft", epochs=6, lr=5e-3, batch_size=7)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["margin"] == 0.0
    assert preference_accuracy(model, pairs, delta="pol", ref_delta="sft") >= 0.9
    now = {k: v for k, v in state_bits(model).items() if k in sft_before}
    assert_state_equal(sft_before, now)  # the base and the SFT delta: not a bit moved
    # the Trainer's loss sees the same reference
    ref_loss = DPOLoss(delta="pol", ref_delta="sft")
    with torch.no_grad():
        assert float(ref_loss(model, b)) == pytest.approx(float(pair_loss(model, b, delta="pol", ref_delta="sft")[0]))
    for bad in ({"delta": "pol", "ref_delta": "pol"}, {"delta": "sft", "ref_delta": ["sft"]}):
        with pytest.raises(ConfigError, match="is also ref_delta"):
            train_dpo(model, pairs, **bad)
        with pytest.raises(ConfigError, match="is also ref_delta"):
            DPOLoss(**bad)
    with pytest.raises(ConfigError, match="ref_delta must be None"):
        preference_accuracy(model, pairs, delta="pol", ref_delta={"sft"})
