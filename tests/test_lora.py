"""LoRA: initialisation, the math (against hand-written formulas and against PEFT), scaling,
per-site patterns, dropout, and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import bits, randomize, run
from models import TinyTransformer, batch_for, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgery
from surgery import engine

peft = pytest.importorskip("peft")

# ---------------------------------------------------------------- the five site kinds


def _kinds():
    g = torch.Generator().manual_seed(0)
    return {
        "linear": (lambda: nn.Sequential(nn.Linear(16, 12)), lambda: torch.randn(3, 5, 16, generator=g)),
        "conv1d_tf": (lambda: nn.Sequential(Conv1D(12, 16)), lambda: torch.randn(3, 5, 16, generator=g)),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, padding=1)), lambda: torch.randn(2, 4, 9, generator=g)),
        "conv2d": (
            lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1)),
            lambda: torch.randn(2, 3, 9, 9, generator=g),
        ),
        "embedding": (
            lambda: nn.Sequential(nn.Embedding(20, 8, padding_idx=0)),
            lambda: torch.randint(0, 20, (3, 7), generator=g),
        ),
    }


KINDS = list(_kinds())


def _build(kind):
    torch.manual_seed(0)
    make, inp = _kinds()[kind]
    return make(), inp()


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_injection_leaves_outputs_unchanged(kind, init):
    model, x = _build(kind)
    before = run(model, x)
    inj = surgery.inject(model, "lora", targets="0", r=3, init=init)
    assert inj.sites == ("0",)
    after = run(model, x)
    assert torch.equal(before, after)
    ad = engine.adapters(model, "default")["0"]
    # one factor starts at zero, the other does not (else nothing could ever be learned)
    a_zero = not ad.lora_A.detach().any()
    b_zero = not ad.lora_B.detach().any()
    assert a_zero != b_zero


def test_default_init_is_kaiming_uniform_a_b_zero():
    model = nn.Sequential(nn.Linear(400, 300))
    surgery.inject(model, "lora", targets="0", r=16)
    ad = engine.adapters(model, "default")["0"]
    A = ad.lora_A.detach()
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert A.abs().max() <= bound + 1e-7
    assert A.abs().max() > 0.9 * bound
    assert A.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not ad.lora_B.detach().any()


def test_gaussian_init():
    model = nn.Sequential(nn.Linear(500, 300))
    surgery.inject(model, "lora", targets="0", r=4, init="gaussian")
    ad = engine.adapters(model, "default")["0"]
    assert ad.lora_A.detach().std() == pytest.approx(1 / 4, rel=0.05)
    assert not ad.lora_B.detach().any()


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_layout(kind):
    model, _ = _build(kind)
    r = 3
    surgery.inject(model, "lora", targets="0", r=r)
    base = model[0]
    ad = engine.adapters(model, "default")["0"]
    if kind == "linear":
        want_a, want_b = (r, 16), (12, r)
    elif kind == "conv1d_tf":
        want_a, want_b = (r, 16), (12, r)  # Conv1D(nf=12, nx=16): in 16, out 12
    elif kind == "conv1d":
        want_a, want_b = (r, 4, 3), (6, r, 1)
    elif kind == "conv2d":
        want_a, want_b = (r, 3, 3, 3), (5, r, 1, 1)
    else:
        want_a, want_b = (r, 20), (8, r)
    assert tuple(ad.lora_A.shape) == want_a
    assert tuple(ad.lora_B.shape) == want_b
    d = surgery.delta(model)
    assert {k: tuple(v.shape) for k, v in d.tensors.items()} == {"0.lora_A.weight": want_a, "0.lora_B.weight": want_b}
    assert isinstance(base, type(_build(kind)[0][0]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_contribution_matches_formula(kind, rslora):
    """y = base(x) + s * B A x, s = alpha / r (alpha / sqrt(r) with rslora), per kind, by hand."""
    model, x = _build(kind)
    r, alpha = 4, 6.0
    base_out = run(model, x)
    surgery.inject(model, "lora", targets="0", r=r, alpha=alpha, rslora=rslora)
    randomize(model, std=0.3)
    ad = engine.adapters(model, "default")["0"]
    s = alpha / (math.sqrt(r) if rslora else r)
    assert ad.scale == pytest.approx(s)
    A, B = ad.lora_A.detach(), ad.lora_B.detach()
    m = model[0]
    if kind in ("linear", "conv1d_tf"):
        extra = s * (x @ A.T @ B.T)
    elif kind == "conv1d":
        extra = s * F.conv1d(F.conv1d(x, A, None, m.stride, m.padding), B)
    elif kind == "conv2d":
        extra = s * F.conv2d(F.conv2d(x, A, None, m.stride, m.padding), B)
    else:
        extra = s * (A.T[x] @ B.T)
    torch.testing.assert_close(run(model, x), base_out + extra, atol=1e-5, rtol=1e-5)


def test_scale_default_alpha_is_8():
    model = nn.Sequential(nn.Linear(8, 8))
    surgery.inject(model, "lora", targets="0", r=4)
    assert engine.adapters(model, "default")["0"].scale == pytest.approx(8 / 4)
    model = nn.Sequential(nn.Linear(8, 8))
    surgery.inject(model, "lora", targets="0", r=4, rslora=True)
    assert engine.adapters(model, "default")["0"].scale == pytest.approx(8 / 2)


# ---------------------------------------------------------------- equivalence with PEFT


def _peft_adapters(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Site path -> (A, B, scaling) of PEFT's 'default' adapter, in PEFT's storage layout."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            if "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            else:
                A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            out[path] = (A, B, mod.scaling["default"])
    return out


def check_peft_equivalence(factory, x, ours_targets, peft_cfg: dict, ours_cfg: dict, atol=1e-5):
    from peft import LoraConfig, get_peft_model

    ours, ref = factory(), factory()
    pm = get_peft_model(ref, LoraConfig(**peft_cfg)).eval()
    theirs = _peft_adapters(pm)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for A, B, _ in theirs.values():
            A.copy_(torch.randn(A.shape, generator=g) * 0.2)
            B.copy_(torch.randn(B.shape, generator=g) * 0.2)
    inj = surgery.inject(ours, "lora", targets=ours_targets, **ours_cfg)
    assert sorted(inj.sites) == sorted(theirs), "not the same sites as PEFT"
    ads = engine.adapters(ours, "default")
    with torch.no_grad():
        for path, (A, B, scaling) in theirs.items():
            assert ads[path].lora_A.shape == A.shape and ads[path].lora_B.shape == B.shape, path
            assert ads[path].scale == pytest.approx(scaling), path
            ads[path].lora_A.copy_(A)
            ads[path].lora_B.copy_(B)
    got, want = run(ours, x), run(pm, x)
    base = run(factory(), x)
    assert (want - base).abs().max() > 1e-3, "the adapters do not change the output: test is vacuous"
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    _check_same_grads(ours, pm, x, ads, theirs)
    return ours, pm


def _loss(model, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    y = out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out)
    return (y.float() ** 2).mean()


def _check_same_grads(ours, pm, x, ads, theirs) -> None:
    """Gradients of A and B equal PEFT's: the in-place update of the output is autograd-correct."""
    for m in (ours, pm):
        m.zero_grad(set_to_none=True)
        _loss(m, x).backward()
    for path, (A, B, _) in theirs.items():
        for mine, ref, what in ((ads[path].lora_A, A, "A"), (ads[path].lora_B, B, "B")):
            assert mine.grad is not None and ref.grad is not None, f"{path}.{what}: no gradient"
            torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=f"{path}.lora_{what} grad")


