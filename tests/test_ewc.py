"""EWC: the per-example Fisher (vmap against a loop of batch-size-1 gradients, not batch-mean squaring),
the penalty, online / separate consolidation, state round trip, bad input, and a two-task toy run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

import surgery
from surgery.errors import ConfigError
from surgery.recipes.ewc import EWC, default_loss


def padded(model: nn.Module, n: int = 4, seq: int = 8, seed: int = 0) -> dict:
    """A dict batch with labels whose examples have different lengths (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    mask = (torch.arange(seq) < torch.tensor([seq, seq - 3, seq, 2][:n]).unsqueeze(1)).long()
    if getattr(model.config, "num_labels", 2) == 3 and "Sequence" in type(model).__name__:
        labels = torch.randint(0, 3, (n,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loop_fisher(model: nn.Module, batches: list, loss_of) -> dict[str, torch.Tensor]:
    """The reference: one backward per example (each a batch of one), gradients squared and averaged."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    model.eval()
    for b in batches:
        n_ex = len(b["labels"]) if isinstance(b, dict) else len(b[1])
        for j in range(n_ex):
            one = {k: v[j : j + 1] for k, v in b.items()} if isinstance(b, dict) else (b[0][j : j + 1], b[1][j : j + 1])
            grads = torch.autograd.grad(loss_of(model, one), list(params.values()), allow_unused=True)
            for n, g in zip(params, grads, strict=True):
                if g is not None:
                    total[n] += g.square()
            count += 1
    return {n: t / count for n, t in total.items()}


def batch_mean_fisher(model: nn.Module, batches: list, loss_of) -> dict[str, torch.Tensor]:
    """The common bug: the gradient of each batch's mean loss, squared, averaged over batches."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        grads = torch.autograd.grad(loss_of(model, b), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                total[n] += g.square()
    return {n: t / len(batches) for n, t in total.items()}


def hf_loss(model: nn.Module, b: dict) -> torch.Tensor:
    return model(**b).loss


def ce_loss(model: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def mlp_batches(
    seed: int = 0, n: int = 24, size: int = 8, shift: float = 0.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g) + shift
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9, msg=k)


def total(d: dict[str, torch.Tensor]) -> float:
    return float(sum(t.sum() for t in d.values()))


# ----------------------------------------------------------------------------- the Fisher


@pytest.mark.parametrize("make", [tiny_bert_cls, tiny_llama, tiny_gpt2], ids=["bert_cls", "llama", "gpt2"])
def test_vmap_fisher_equals_a_loop_of_batch_size_one_gradients(make) -> None:
    model = make()
    batches = [padded(model, seed=0), padded(model, seed=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the loop: vmap ran the model
        ewc = EWC(model, batches)
    assert ewc.per_example == "vmap" and ewc.examples == [8]
    ref = loop_fisher(model, batches, hf_loss)
    assert_close(ewc.tasks[0]["fisher"], ref)
    bug = batch_mean_fisher(model, batches, hf_loss)
    assert total(bug) < 0.7 * total(ref)  # squaring batch means lets examples cancel: the bug is far off


def test_tuple_batches_plain_model_and_chunking() -> None:
    model, batches = mlp(), mlp_batches()
    ref = loop_fisher(model, batches, ce_loss)
    for chunk in (None, 1, 3):
        assert_close(EWC(model, batches, chunk_size=chunk).tasks[0]["fisher"], ref)
    assert_close(EWC(model, batches, ce_loss).tasks[0]["fisher"], ref)  # an explicit loss_fn
    bug = batch_mean_fisher(model, batches, ce_loss)
    assert total(bug) < 0.7 * total(ref)
    assert EWC(model, batches[0]).examples == [8]  # a single (inputs, target) batch


def test_only_trainable_parameters_so_lora_state_is_small() -> None:
    model = tiny_llama()
    surgery.inject(model, "lora", targets="q_proj", r=2, name="a")
    ewc = EWC(model, [padded(model)])
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ewc.names == lora and len(lora) == 4  # A and B of q_proj in two layers; the base is frozen
    state = ewc.state()
    numel = sum(t.numel() for k, t in state.items() if k != "__meta__")
    assert numel == 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert numel < 0.02 * sum(p.numel() for p in model.parameters())
    assert_close(ewc.tasks[0]["fisher"], loop_fisher(model, [padded(model)], hf_loss))
    from transformers import BatchEncoding

    one = EWC(model, BatchEncoding(padded(model)))  # a tokenizer's output (a Mapping) as the single batch
    assert_close(one.tasks[0]["fisher"], ewc.tasks[0]["fisher"])


def test_true_fisher_approaches_the_expectation_over_the_models_labels() -> None:
    model, (x, _) = mlp(), mlp_batches(n=8, size=8)[0]
    params = dict(model.named_parameters())
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    for j in range(len(x)):  # sum over y of p(y|x) * (d log p(y|x))^2, per example
        probs = model(x[j : j + 1]).softmax(-1)[0].detach()
        for y in range(3):
            grads = torch.autograd.grad(F.cross_entropy(model(x[j : j + 1]), torch.tensor([y])), list(params.values()))
            for n, g in zip(params, grads, strict=True):
                exact[n] += probs[y] * g.square() / len(x)
    reps = [(x, torch.zeros(8, dtype=torch.long))] * 400  # the labels are ignored: drawn from the model
    est = EWC(model, reps, fisher="true").tasks[0]["fisher"]
    assert abs(total(est) / total(exact) - 1) < 0.05
    flat_e, flat_x = torch.cat([t.flatten() for t in est.values()]), torch.cat([t.flatten() for t in exact.values()])
    assert torch.corrcoef(torch.stack([flat_e, flat_x]))[0, 1] > 0.98
    assert total(EWC(model, [(x, _)]).tasks[0]["fisher"]) != pytest.approx(total(exact))  # empirical differs


def test_true_fisher_on_a_causal_lm_ignores_padding() -> None:
    model = tiny_llama()
    b = padded(model)
    ewc = EWC(model, [b], fisher="true")
    assert ewc.per_example == "vmap" and total(ewc.tasks[0]["fisher"]) > 0


class Branchy(nn.Module):
    """A forward with data-dependent Python control flow, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 2 if x.sum() > 0 else self.lin(x)


def test_models_vmap_cannot_run_fall_back_to_a_per_example_loop_with_a_note() -> None:
    model, batches = Branchy(), mlp_batches()
    with pytest.warns(RuntimeWarning, match="vmap cannot run this model.*loop over the examples"):
        ewc = EWC(model, batches)
    assert ewc.per_example == "loop"
    assert_close(ewc.tasks[0]["fisher"], loop_fisher(model, batches, ce_loss))


def test_the_loop_fallback_on_a_padded_hf_batch_equals_the_reference() -> None:
    model, b = tiny_bert_cls(), padded(tiny_bert_cls())

    def branchy_loss(m: nn.Module, batch: dict) -> torch.Tensor:
        loss = m(**batch).loss
        return loss * 2 if batch["labels"].sum() > 0 else loss  # data-dependent: vmap refuses it

    with pytest.warns(RuntimeWarning, match="vmap cannot run"):
        ewc = EWC(model, [b], branchy_loss)
    assert ewc.per_example == "loop"
    assert_close(ewc.tasks[0]["fisher"], loop_fisher(model, [b], branchy_loss))


def test_fisher_in_eval_mode_leaves_mode_and_grads_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 3)).train()
    batches = mlp_batches()
    a, b = EWC(model, batches), EWC(model, batches)
    assert_close(a.tasks[0]["fisher"], b.tasks[0]["fisher"])  # no dropout noise
    assert model.training and all(p.grad is None for p in model.parameters())
    assert_close(a.tasks[0]["fisher"], loop_fisher(model, batches, ce_loss))


# ----------------------------------------------------------------------------- penalty, consolidate


def test_penalty_zero_at_anchor_formula_gradient_and_optimizer() -> None:
    model, batches = mlp(), mlp_batches()
    ewc = EWC(model, batches, lam=3.0)
    assert ewc.penalty(model).item() == 0.0
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    fisher, anchor = ewc.tasks[0]["fisher"], ewc.tasks[0]["anchor"]
    params = dict(model.named_parameters())
    want = sum(1.5 * (fisher[n] * (p - anchor[n]).square()).sum() for n, p in params.items())
    pen = ewc.penalty(model)
    torch.testing.assert_close(pen, want)
    pen.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 3.0 * fisher[n] * (p - anchor[n]).detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = pen.item()
    for _ in range(3):
        opt.zero_grad()
        ewc.penalty(model).backward()
        opt.step()
    assert ewc.penalty(model).item() < before


def shifted(model: nn.Module, by: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_online_consolidate_decays_the_old_fisher_and_moves_the_anchor() -> None:
    model, data_a, data_b = mlp(), mlp_batches(0), mlp_batches(1, shift=1.0)
    ewc = EWC(model, data_a, mode="online", decay=0.5)
    f_a = {k: v.clone() for k, v in ewc.tasks[0]["fisher"].items()}
    shifted(model)  # "trained on task B"
    ewc.consolidate(model, data_b)
    f_b = loop_fisher(model, data_b, ce_loss)
    assert len(ewc.tasks) == 1 and ewc.examples == [48]
    assert_close(ewc.tasks[0]["fisher"], {k: 0.5 * f_a[k] + f_b[k] for k in f_a})
    assert ewc.penalty(model).item() == 0.0  # anchored at the current parameters


def test_separate_keeps_one_fisher_and_anchor_per_task_and_sums_penalties() -> None:
    model, data_a, data_b = mlp(), mlp_batches(0), mlp_batches(1, shift=1.0)
    ewc = EWC(model, data_a, mode="separate")
    only_a = EWC(model, data_a)
    shifted(model)
    ewc.consolidate(model, data_b)
    assert len(ewc.tasks) == 2 and ewc.examples == [24, 24]
    assert_close(ewc.tasks[1]["fisher"], loop_fisher(model, data_b, ce_loss))
    torch.testing.assert_close(ewc.penalty(model), only_a.penalty(model))  # task B's term is zero here
    shifted(model)
    assert ewc.penalty(model).item() > only_a.penalty(model).item() > 0


# ----------------------------------------------------------------------------- state


def test_state_round_trip_and_meta() -> None:
    model = tiny_llama()
    surgery.inject(model, "lora", targets="v_proj", r=2, name="a")
    ewc = EWC(model, [padded(model)], mode="separate", lam=7.0)
    shifted(model, 0.01)
    ewc.consolidate(model, [padded(model, seed=3)])
    state = ewc.state()
    meta = state["__meta__"]
    assert meta["mode"] == "separate" and meta["lam"] == 7.0 and meta["params"] == ewc.names
    assert meta["examples"] == [4, 4] and meta["kind"] == "surgery.EWC/1"
    assert all(isinstance(t, torch.Tensor) for k, t in state.items() if k != "__meta__")
    other = tiny_llama()
    surgery.inject(other, "lora", targets="v_proj", r=2, name="a")
    back = EWC.from_state(other, {k: (v.clone() if k != "__meta__" else v) for k, v in state.items()})
    torch.testing.assert_close(back.penalty(model), ewc.penalty(model))
    assert (back.mode, back.lam, back.examples) == ("separate", 7.0, [4, 4])


def test_state_for_another_model_or_parameter_set_is_refused() -> None:
    model = tiny_llama()
    surgery.inject(model, "lora", targets="v_proj", r=2, name="a")
    state = EWC(model, [padded(model)]).state()
    gpt = tiny_gpt2()
    surgery.inject(gpt, "lora", r=2, name="a")
    with pytest.raises(ConfigError, match="another model|architecture"):
        EWC.from_state(gpt, state)
    wider = tiny_llama()
    surgery.inject(wider, "lora", targets="v_proj", r=4, name="a")
    with pytest.raises(ConfigError, match="another parameter set"):
        EWC.from_state(wider, state)
    other_name = tiny_llama()
    surgery.inject(other_name, "lora", targets="v_proj", r=2, name="b")
    with pytest.raises(ConfigError, match="no parameter"):
        EWC.from_state(other_name, state)
    with pytest.raises(ConfigError, match="disagree"):
        EWC.from_state(model, {k: v for k, v in state.items() if not k.startswith("anchor.0.")})
    with pytest.raises(ConfigError, match="not an EWC state"):
        EWC.from_state(model, {k: v for k, v in state.items() if k != "__meta__"})
    with pytest.raises(ConfigError, match="mode"):
        EWC.from_state(model, {**state, "__meta__": {**state["__meta__"], "mode": "both"}})


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_and_nothing_is_half_applied() -> None:
    model, data = mlp(), mlp_batches()
    with pytest.raises(ConfigError, match="no examples.*after that task"):
        EWC(model, [])
    with pytest.raises(ConfigError, match="mode must be 'online'.*'separate'"):
        EWC(model, data, mode="both")
    for decay in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match=r"decay must be in \(0, 1\]"):
            EWC(model, data, decay=decay)
    with pytest.raises(ConfigError, match="lam"):
        EWC(model, data, lam=float("nan"))
    with pytest.raises(ConfigError, match="fisher must be"):
        EWC(model, data, fisher="exact")
    with pytest.raises(ConfigError, match="batch 0 is a Tensor"):
        EWC(model, [torch.randn(4, 10)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a ConfigError is raised as is, not retried in a loop
        with pytest.raises(ConfigError, match="needs 'labels'"):
            EWC(nn.Sequential(nn.Linear(10, 3)), {"input": torch.randn(4, 10)}, lambda m, b: default_loss(m, b))
    frozen = mlp()
    surgery.freeze(frozen)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        EWC(frozen, data)
    ewc = EWC(model, data)
    before = {k: v.clone() for k, v in ewc.tasks[0]["fisher"].items()}
    shifted(model)
    with pytest.raises(ConfigError, match="no examples"):
        ewc.consolidate(model, iter([]))
    assert_close(ewc.tasks[0]["fisher"], before)
    assert ewc.examples == [24] and ewc.penalty(model).item() > 0  # anchor unchanged


# ----------------------------------------------------------------------------- continual learning


def two_tasks(seed: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 10, generator=g)
    x = torch.randn(512, 10, generator=g) + shift
    return x, (x @ w.T).argmax(1)


def test_ewc_keeps_task_a_better_than_plain_sequential_training() -> None:
    (xa, ya), (xb, yb) = two_tasks(1, 3.0), two_tasks(2, -3.0)

    def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ewc: EWC | None = None) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for s in range(300):
            i = s * 32 % 256  # the first 256 examples train, the last 256 test
            loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            loss = loss + ewc.penalty(model) if ewc is not None else loss
            opt.zero_grad()
            loss.backward()
            opt.step()

    def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(x[256:]).argmax(1) == y[256:]).float().mean().item()

    results = {}
    for lam in (0.0, 100.0):
        model = mlp()
        train(model, xa, ya)
        a_before = acc(model, xa, ya)
        ewc = EWC(model, [(xa[i : i + 64], ya[i : i + 64]) for i in range(0, 256, 64)], lam=lam)
        train(model, xb, yb, ewc if lam else None)
        results[lam] = (a_before, acc(model, xa, ya), acc(model, xb, yb))
    (a0, plain_a, plain_b), (_, ewc_a, ewc_b) = results[0.0], results[100.0]
    assert a0 > 0.9 and plain_b > 0.9
    assert a0 - plain_a > 0.3  # plain sequential training forgets task A
    assert ewc_a > plain_a + 0.2 and ewc_b > 0.8  # EWC keeps much of A and still learns B
