"""torch.compile of an injected model: compiled outputs equal eager ones, and dynamo compiles
one graph per active set (no graph break at every site, no recompile per adapter).

The active set lives in a ContextVar, which dynamo cannot read: the model's root hook pins it
once per call (one graph break there) and the sites read that plain, guarded value."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import VOCAB, TinyTransformer, _seeded, decoder_kw

import surgery

dynamo = pytest.importorskip("torch._dynamo")

TOL = 1e-5


def _llama_1layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**{**decoder_kw(), "num_hidden_layers": 1})))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _trained_looking(model) -> None:
    """Give every injected tensor non-zero values (LoRA's B starts at zero: the delta would be a no-op)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    # hitting the recompile limit must fail the test, not fall back to eager quietly
    with dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        yield
    dynamo.reset()


def _graph_breaks() -> dict[str, int]:
    return dict(dynamo.utils.counters["graph_break"])


def test_llama_lora_compiled_equals_eager_across_use_disable_merge():
    model = _llama_1layer()
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, name="a")
    surgery.inject(model, "lora", targets=["q_proj", "v_proj", "o_proj"], r=2, name="b")
    _trained_looking(model)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. dynamo's recompile-limit warning
        base = None
        with surgery.disable(model):
            base = _logits(model, x)
        both = _logits(model, x)
        assert (both - base).abs().max() > 1e-3  # the deltas change the output: the checks below can fail
        torch.testing.assert_close(_logits(compiled, x), both, atol=TOL, rtol=0)
        for _ in range(3):  # switching back and forth reuses the graphs compiled for each set
            with surgery.use(model, "a"):
                torch.testing.assert_close(_logits(compiled, x), _logits(model, x), atol=TOL, rtol=0)
            with surgery.use(model, "b"):
                only_b = _logits(model, x)
                torch.testing.assert_close(_logits(compiled, x), only_b, atol=TOL, rtol=0)
            with surgery.disable(model):
                torch.testing.assert_close(_logits(compiled, x), base, atol=TOL, rtol=0)
            torch.testing.assert_close(_logits(compiled, x), both, atol=TOL, rtol=0)
        graphs_after_switching = dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs_after_switching == 4  # one per active set: (a, b), (a,), (b,), ()

        surgery.merge(model, "a")
        torch.testing.assert_close(_logits(compiled, x), both, atol=TOL, rtol=0)
        surgery.unmerge(model, "a")
        torch.testing.assert_close(_logits(compiled, x), both, atol=TOL, rtol=0)
        with surgery.use(model, "b"):
            torch.testing.assert_close(_logits(compiled, x), only_b, atol=TOL, rtol=0)
    # the only graph break is the root hook reading the context; none at the sites
    breaks = _graph_breaks()
    assert sum(breaks.values()) == 1, breaks
    assert "_pin" in next(iter(breaks))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_plain_model_one_graph_per_active_set_and_training(method: str):
    model = TinyTransformer(layers=1)
    surgery.inject(model, method, name="a")
    surgery.inject(model, method, name="b")
    _trained_looking(model)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager")
    for names in [("a", "b"), ("a",), ("b",), (), ("a", "b"), ("b",)]:
        with torch.no_grad(), surgery.use(model, *names):
            torch.testing.assert_close(compiled(x), model(x), atol=TOL, rtol=0)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 4
    # training through the compiled model: the same gradients as eager
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(x).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_composition_blocks_under_compile_do_not_recompile_per_call():
    model = TinyTransformer(layers=1)
    surgery.inject(model, "adapter", name="a")
    surgery.inject(model, "lora", name="b")
    _trained_looking(model)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for _ in range(10):  # a new but equal block object on every call: interned, no recompile
            with surgery.use(model, surgery.Average("a", "b", weights=[0.3, 0.7])):
                torch.testing.assert_close(compiled(x), model(x), atol=TOL, rtol=0)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
