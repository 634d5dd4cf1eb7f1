"""DiffPruning: a toy task learned, the L0 penalty lowering the expected density, finalize reaching the target
exactly as a sparse delta (outputs against weights edited by hand), disable / merge exact, bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_state_equal, state_bits
from models import batch_for, tiny_gpt2, tiny_llama, tiny_mlp
from torch import nn

import surgery
from surgery import engine
from surgery.errors import ConfigError, InjectionError
from surgery.methods import diffpruning as dp

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
Y = (X[:, :4] * 2).argmax(-1)  # a toy task the random MLP does not know


def _loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(X), Y)


def _train(model: nn.Module, lam: float, steps: int = 60) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        task = _loss(model)
        (task + lam * dp.l0_loss(model, "dp") / dp.numel(model, "dp")).backward()
        opt.step()
        losses.append(float(task.detach()))
    model.eval()
    return losses


def _injected(lam: float, **cfg) -> nn.Module:
    torch.manual_seed(0)  # the gates' noise
    model = tiny_mlp()
    surgery.inject(model, "diffpruning", name="dp", init_log_alpha=1.0, **cfg)
    _train(model, lam)
    return model


@torch.no_grad()
def _by_hand(base: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    ref = copy.deepcopy(base)
    for path, (idx, vals) in pairs.items():
        w = ref.get_submodule(path).weight
        for i, v in zip(idx.tolist(), vals.tolist(), strict=True):  # one entry at a time: no scatter involved
            w.view(-1)[i] += v
    return ref


def test_learns_and_the_l0_penalty_lowers_the_density() -> None:
    base = tiny_mlp()
    free, pruned = _injected(0.0), _injected(2.0)
    with torch.no_grad():
        assert float(_loss(free)) < 0.5 * float(_loss(base))
        assert float(_loss(pruned)) < 0.7 * float(_loss(base))
    start = torch.sigmoid(torch.tensor(1.0)).item()  # the expected density at injection
    assert dp.expected_density(pruned, "dp") < 0.7 * dp.expected_density(free, "dp")
    assert dp.expected_density(pruned, "dp") < 0.7 * start
    # the penalty of the last forward is the sum of sigmoid(log_alpha) (stretch (-1.5, 1.5): log(-g/z) = 0)
    pruned(X)
    want = sum(torch.sigmoid(ad.log_alpha).sum() for ad in engine.adapters(pruned, "dp").values())
    torch.testing.assert_close(dp.l0_loss(pruned, "dp"), want)


def test_finalize_reaches_the_target_as_a_sparse_delta() -> None:
    model = _injected(2.0, sparsity=0.05)
    base = tiny_mlp()
    gated = {p: ad.dense().detach() for p, ad in engine.adapters(model, "dp").items()}
    with pytest.warns(UserWarning, match=r"gates kept \d+\.\d+% of the entries, more than the target"):
        got = dp.finalize(model, "dp")
    d = surgery.delta(model, "dp")
    assert d.method == "sparse" and set(k.rsplit(".", 1)[1] for k in d.tensors) == {"indices", "values"}
    pairs = {}
    for path, dense in gated.items():
        idx, vals = d.tensors[f"{path}.indices"], d.tensors[f"{path}.values"]
        k = round(0.05 * dense.numel())
        assert idx.dtype == torch.int32 and idx.numel() == k and int(vals.count_nonzero()) == k
        # the k largest |z * w| of the gated difference, by sorting, not topk
        order = dense.abs().reshape(-1).sort(descending=True)
        assert set(idx.tolist()) == set(order.indices[:k].tolist())
        assert torch.equal(vals, dense.reshape(-1)[idx.long()])
        pairs[path] = (idx, vals)
    total = sum(t.numel() for t in gated.values())
    assert got["density"] == sum(round(0.05 * t.numel()) for t in gated.values()) / total == got["nonzero"]
    assert got["gates_density"] > got["density"]
    with torch.no_grad():
        torch.testing.assert_close(model(X), _by_hand(base, pairs)(X), rtol=0, atol=1e-6)


def test_global_projection_and_the_fixed_mask_phase() -> None:
    model = _injected(2.0, sparsity=0.05)
    projected = copy.deepcopy(model)
    with pytest.warns(UserWarning):
        dp.finalize(projected, "dp", per_tensor=False)
        got = dp.finalize(model, "dp", per_tensor=False, steps=20, train_step=_loss, lr=0.01)
    for a, b in zip(engine.adapters(model, "dp").values(), engine.adapters(projected, "dp").values(), strict=True):
        assert torch.equal(a.indices, b.indices)  # the mask stayed fixed
    ads = engine.adapters(model, "dp")
    total = sum(model.get_submodule(p).weight.numel() for p in ads)
    assert sum(ad.indices.numel() for ad in ads.values()) == round(0.05 * total) == round(got["density"] * total)
    with torch.no_grad():
        assert float(_loss(model)) < 0.9 * float(_loss(projected))  # the kept entries trained further
    nothing = tiny_mlp()
    surgery.inject(nothing, "diffpruning", name="dp", sparsity=1.0)
    assert dp.finalize(nothing, "dp")["nonzero"] == 0.0  # no warning: the target holds every entry


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("structured", [False, True])
def test_outputs_disable_merge_unmerge(factory, structured) -> None:
    model = factory()
    before = state_bits(model)
    batch = batch_for(model)
    with torch.no_grad():
        want_base = model(**batch).logits
    surgery.inject(model, "diffpruning", name="dp", structured=structured)
    g = torch.Generator().manual_seed(1)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, ad in engine.adapters(model, "dp").items():
            ad.diff.copy_(torch.randn(ad.diff.shape, generator=g) * 0.1)
            ad.log_alpha.copy_(torch.randn(ad.log_alpha.shape, generator=g) * 3)
            w, la = ref.get_submodule(path).weight, ad.log_alpha
            if structured:
                assert la.numel() == ad.diff.shape[1 if factory is tiny_gpt2 else 0]
            w += (torch.sigmoid(la) * 3 - 1.5).clamp(0, 1) * ad.diff
        want = surgery.remove(ref) or ref(**batch).logits
        got = model(**batch).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        with surgery.disable(model):
            assert torch.equal(model(**batch).logits, want_base)
        surgery.merge(model, "dp")
        torch.testing.assert_close(model(**batch).logits, got, rtol=0, atol=1e-5)
        surgery.unmerge(model, "dp")
        assert torch.equal(model(**batch).logits, got)
    surgery.remove(model, "dp")
    assert_state_equal(before, state_bits(model))


def test_training_samples_the_gates() -> None:
    model = tiny_mlp()
    surgery.inject(model, "diffpruning", name="dp", init_log_alpha=0.0)
    with torch.no_grad():
        for ad in engine.adapters(model, "dp").values():
            ad.diff.fill_(0.1)
        model.train()
        a, b = model(X), model(X)
        model.eval()
        c, d = model(X), model(X)
    assert not torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"sparsity": 0}, "sparsity"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": True}, "sparsity"),
        ({"temperature": 0}, "temperature"),
        ({"stretch": (0.1, 1.5)}, "stretch"),
        ({"structured": "rows"}, "structured"),
    ],
)
def test_bad_config_leaves_the_model(cfg, words) -> None:
    model = tiny_mlp()
    before = state_bits(model)
    with pytest.raises(ConfigError, match=words):
        surgery.inject(model, "diffpruning", name="dp", **cfg)
    assert engine.names(model) == [] and set(state_bits(model)) == set(before)
    assert_state_equal(before, state_bits(model))


def test_bad_finalize_leaves_the_delta() -> None:
    model = tiny_mlp()
    surgery.inject(model, "diffpruning", name="dp")
    surgery.inject(model, "lora", targets="fc1", name="lo")
    with pytest.raises(ConfigError, match="not diffpruning"):
        dp.finalize(model, "lo")
    with pytest.raises(ConfigError, match="no delta named 'x'"):
        dp.finalize(model, "x")
    with pytest.raises(ConfigError, match="train_step"):
        dp.finalize(model, "dp", steps=3)
    with pytest.raises(ConfigError, match="steps"):
        dp.finalize(model, "dp", steps=-1)
    surgery.merge(model, "dp")
    with pytest.raises(InjectionError, match="is merged"):
        dp.finalize(model, "dp")
    surgery.unmerge(model, "dp")
    assert engine.method_of(model, "dp").name == "diffpruning"
    surgery.activate(model, "lo")
    dp.finalize(model, "dp")  # what is active stays as it was: here, the LoRA alone
    assert engine.method_of(model, "dp").name == "sparse" and engine.active(model) == ("lo",)


def test_l0_loss_over_the_active_deltas() -> None:
    model = tiny_mlp()
    assert float(dp.l0_loss(model)) == 0.0  # nothing injected
    surgery.inject(model, "diffpruning", name="a", targets="fc1", init_log_alpha=0.0)
    surgery.inject(model, "diffpruning", name="b", targets="fc2", init_log_alpha=0.0)
    with torch.no_grad():
        model(X)
    assert (
        float(dp.l0_loss(model)) == 0.5 * (16 * 32 + 32 * 32) == float(dp.l0_loss(model, "a") + dp.l0_loss(model, "b"))
    )
    surgery.activate(model, "b")
    assert float(dp.l0_loss(model)) == 0.5 * 32 * 32


def test_stored_and_applied_back() -> None:
    model = tiny_gpt2()
    surgery.inject(model, "diffpruning", name="dp", structured=True, stretch=(-0.5, 1.2))
    with torch.no_grad():
        for ad in engine.adapters(model, "dp").values():
            ad.diff.normal_(0, 0.1)
            ad.log_alpha.normal_(0, 2)
        want = model(**batch_for(model)).logits
    fresh = tiny_gpt2()
    surgery.apply(fresh, surgery.delta(model, "dp"))
    with torch.no_grad():
        assert torch.equal(fresh(**batch_for(fresh)).logits, want)