def test_peft_equivalence_linear_llama():
    m = tiny_llama()
    check_peft_equivalence(
        tiny_llama,
        batch_for(m),
        ["q_proj", "v_proj", "o_proj", "gate_proj"],
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"]),
        dict(r=4, alpha=16),
    )


def test_peft_equivalence_conv1d_gpt2():
    m = tiny_gpt2()
    check_peft_equivalence(
        tiny_gpt2,
        batch_for(m),
        ["c_attn", "c_proj", "c_fc"],
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        dict(r=4, alpha=8),
    )


def test_peft_equivalence_embedding():
    m = tiny_llama()
    check_peft_equivalence(
        tiny_llama,
        batch_for(m),
        ["embed_tokens"],
        dict(r=4, lora_alpha=12, target_modules=["embed_tokens"]),
        dict(r=4, alpha=12),
    )


def test_peft_equivalence_embedding_gpt2_tied():
    m = tiny_gpt2()
    check_peft_equivalence(
        tiny_gpt2,
        batch_for(m),
        ["wte", "c_attn"],
        dict(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
        dict(r=2, alpha=4),
    )


class ConvNet(nn.Module):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = self.proj(h)  # [b, 6, h, w]
        h = F.relu(self.seq(h.flatten(2)))  # [b, 6, hw]
        return self.head(h.mean(-1))


def _conv_input():
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))


def test_peft_equivalence_conv2d():
    check_peft_equivalence(
        ConvNet,
        _conv_input(),
        ["conv1", "conv2", "proj"],
        dict(r=3, lora_alpha=6, target_modules=["conv1", "conv2", "proj"]),
        dict(r=3, alpha=6),
    )


def test_peft_equivalence_conv1d_and_linear_plain():
    check_peft_equivalence(
        ConvNet,
        _conv_input(),
        ["seq", "head"],
        dict(r=2, lora_alpha=5, target_modules=["seq", "head"]),
        dict(r=2, alpha=5),
    )


