"""surgery.rl.logprobs and surgery.rl.losses: log-probabilities against a plain log_softmax over the
full logits, and the preference losses against TRL 1.16's formulas (its ORPO code called directly)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from models import CharTokenizer, TinyTransformer, tiny_gpt2, tiny_llama

import surgery
from surgery.errors import ConfigError
from surgery.rl import data as D
from surgery.rl.logprobs import label_logprobs, logprobs, token_logprobs
from surgery.rl.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss


def naive(model, ids, mask, labels):
    """log p(labels[t] | ids[:t]) from the whole log_softmax, 0 where masked: the definition."""
    out = model(input_ids=ids) if mask is None else model(input_ids=ids, attention_mask=mask)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1) * (labels != -100)


def rows():
    return [
        {"prompt": "copy abc", "chosen": "abc", "rejected": "cba, no"},
        {"prompt": "copy hello there", "chosen": "hello there", "rejected": "x"},
        {"prompt": "hi", "chosen": "hi back", "rejected": "go away now"},
    ]


def batch():
    return D.collate(D.encode(CharTokenizer(), rows(), max_length=48), pad_id=0)


def test_label_logprobs_gradient_is_exact():
    x = torch.randn(2, 5, 7, dtype=torch.double, requires_grad=True)
    labels = torch.tensor([[1, -100, 3, 4, 0], [-100, 6, 2, 2, -100]])
    assert torch.autograd.gradcheck(lambda x: label_logprobs(x, labels), (x,))
    want = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    assert torch.allclose(label_logprobs(x, labels), want)


def test_label_logprobs_of_bf16_logits_in_fp32():
    x = torch.randn(2, 4, 50).bfloat16()
    labels = torch.randint(0, 50, (2, 4))
    got = label_logprobs(x, labels)
    assert got.dtype == torch.float32
    want = torch.log_softmax(x.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_token_logprobs_equal_full_log_softmax(factory):
    model = factory()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    labels[2, :6] = -100
    got = token_logprobs(model, ids, mask, labels)
    assert got.shape == ids.shape
    assert torch.allclose(got, naive(model, ids, mask, labels), atol=1e-5)
    assert (got[labels == -100] == 0).all() and (got[:, 0] == 0).all()


def test_token_logprobs_left_padding_equals_right_padding():
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = ids.clone()
    labels[:, :3] = -100
    right = token_logprobs(model, ids, torch.ones_like(ids), labels)
    left_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    left_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    left_labels = torch.cat([torch.full((1, 2), -100), labels], 1)
    left = token_logprobs(model, left_ids, left_mask, left_labels)
    assert torch.allclose(left[:, 2:], right, atol=1e-5)


def test_token_logprobs_of_a_plain_module_returning_logits():
    model = TinyTransformer()
    ids = torch.randint(3, 100, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    assert torch.allclose(token_logprobs(model, ids, None, labels), naive(model, ids, None, labels), atol=1e-5)


def test_logprobs_one_forward_equals_separate_rows():
    model, b = tiny_llama(), batch()
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    c, r = logprobs(model, b)
    assert calls == [6]  # chosen and rejected rows in one forward
    for side, got in (("chosen", c), ("rejected", r)):
        ids, mask, labels = (b[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        want = naive(model, ids, mask, labels).sum(-1)
        assert torch.allclose(got, want, atol=1e-5)
    cm, rm = logprobs(model, b, average=True)
    n = (b["chosen_labels"] != -100).sum(-1)
    assert torch.allclose(cm, c / n) and rm is not None
    sft = {k: v for k, v in b.items() if k.startswith("chosen_")}
    c2, none = logprobs(model, sft)
    assert none is None and torch.allclose(c2, c, atol=1e-5)


def test_logprobs_under_a_prompt_delta_count_from_the_end():
    """A prompt delta prepends virtual positions to the logits: the completion's are the last ones."""
    model, b = tiny_llama(), batch()
    surgery.inject(model, "prompt", n_tokens=4, name="p")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    c, r = logprobs(model, b)
    ids, mask, labels = b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_labels"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]
    want = (
        torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
    ).sum(-1)
    assert torch.allclose(c, want, atol=1e-5)
    with surgery.disable(model):
        assert not torch.allclose(logprobs(model, b)[0], c)


def test_logprobs_gradients_reach_the_delta_only():
    model, b = tiny_llama(), batch()
    surgery.inject(model, "lora", targets="@linear", r=2, name="l")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    c, r = logprobs(model, b)
    (c - r).sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_logprobs_refuse_bad_batches():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="collate"):
        logprobs(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
    b = batch()
    b["chosen_labels"] = torch.full_like(b["chosen_labels"], -100)
    with pytest.raises(ConfigError, match="no completion token"):
        token_logprobs(model, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_labels"])


# ----------------------------------------------------------------------------- losses vs TRL's formulas


def sample(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.double) * 20 + 1) for _ in range(4)]


