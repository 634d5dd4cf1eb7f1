"""surgery.rl.rollout and GRPO: sampled completions as scored sequences, group advantages by hand, a
rule reward learnt on a tiny Llama with the reference the same base (KL 0 before the first update),
the base untouched, bad configs refused."""

from __future__ import annotations

import math

import pytest
import torch

import surgery
from surgery.errors import ConfigError
from surgery.rl import data
from surgery.rl.grpo import GRPO, aggregate, group_advantages
from surgery.rl.logprobs import token_logprobs
from surgery.rl.reward import RewardModel
from surgery.rl.rollout import rollout, score
from tests._helpers import state_bits
from tests.models import CharTokenizer, tiny_llama

PROMPTS = ["hello there", "write a word", "the cat sat", "why so"]


def count_a(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(c.count("a")) for c in completions]


def policy() -> torch.nn.Module:
    model = tiny_llama()
    # the tiny model's lm_head (std 0.02) bounds its logits near 0: a LoRA there lets the policy move
    surgery.inject(model, "lora", targets=["*_proj", "lm_head"], r=8)
    return model


def sampled_reward(model: torch.nn.Module, tok: CharTokenizer, seed: int = 123) -> float:
    torch.manual_seed(seed)
    ro = rollout(model, PROMPTS * 8, tokenizer=tok, max_new_tokens=12)
    return sum(count_a([], [tok.decode(c) for c in ro.completions])) / len(ro.completions)


def base_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_bits(model).items() if ".surgery." not in k}


def test_rollout_sequences_match_generate():
    model, tok = policy(), CharTokenizer()
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "default").values():
            ad.lora_B.normal_(0, 0.1)  # a policy unlike the base
    torch.manual_seed(0)
    ro = rollout(model, PROMPTS, tokenizer=tok, max_new_tokens=10)
    # the same draw straight from generate(), with the scores it sampled from
    torch.manual_seed(0)
    batch = data.prompts([data.Encoded(data.prompt_ids(tok, p), [], []) for p in PROMPTS], 2)
    with surgery.use(model, "default"):
        out = model.generate(
            **batch,
            max_new_tokens=10,
            do_sample=True,
            top_k=0,
            eos_token_id=2,
            pad_token_id=2,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    for i, comp in enumerate(ro.completions):
        row = new[i].tolist()
        assert comp == row[: row.index(2) + 1 if 2 in row else len(row)]
        assert ro.input_ids[i, : len(ro.prompts[i]) + len(comp)].tolist() == ro.prompts[i] + comp
        assert ro.labels[i].tolist() == [-100] * len(ro.prompts[i]) + comp + [-100] * (
            ro.labels.shape[1] - len(ro.prompts[i]) - len(comp)
        )
    # the re-packed (right-padded) sequences score as generate() saw them (left-padded, with a cache)
    with surgery.use(model, "default"), torch.no_grad():
        lp = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.labels)
    for i, comp in enumerate(ro.completions):
        want = torch.stack([torch.log_softmax(out.scores[t][i], -1)[tok_id] for t, tok_id in enumerate(comp)])
        start = len(ro.prompts[i])
        torch.testing.assert_close(lp[i, start : start + len(comp)], want, atol=1e-5, rtol=1e-5)