def test_peft_equivalence_rslora():
    m = tiny_llama()
    check_peft_equivalence(
        tiny_llama,
        batch_for(m),
        ["q_proj", "v_proj", "down_proj"],
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=4, alpha=16, rslora=True),
    )


def test_peft_equivalence_rank_and_alpha_patterns():
    m = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    rank_pattern = {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6}
    alpha_pattern = {"v_proj": 32, "down_proj": 3}
    ours, _ = check_peft_equivalence(
        tiny_llama,
        batch_for(m),
        targets,
        dict(r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern),
        dict(r=4, alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern),
    )
    ranks = {p: ad.lora_A.shape[0] for p, ad in engine.adapters(ours, "default").items()}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.self_attn.q_proj": 2,
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.v_proj": 6,
        "model.layers.0.mlp.down_proj": 4,
        "model.layers.1.mlp.down_proj": 4,
    }


def test_peft_equivalence_rslora_with_patterns():
    m = tiny_llama()
    targets = ["q_proj", "v_proj"]
    check_peft_equivalence(
        tiny_llama,
        batch_for(m),
        targets,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=targets,
            rank_pattern={"v_proj": 9},
            alpha_pattern={"q_proj": 2},
        ),
        dict(r=4, alpha=8, rslora=True, rank_pattern={"v_proj": 9}, alpha_pattern={"q_proj": 2}),
    )


@pytest.mark.parametrize("which", ["llama", "gpt2", "conv"])
def test_merged_weights_match_peft_merge(which):
    """Our merged base weight equals PEFT's merge_and_unload weight (checks the merge layouts:
    [out, in], GPT-2's transposed Conv1D, convolution kernels, embeddings)."""
    if which == "llama":
        factory, x, targets, extra = tiny_llama, batch_for(tiny_llama()), ["q_proj", "down_proj", "embed_tokens"], {}
    elif which == "gpt2":
        factory, x, targets, extra = tiny_gpt2, batch_for(tiny_gpt2()), ["c_attn", "c_fc"], {"fan_in_fan_out": True}
    else:
        factory, x, targets, extra = ConvNet, _conv_input(), ["conv1", "conv2", "seq"], {}
    ours, pm = check_peft_equivalence(
        factory, x, targets, dict(r=3, lora_alpha=7, target_modules=targets, **extra), dict(r=3, alpha=7)
    )
    surgery.merge(ours, "default")
    merged_ref = pm.merge_and_unload()
    ref_sd = merged_ref.state_dict()
    for path in engine.adapters(ours, "default"):
        w = ours.get_submodule(path).weight
        torch.testing.assert_close(w, ref_sd[path + ".weight"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- dropout


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(4, 32)
    base = run(model, x)
    surgery.inject(model, "lora", targets="0", r=4, dropout=0.5)
    randomize(model, std=0.5)
    ad = engine.adapters(model, "default")["0"]
    want = base + ad.scale * (x @ ad.lora_A.detach().T @ ad.lora_B.detach().T)
    model.eval()
    e1, e2 = run(model, x), run(model, x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, want, atol=1e-5, rtol=1e-5)
    model.train()
    t1, t2 = run(model, x), run(model, x)
    assert not torch.equal(t1, t2)
    assert not torch.allclose(t1, want, atol=1e-3)
    # dropout acts on the LoRA branch only: with B zero, training mode gives the base output exactly
    with torch.no_grad():
        ad.lora_B.zero_()
    assert torch.equal(run(model, x), base)


def test_dropout_expectation_is_unbiased():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    x = torch.randn(1, 16).expand(4000, 16).contiguous()
    surgery.inject(model, "lora", targets="0", r=4, dropout=0.3)
    randomize(model, std=0.5)
    model.train()
    mean_train = run(model, x).mean(0)
    model.eval()
    torch.testing.assert_close(mean_train, run(model, x)[0], atol=0.1, rtol=0.1)


def test_no_dropout_is_deterministic_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(4, 32)
    surgery.inject(model, "lora", targets="0", r=4)
    randomize(model)
    model.train()
    assert torch.equal(run(model, x), run(model, x))


# ---------------------------------------------------------------- training


def test_training_updates_only_lora_and_loss_falls():
    torch.manual_seed(0)
    model = TinyTransformer()
    base_bits = {k: bits(v) for k, v in model.state_dict().items()}
    inj = surgery.inject(model, "lora", targets=["q", "v", "fc1", "fc2"], r=4, alpha=8)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora_ids = {id(p) for ad in engine.adapters(model, "default").values() for p in (ad.lora_A, ad.lora_B)}
    assert {id(p) for _, p in trainable} == lora_ids
    assert len(lora_ids) == 2 * len(inj.sites)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=3e-2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (8, 12), generator=g)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if id(p) in lora_ids:
                assert p.grad is not None, n
            else:
                assert p.grad is None, f"base parameter {n} got a gradient"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True)), losses
    # the base weights did not move; the LoRA tensors did
    for k, v in model.state_dict().items():
        if k in base_bits:
            assert torch.equal(bits(v), base_bits[k]), k
    assert any(ad.lora_B.detach().any() for ad in engine.adapters(model, "default").values())
    surgery.remove(model)
    assert all(torch.equal(bits(v), base_bits[k]) for k, v in model.state_dict().items())