def test_dpo_loss_is_trls_sigmoid_loss():
    pc, pr, rc, rr = sample()
    beta = 0.3
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    delta = (pc - rc) - (pr - rr)  # TRL DPOTrainer._compute_loss, loss_type="sigmoid"
    assert torch.allclose(loss, (-F.logsigmoid(beta * delta)).mean())
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    assert m["rewards_chosen"] == pytest.approx(float(cr.mean()))
    assert m["rewards_rejected"] == pytest.approx(float(rj.mean()))
    assert m["margin"] == pytest.approx(float((cr - rj).mean()))
    assert m["accuracy"] == pytest.approx(float((cr > rj).double().mean()))
    eps = 0.2  # conservative DPO (TRL's pre-1.0 sigmoid with label_smoothing; "robust" without its rescale)
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    want = (-(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)).mean()
    assert torch.allclose(smooth, want)


def test_dpo_loss_at_the_reference_is_log2_and_its_gradient():
    pc, pr = sample(4)[:2]
    pc.requires_grad_(True)
    loss, m = dpo_loss(pc, pr, pc.detach(), pr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and m["accuracy"] == 0.0
    loss.backward()
    assert torch.allclose(pc.grad, torch.full_like(pc, -0.1 * 0.5 / 4))  # -beta * sigmoid(0) / n


def test_ipo_loss_is_trls_length_normalised_form():
    pc, pr, rc, rr = sample()
    n_c, n_r = torch.tensor([3.0, 5, 2, 7, 1, 4]).double(), torch.tensor([2.0, 2, 9, 3, 6, 1]).double()
    beta = 0.5
    loss, _ = ipo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=beta)  # what logprobs(average=True) gives
    ipo_delta = (pc - rc) / n_c - (pr - rr) / n_r  # TRL: chosen_scores / chosen_mask.sum(1), same for rejected
    assert torch.allclose(loss, ((ipo_delta - 1 / (2 * beta)) ** 2).mean())


def test_kto_loss_is_trls_unpaired_form():
    pc, pr, rc, rr = sample()
    pc, rc, pr, rr = pc[:4], rc[:4], pr[:2], rr[:2]  # 4 desirable, 2 undesirable rows
    kl_rows = torch.tensor([0.5, -0.1, 0.9]).double()
    beta, wd, wu = 0.2, 1.0, 1.5
    loss, m = kto_loss(pc, pr, rc, rr, kl_rows, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    kl = kl_rows.mean().clamp(min=0)  # TRL: (KL_logps - ref_KL_logps).mean().detach().clamp(min=0)
    want = torch.cat(
        [wd * (1 - torch.sigmoid(beta * ((pc - rc) - kl))), wu * (1 - torch.sigmoid(beta * (kl - (pr - rr))))]
    )
    assert torch.allclose(loss, want.mean())
    assert m["kl"] == pytest.approx(float(kl)) and math.isnan(m["accuracy"])
    neg, _ = kto_loss(pc, pr, rc, rr, -3.0, beta=beta)  # a negative estimate clamps to 0
    zero, _ = kto_loss(pc, pr, rc, rr, 0.0, beta=beta)
    assert torch.equal(neg, zero)
    only_good, _ = kto_loss(pc, pr[:0], rc, rr[:0], 0.0, beta=beta)
    assert torch.allclose(only_good, (1 - torch.sigmoid(beta * (pc - rc))).mean())


def test_orpo_loss_equals_trls_odds_ratio_loss(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(1)
    pc = -torch.rand(6, generator=g) * 3 - 0.01  # mean per-token log-probs, both sides of -log 2
    pr = -torch.rand(6, generator=g) * 3 - 0.01
    nll = torch.tensor(1.7)
    beta = 0.25
    loss, m = orpo_loss(pc, pr, nll, beta=beta)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, ratio, _ = ORPOTrainer.odds_ratio_loss(trainer, pc, pr)
    assert torch.allclose(loss, nll - losses.mean())  # ORPOTrainer.get_batch_loss_metrics
    assert m["rewards_chosen"] == pytest.approx(float(chosen_rewards.mean()))
    assert m["accuracy"] == pytest.approx(float((chosen_rewards > rejected_rewards).float().mean()))
    assert m["log_odds_ratio"] == pytest.approx(float(ratio))


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), "0.1"])
def test_losses_refuse_bad_beta(beta):
    pc, pr, rc, rr = sample()
    for call in (
        lambda: dpo_loss(pc, pr, rc, rr, beta=beta),
        lambda: ipo_loss(pc, pr, rc, rr, beta=beta),
        lambda: kto_loss(pc, pr, rc, rr, 0.0, beta=beta),
        lambda: orpo_loss(pc, pr, torch.tensor(1.0), beta=beta),
    ):
        with pytest.raises(ConfigError, match="beta must be"):
            call()


def test_losses_refuse_mismatched_shapes():
    pc, pr, rc, rr = sample()
    with pytest.raises(ConfigError, match="one shape"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ConfigError, match="one shape"):
        ipo_loss(pc, pr, rc[:2], rr)
    with pytest.raises(ConfigError, match="1-d"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ConfigError, match="one shape"):
        kto_loss(pc, pr, rc[:3], rr, 0.0)
    with pytest.raises(ConfigError, match="no desirable"):
        kto_loss(pc[:0], pr[:0], rc[:0], rr[:0], 0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="scalar"):
        orpo_loss(pc, pr, torch.ones(2))