def test_missing_eos_penalty():
    model, tok = policy(), CharTokenizer()
    with torch.no_grad():  # eos (id 2) likely: about half the completions end within 3 tokens
        model.lm_head.surgery.default.lora_B[2].fill_(1.0)
        model.lm_head.surgery.default.lora_A.fill_(0.0)
        model.lm_head.surgery.default.lora_A[:, 0].fill_(1.0)
    torch.manual_seed(0)
    ro = rollout(model, PROMPTS * 4, tokenizer=tok, max_new_tokens=3)
    assert ro.ended == [c[-1] == 2 for c in ro.completions]
    assert 0 < sum(ro.ended) < len(ro.ended)  # both kinds present
    base = score([count_a], [1.0], ro, tok)
    want = base - 0.5 * torch.tensor([0.0 if e else 1.0 for e in ro.ended])
    torch.testing.assert_close(score([count_a], [1.0], ro, tok, missing_eos_penalty=0.5), want)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 2.0])
    std1 = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased, as TRL
    std2 = math.sqrt((0.5**2 * 3 + 1.5**2) / 3)
    want = [-1.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 1.5 / (std1 + 1e-4)]
    want += [-0.5 / (std2 + 1e-4)] * 3 + [1.5 / (std2 + 1e-4)]
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(want))
    torch.testing.assert_close(
        group_advantages(r, 4, scale=False), torch.tensor([-1.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5, 1.5])
    )
    assert group_advantages(torch.ones(4), 2).abs().max() == 0  # equal rewards: no signal, no NaN


def test_loss_aggregation_by_hand():
    per_token = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 4.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # 3 tokens, then 1
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "dr_grpo", max_new_tokens=5).item() == pytest.approx(10 / (2 * 5))


def test_grpo_learns_a_rule_reward():
    model, tok = policy(), CharTokenizer()
    before_base = base_of(model)
    before = sampled_reward(model, tok)
    torch.manual_seed(0)
    grpo = GRPO(model, reward_funcs=[count_a], group=8, lr=2e-2, tokenizer=tok, max_new_tokens=12, beta=0.04)
    stats = grpo.train(PROMPTS, steps=14, batch_size=2)
    after = sampled_reward(model, tok)
    assert stats[0]["kl"] == 0.0  # the policy is the base until its first update (LoRA B = 0)
    assert stats[-1]["kl"] > 0.01
    assert before < 1.0 and after > before + 4.0, (before, after)
    base_after = base_of(model)
    assert all(torch.equal(before_base[k], base_after[k]) for k in before_base)
    assert set(grpo.optimizer.param_groups[0]["params"]) == {
        p for ad in surgery.engine.adapters(model, "default").values() for p in ad.parameters()
    }


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_minibatches_accumulate_to_the_whole_batch(loss_type):
    tok, after, stats = CharTokenizer(), [], []
    for minibatch in (None, 3):  # 8 completions: one forward, or 3 + 3 + 2
        model = policy()
        torch.manual_seed(0)
        kw = {"group": 4, "lr": 1e-2, "beta": 0.1, "loss_type": loss_type, "minibatch": minibatch}
        grpo = GRPO(model, reward_funcs=[count_a], tokenizer=tok, max_new_tokens=6, **kw)
        grpo.step(PROMPTS[:2])  # a first update, so that the second one has a KL term
        stats.append(grpo.step(PROMPTS[2:]))
        after.append([p.detach().clone() for p in grpo.params])
    for k in ("loss", "kl", "entropy", "reward"):
        assert stats[0][k] == pytest.approx(stats[1][k], rel=1e-4, abs=1e-6), k
    for a, b in zip(*after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_reward_model_and_rule_together():
    model, tok = policy(), CharTokenizer()
    rm = RewardModel(model, delta="rm", r=4, targets="*_proj")
    rm_before = [p.detach().clone() for p in rm.parameters()]
    torch.manual_seed(0)
    ro = rollout(model, PROMPTS, tokenizer=tok, max_new_tokens=6)
    with torch.no_grad():
        want = 0.5 * rm(ro.input_ids, ro.attention_mask) + 2.0 * torch.tensor(
            count_a([], [tok.decode(c) for c in ro.completions])
        )
    torch.testing.assert_close(score([rm, count_a], [0.5, 2.0], ro, tok), want)
    grpo = GRPO(
        model, reward_funcs=[rm, count_a], reward_weights=[0.5, 2.0], group=4, lr=1e-2, tokenizer=tok, max_new_tokens=6
    )
    stats = grpo.step(PROMPTS[:2])
    assert math.isfinite(stats["loss"]) and stats["length"] > 0
    assert all(
        torch.equal(a, b) for a, b in zip(rm_before, rm.parameters(), strict=True)
    )  # the reward delta is not trained


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"group": 1}, "group must be >= 2"),
        ({"minibatch": 0}, "minibatch must be >= 1"),
        ({"loss_type": "sum"}, "loss_type must be one of"),
        ({"beta": -1.0}, "beta >= 0"),
        ({"clip": 1.5, "top_p": 0.0}, "0 < clip < 1, 0 < top_p <= 1"),
        ({"delta": "nope"}, "has no delta 'nope'"),
        ({"reward_funcs": []}, "reward functions must be"),
        ({"reward_funcs": [count_a], "reward_weights": [1.0, 2.0]}, "2 reward_weights for 1 reward functions"),
    ],
)
def test_bad_configs_refused(kw, words):
    model = policy()
    args = {"reward_funcs": [count_a], "tokenizer": CharTokenizer()} | kw
    with pytest.raises(ConfigError, match=words):
        GRPO(model, **args)


