"""surgery.rl.reward: a LoRA + scalar head reward model on the shared base, Bradley-Terry training."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from models import CharTokenizer, TinyTransformer, tiny_gpt2, tiny_llama

import surgery
from surgery.rl.data import collate, encode
from surgery.rl.reward import RewardModel, pair_rewards, reward_accuracy, train_reward

LETTERS = "abcdefghijklmnopqrstuvwy"  # no z


def _rows(n: int, seed: int) -> list[dict]:
    """Chosen completions contain a 'z', rejected ones do not: a preference a reward model can learn."""
    rng = random.Random(seed)

    def word(k: int) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(k))

    rows = []
    for _ in range(n):
        w = word(rng.randint(3, 6))
        at = rng.randint(0, len(w))
        rows.append({"prompt": word(4), "chosen": w[:at] + "z" + w[at:], "rejected": word(len(w) + 1)})
    return rows


def _perturb(model, name):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, name).values():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_learns_a_toy_preference_on_the_shared_base():
    tok = CharTokenizer()
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    train, test = encode(tok, _rows(128, 0)), encode(tok, _rows(128, 1))
    rm = RewardModel(base, r=8, tokenizer=tok)
    assert rm.deltas == ("rm", "rm-head") and surgery.names(base) == ["rm", "rm-head"]
    before = reward_accuracy(rm, test)
    losses = train_reward(rm, train, epochs=3, lr=5e-3, batch_size=16)
    acc = reward_accuracy(rm, test)
    assert losses[-1] < losses[0] and acc >= 0.9 > before, (losses, before, acc)
    for (k, v), (k0, v0) in zip(surgery.base_state_dict(base).items(), pristine.state_dict().items(), strict=True):
        assert k == k0 and torch.equal(v, v0)  # the base did not move
    # the reward delta is not in the base's default set: the model as a policy is the base
    ids = torch.tensor([[1, 5, 9, 12]])
    assert surgery.active(base) == () and torch.equal(base(ids).logits, pristine(ids).logits)
    # the head method's own path gives the same scores: the head is a plain head delta
    batch = collate(test[:4], 0)
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    with torch.no_grad(), surgery.use(base, "rm", "rm-head"):
        via_head = base(input_ids=ids, attention_mask=mask, task="rm").logits.squeeze(-1)
        assert torch.allclose(rm(ids, mask), via_head, atol=1e-6)


def test_policy_deltas_are_off_inside():
    base = tiny_llama()
    rm = RewardModel(base, r=4)
    _perturb(base, "rm")
    ids = torch.randint(3, 30, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    want = rm(ids, mask)
    surgery.inject(base, "lora", r=4, name="policy")
    surgery.inject(base, "prompt", n_tokens=2, name="soft")
    _perturb(base, "policy")
    assert surgery.active(base) == ("policy", "soft")
    assert torch.equal(rm(ids, mask), want)
    with surgery.use(base, "policy"):
        assert torch.equal(rm(ids, mask), want)
    with surgery.disable(base):  # the rm's own context wins inside its call
        assert torch.equal(rm(ids, mask), want)
    # padding is never read: the reward of a right-padded row is that of the row alone
    assert torch.allclose(rm(ids[:1, :5], mask[:1, :5]), want[:1], atol=1e-5)
    assert not torch.allclose(rm(ids[:1], None), want[:1])


def test_left_padding_scores_as_the_row_alone():
    base = tiny_gpt2()  # absolute positions: a left-padded row needs its positions from the mask
    rm = RewardModel(base, r=4)
    _perturb(base, "rm")
    ids = torch.randint(3, 30, (1, 5))
    left = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)  # as rollouts pad their prompts
    mask = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), torch.ones_like(ids)], 1)
    assert torch.allclose(rm(left, mask), rm(ids, torch.ones_like(ids)), atol=1e-5)


def test_trains_only_its_deltas():
    base = tiny_gpt2()
    surgery.inject(base, "lora", r=4, name="policy")
    policy = {k: v.clone() for k, v in surgery.delta(base, "policy").tensors.items()}
    tok = CharTokenizer()
    rm = RewardModel(base, r=4, tokenizer=tok)
    head0 = rm.head.weight.detach().clone()
    assert {id(p) for p in rm.parameters()} == {
        id(p) for n in rm.deltas for ad in surgery.engine.adapters(base, n).values() for p in ad.parameters()
    }
    batches = [collate(encode(tok, _rows(8, 5)), 0)]  # collated batches are accepted too
    train_reward(rm, batches, epochs=2, lr=1e-2, center=0.01)
    assert not torch.equal(rm.head.weight, head0)
    for k, v in surgery.delta(base, "policy").tensors.items():
        assert torch.equal(v, policy[k])
    assert surgery.delta(base, "rm-head").method == "head"  # the head travels as a delta


def test_refusals():
    tok = CharTokenizer()
    base = tiny_llama()
    with pytest.raises(surgery.ConfigError, match="no backbone"):
        RewardModel(TinyTransformer())
    rm = RewardModel(base, r=4)
    surgery.inject(base, "lora", targets="@linear", r=2, name="lonely")
    with pytest.raises(surgery.ConfigError, match="without its partner"):
        RewardModel(base, delta="lonely")
    surgery.inject(base, "lora", targets="@linear", r=2, name="lonely-head")
    with pytest.raises(surgery.ConfigError, match="not a reward model"):
        RewardModel(base, delta="lonely")
    sft = encode(tok, [{"prompt": "ab", "chosen": "cd"}])
    with pytest.raises(surgery.ConfigError, match="rejected"):
        train_reward(rm, sft)
    with pytest.raises(surgery.ConfigError, match="rejected"):
        reward_accuracy(rm, [collate(sft, 0)])
    with pytest.raises(surgery.ConfigError, match="encode"):
        train_reward(rm, ["not a pair"])


def test_reuses_its_deltas_applied_from_a_saved_copy():
    """A reward model saved as its two deltas and applied to a fresh base scores as the original."""
    tok = CharTokenizer()
    base = tiny_llama()
    rm = RewardModel(base, r=4)
    _perturb(base, "rm")
    with torch.no_grad():
        rm.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    b = collate(encode(tok, _rows(4, 1)), 0)
    want = rm(b["chosen_input_ids"], b["chosen_attention_mask"])
    fresh = tiny_llama()
    for name in rm.deltas:
        surgery.apply(fresh, surgery.delta(base, name))
    again = RewardModel(fresh)  # finds "rm" and "rm-head": no new injection
    assert surgery.names(fresh) == ["rm", "rm-head"]
    assert torch.equal(again(b["chosen_input_ids"], b["chosen_attention_mask"]), want)
    assert surgery.active(fresh) == surgery.active(tiny_llama())  # neither joined the default active set


def test_pair_rewards_pads_both_sides_alike():
    tok = CharTokenizer()
    base = tiny_llama()
    rm = RewardModel(base, r=4)
    _perturb(base, "rm")
    rows = encode(tok, [{"prompt": "ab", "chosen": "a much longer answer", "rejected": "no"}])
    batch = collate(rows, 0)
    rc, rr = pair_rewards(rm, batch, 0)
    c_alone = rm(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    r_alone = rm(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    assert torch.allclose(rc, c_alone, atol=1e-5) and torch.allclose(rr, r_alone, atol=1e-5)
