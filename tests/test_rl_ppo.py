"""surgery.rl.ppo: GAE and whitening against a hand computation, the value delta and head on the shared
base, policy + value in one BatchSplit forward equal to two plain ones, a rule reward learnt on a tiny
Llama (KL to the reference 0 before the first update), only the policy / value deltas and head
trained, the base untouched, bad configs refused."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.errors import ConfigError
from surgery.rl.ppo import PPO, gae, whiten
from surgery.rl.reward import RewardModel
from surgery.rl.rollout import rollout
from tests._helpers import state_bits
from tests.models import CharTokenizer, tiny_llama

PROMPTS = ["hello there", "write a word", "the cat sat", "why so", "ok then", "what now", "yes", "no way"]


def count_a(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(c.count("a")) for c in completions]


def policy() -> torch.nn.Module:
    model = tiny_llama()
    # the tiny model's lm_head (std 0.02) bounds its logits near 0: a LoRA there lets the policy move
    surgery.inject(model, "lora", targets=["*_proj", "lm_head"], r=8)
    return model


def make(model: torch.nn.Module, **kw) -> PPO:
    args = {"reward": count_a, "tokenizer": CharTokenizer(), "max_new_tokens": 12, "value_targets": "*_proj"} | kw
    return PPO(model, **args)


def base_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_bits(model).items() if ".surgery." not in k}


def test_gae_and_whiten_by_hand():
    # row 0: a prompt token, three completion tokens, padding; row 1: two prompt tokens, two completion tokens
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.float)
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0], [0.0, 0.0, 0.3, -0.5, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.4, 0.2, 0.0], [0.0, 0.0, -0.1, 0.3, 0.0]])
    g, lam = 0.9, 0.8
    # row 0 by hand, backwards from the last token (the value past it is 0)
    d3 = 1.0 - 0.2
    d2 = -0.2 + g * 0.2 - 0.4
    d1 = 0.1 + g * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    b3 = -0.5 - 0.3
    b2 = 0.3 + g * 0.3 + 0.1 + g * lam * b3
    adv, ret = gae(rewards, values, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0], [0.0, 0.0, b2, b3, 0.0]]))
    torch.testing.assert_close(
        ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.2, 0.0], [0.0, 0.0, b2 - 0.1, b3 + 0.3, 0.0]])
    )
    w = whiten(adv, mask)
    x = torch.tensor([a1, a2, a3, b2, b3])
    want = (x - x.mean()) / x.var(unbiased=False).sqrt()
    torch.testing.assert_close(w[mask.bool()], want, atol=1e-5, rtol=1e-5)
    assert w[~mask.bool()].abs().max() == 0


def test_batch_split_forward_equals_two_forwards():
    model = policy()
    ppo = make(model, batch_split=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("default", "v"):
            for ad in surgery.engine.adapters(model, name).values():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.1)
    torch.manual_seed(0)
    ro = rollout(model, PROMPTS[:4], tokenizer=CharTokenizer(), max_new_tokens=8)
    with torch.no_grad():
        split = ppo.forward(ro)
        ppo.batch_split = False
        plain = ppo.forward(ro)
        # and against each role alone under plain use(), the value head over the final hidden states
        with surgery.use(model, "v"):
            hidden = model(
                input_ids=ro.input_ids, attention_mask=ro.attention_mask, output_hidden_states=True
            ).hidden_states[-1]
    for a, b in zip(split, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    v = ppo.head(hidden).squeeze(-1)
    want = torch.cat([torch.zeros(4, 1), v[:, :-1]], 1) * ro.mask
    torch.testing.assert_close(split[2], want, atol=1e-5, rtol=1e-5)


def test_batch_split_runs_beside_head_deltas():
    model = policy()
    ppo = make(model, batch_split=True)
    torch.manual_seed(0)
    ro = rollout(model, PROMPTS[:2], tokenizer=CharTokenizer(), max_new_tokens=4)
    with torch.no_grad():
        ppo.forward(ro)
    assert ppo.batch_split


def test_ppo_learns_a_rule_reward():
    model, tok = policy(), CharTokenizer()
    before_base = base_of(model)
    torch.manual_seed(123)
    ro = rollout(model, PROMPTS * 4, tokenizer=tok, max_new_tokens=12)
    before = sum(count_a([], [tok.decode(c) for c in ro.completions])) / len(ro.completions)
    torch.manual_seed(0)
    ppo = make(model, lr=2e-2, kl=0.05, ppo_epochs=2)
    assert surgery.active(model) == ("default",)  # the value delta stays out of plain calls
    stats = ppo.train(PROMPTS, steps=20, batch_size=8)
    torch.manual_seed(123)
    ro = rollout(model, PROMPTS * 4, tokenizer=tok, max_new_tokens=12)
    after = sum(count_a([], [tok.decode(c) for c in ro.completions])) / len(ro.completions)
    assert stats[0]["kl"] == 0.0  # the rollout's policy is the base (LoRA B = 0)
    assert stats[-1]["kl"] > 0.1
    assert before < 1.0 and after > before + 4.0, (before, after, [round(s["reward"], 2) for s in stats])
    base_after = base_of(model)
    assert all(torch.equal(before_base[k], base_after[k]) for k in before_base)
    deltas = ("default", "v", "v-head")  # the policy, the value LoRA, the value head
    want = {p for n in deltas for ad in surgery.engine.adapters(model, n).values() for p in ad.parameters()}
    assert set(ppo.optimizer.param_groups[0]["params"]) == want
    assert set(ppo.head.parameters()) <= want


def test_reward_model_on_the_same_base_is_not_trained():
    model = policy()
    rm = RewardModel(model, delta="rm", r=4, targets="*_proj")
    rm_before = [p.detach().clone() for p in rm.parameters()]
    # asked to split: the reward head's tap on the backbone makes it fall back to two forwards (engine gap)
    ppo = make(model, reward=rm, lr=1e-2, ppo_epochs=1, minibatch=2, max_new_tokens=6, batch_split=True)
    stats = ppo.step(PROMPTS[:4])
    assert set(stats) == {"reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy", "length"}
    assert all(torch.equal(a, b) for a, b in zip(rm_before, rm.parameters(), strict=True))
    again = make(model, reward=rm)  # a second PPO on the same value delta continues it, with its head
    assert again.head is ppo.head


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"value": "default"}, "names the policy delta"),
        ({"delta": "nope"}, "has no delta 'nope'"),
        ({"kl": -0.1}, "kl >= 0"),
        ({"clip": 1.5, "lam": 2.0}, "0 <= lam <= 1, 0 < clip < 1"),
        ({"ppo_epochs": 0}, "ppo_epochs >= 1"),
        ({"reward": "count"}, "reward functions must be"),
    ],
)
def test_bad_configs_refused(kw, words):
    model = policy()
    names = surgery.names(model)
    with pytest.raises(ConfigError, match=words):
        make(model, **kw)
    assert surgery.names(model) == names  # nothing injected by a refused config


def test_existing_non_value_delta_refused():
    model = policy()
    surgery.inject(model, "lora", targets="*_proj", name="v", r=2)
    with pytest.raises(ConfigError, match="'v' exists and is not part of a value delta"):
        make(model)
    surgery.heads(model, {"x": 1}, name="w-head")
    with pytest.raises(ConfigError, match="'w-head' exists and is not part of a value delta"):
        make(model, value="w")


def test_ppo_reference_with_the_sft_delta_kept_on():
    model, tok = tiny_llama(), CharTokenizer()
    surgery.inject(model, "lora", targets=["*_proj", "lm_head"], r=8, name="sft")
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "sft").values():
            ad.lora_B.normal_(0, 0.1)
    surgery.apply(model, surgery.delta(model, "sft"), name="pol")
    torch.manual_seed(0)
    kw = dict(delta="pol", reward=count_a, tokenizer=tok, max_new_tokens=8, ppo_epochs=1, lr=1e-2)
    seen: list = []
    stats = PPO(model, ref_delta="sft", **kw).train(
        PROMPTS, steps=2, batch_size=4, on_step=lambda i, rec: seen.append((i, rec))
    )
    assert seen == list(enumerate(stats))  # every step's record, in order, as it is made
    assert stats[0]["kl"] == 0.0 and stats[1]["kl"] != 0.0  # the copy starts at the reference
    with pytest.raises(ConfigError, match="value='sft' is also ref_delta"):
        PPO(model, value="sft", ref_delta="sft", **kw)


@pytest.mark.parametrize(
    ("kw", "words"), [({"steps": 0}, "steps >= 1"), ({"steps": 1, "on_step": 3}, "on_step must be a callable")]
)
def test_train_refuses_bad_steps_before_any_work(kw, words):
    model = policy()
    ppo = make(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=words):
        ppo.train(PROMPTS, batch_size=4, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