def test_merged_or_frozen_policy_and_bad_rewards_refused():
    model, tok = policy(), CharTokenizer()
    surgery.merge(model, "default")
    with pytest.raises(ConfigError, match="is merged"):
        GRPO(model, reward_funcs=[count_a], tokenizer=tok)
    surgery.unmerge(model, "default")
    lora = [p for ad in surgery.engine.adapters(model, "default").values() for p in ad.parameters()]
    for p in lora:
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable tensors"):
        GRPO(model, reward_funcs=[count_a], tokenizer=tok)
    for p in lora:
        p.requires_grad_(True)
    grpo = GRPO(model, reward_funcs=[lambda p, c: [1.0]], group=2, tokenizer=tok, max_new_tokens=3)
    with pytest.raises(ConfigError, match="gave 1 rewards for 4 completions"):
        grpo.step(PROMPTS[:2])
    with pytest.raises(ConfigError, match="need tokenizer="):
        GRPO(model, reward_funcs=[count_a], group=2).step(PROMPTS[:2])


def sft_and_copy() -> torch.nn.Module:
    """A "tuned" SFT LoRA and the policy "pol", a copy of it (TRL's reference adapter recipe)."""
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["*_proj", "lm_head"], r=8, name="sft")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "sft").values():
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.1)
    surgery.apply(model, surgery.delta(model, "sft"), name="pol")
    return model


@pytest.mark.parametrize("ref_delta", [None, "sft"])
def test_reference_with_the_sft_delta_kept_on(ref_delta):
    model, tok = sft_and_copy(), CharTokenizer()
    sft_before = {k: v.clone() for k, v in surgery.delta(model, "sft").tensors.items()}
    torch.manual_seed(0)
    grpo = GRPO(model, delta="pol", ref_delta=ref_delta, reward_funcs=[count_a], group=4, lr=2e-2, tokenizer=tok)
    seen: list = []
    stats = grpo.train(PROMPTS, steps=2, batch_size=2, on_step=lambda i, rec: seen.append((i, rec)))
    assert seen == list(enumerate(stats))
    if ref_delta is None:  # against the base, the copied SFT policy is already far off
        assert stats[0]["kl"] > 1e-3
    else:  # against the SFT delta it starts where the reference is
        assert stats[0]["kl"] == 0.0 and stats[1]["kl"] > 0.0
    after = surgery.delta(model, "sft").tensors
    assert all(torch.equal(sft_before[k], after[k]) for k in sft_before)


def test_ref_delta_refused_when_it_is_the_policy():
    model = sft_and_copy()
    with pytest.raises(ConfigError, match=r"policy delta 'pol' is also ref_delta.*train a copy"):
        GRPO(model, delta="pol", ref_delta=["sft", "pol"], reward_funcs=[count_a])
    with pytest.raises(ConfigError, match="ref_delta must be None"):
        GRPO(model, delta="pol", ref_delta=3, reward_funcs=[count_a])