def test_half_precision_base_trains_fp32_lora():
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    surgery.inject(model, "lora", targets="0", r=2)
    randomize(model)
    ad = engine.adapters(model, "default")["0"]
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ad.lora_A.grad is not None and ad.lora_B.grad is not None
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert ad.lora_A.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16


def test_lora_does_not_mutate_outputs_other_hooks_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    kept = {}
    model[0].register_forward_hook(lambda mod, args, out: kept.__setitem__("out", out))
    x = torch.randn(2, 8)
    base = run(model, x).clone()
    surgery.inject(model, "lora", targets="0", r=2)
    randomize(model)
    y = run(model, x)
    assert not torch.allclose(y, base)
    assert torch.equal(kept["out"], base), "a tensor another hook holds was changed in place"


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_site_called_with_keyword_input(kind):
    model, x = _build(kind)
    surgery.inject(model, "lora", targets="0", r=2)
    randomize(model)
    with torch.no_grad():
        want = model[0](x)
        got = model[0](input=x)
    torch.testing.assert_close(got, want)


def test_adapters_follow_the_models_train_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    surgery.inject(model, "lora", targets="0", r=2, dropout=0.5)
    randomize(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)), "dropout ran in eval mode"
    model.train()
    assert all(ad.training for ad in engine.adapters(model, "default").values())


def test_shared_input_projection_matches_separate_sites_and_keeps_its_group():
    """q, k, v (and gate, up) read one tensor: their A projections run as one GEMM; o_proj,
    under the same parent with the same width but another input, projects alone. The group
    never changes, so the first call gives the very bits of later ones."""
    import copy

    from surgery.methods.lora import _SharedInput

    model = tiny_llama()
    x = batch_for(model)
    ref = copy.deepcopy(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    surgery.inject(model, "lora", targets=targets, r=4)
    surgery.inject(ref, "lora", targets=targets, r=4)
    randomize(model)
    for path, ad in engine.adapters(ref, "default").items():  # same tensors, no grouping
        src = engine.adapters(model, "default")[path]
        with torch.no_grad():
            ad.lora_A.copy_(src.lora_A)
            ad.lora_B.copy_(src.lora_B)
        ad.shared = None
    first = run(model, x)
    for _ in range(2):
        out = run(model, x)
        assert torch.equal(out, first)
        torch.testing.assert_close(out, run(ref, x), atol=1e-5, rtol=1e-5)
    ads = engine.adapters(model, "default")
    q = ads["model.layers.0.self_attn.q_proj"]
    assert isinstance(q.shared, _SharedInput)
    names = {
        p.rsplit(".", 1)[-1] for p, a in ads.items() if a.shared is q.shared and any(m is a for m in q.shared.members)
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}, names
    assert not q.shared.pending  # o_proj took its entry out (and projected alone)
    # gradients equal too
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        _loss(m, x).backward()
    for path, ad in engine.adapters(ref, "default").items():
        torch.testing.assert_close(ads[path].lora_A.grad, ad.lora_A.grad, atol=1e-5, rtol=1e-4)
    twin = copy.deepcopy(model)  # nothing in flight blocks a copy
    tq = engine.adapters(twin, "default")["model.layers.0.self_attn.q_proj"]
    tk = engine.adapters(twin, "default")["model.layers.0.self_attn.k_proj"]
    assert tq.shared is tk.shared and tq.shared is not q.shared  # one group per copy, its own
    assert any(m is tk for m in tq.shared.members)
    assert torch.equal(run(twin, x), run(model, x))


def test_shared_input_projection_is_per_input_across_threads():
    """Two threads run one delta on different inputs at once: a slice computed for one
    thread's input is never used for the other's."""
    import threading

    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], r=4)
    randomize(model)
    xs = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        want = [model(input_ids=x).logits for x in xs]
    barrier, errors = threading.Barrier(2), []

    def work(i: int) -> None:
        try:
            for _ in range(25):
                barrier.wait()
                with torch.no_grad():
                    got = model(input_ids=xs[i]).logits
                torch.testing.assert_close(got, want[i], atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
