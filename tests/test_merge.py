"""Merge / unmerge: exact restore of the base bits, merged == unmerged outputs, stacks of
deltas, and the errors of merge, unmerge and of switching a merged delta off."""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import assert_snapshot_equal, assert_state_equal, bits, randomize, run, snapshot, state_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TinyTransformer, batch_for, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgery
from surgery import engine
from surgery.errors import InjectionError, MergeError, SurgeryError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["linear", "conv1d_tf", "conv1d", "conv2d", "embedding"]
# SURGERY_HYPOTHESIS_EXAMPLES=500 for a deeper search than the default quick run
FAST = settings(
    max_examples=int(os.environ.get("SURGERY_HYPOTHESIS_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_site(kind: str, a: int, b: int, k: int, seed: int, wscale: float) -> tuple[nn.Module, torch.Tensor]:
    """A container with one site "0" of `kind`, float32, and an input for it."""
    torch.manual_seed(seed)
    if kind == "linear":
        m, x = nn.Linear(a, b), torch.randn(3, a)
    elif kind == "conv1d_tf":
        m, x = Conv1D(b, a), torch.randn(3, a)
        nn.init.normal_(m.bias)
    elif kind == "conv1d":
        m, x = nn.Conv1d(a, b, k, padding=k // 2), torch.randn(2, a, 7)
    elif kind == "conv2d":
        m, x = nn.Conv2d(a, b, k, padding=k // 2), torch.randn(2, a, 6, 5)
    else:
        m, x = nn.Embedding(a + 2, b), torch.randint(0, a + 2, (3, 4))
    with torch.no_grad():
        m.weight.mul_(wscale)
    return nn.Sequential(m), x


def inject_random(model: nn.Module, r: int, seed: int, std: float, name: str = "default", **cfg) -> None:
    surgery.inject(model, "lora", targets="0", name=name, r=r, **cfg)
    randomize(model, name, seed=seed, std=std)


shapes = st.integers(1, 24)


@FAST
@given(
    kind=st.sampled_from(KINDS),
    a=shapes,
    b=shapes,
    k=st.sampled_from([1, 3]),
    r=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    std=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    wscale=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_merge_unmerge_is_bit_exact(kind, a, b, k, r, dtype, seed, std, wscale):
    model, _ = make_site(kind, a, b, k, seed, wscale)
    model = model.to(dtype)
    inject_random(model, r, seed, std)
    before = state_bits(model)
    w0 = bits(model[0].weight)
    surgery.merge(model, "default")
    assert surgery.merged(model) == ["default"]
    if std >= 0.1 and wscale <= 1.0:
        assert not torch.equal(bits(model[0].weight), w0), "merge did not change the weight"
    surgery.unmerge(model, "default")
    assert surgery.merged(model) == []
    assert_state_equal(before, state_bits(model))


@FAST
@given(
    kind=st.sampled_from(KINDS),
    a=shapes,
    b=shapes,
    k=st.sampled_from([1, 3]),
    r=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    rslora=st.booleans(),
)
def test_merged_outputs_equal_unmerged_fp32(kind, a, b, k, r, seed, rslora):
    model, x = make_site(kind, a, b, k, seed, 1.0)
    inject_random(model, r, seed, 0.3, alpha=5, rslora=rslora)
    unmerged = run(model, x)
    assert not torch.allclose(unmerged, run(make_site(kind, a, b, k, seed, 1.0)[0], x), atol=1e-4)
    surgery.merge(model, "default")
    # the adapter does not run any more: its tensors can be zeroed without changing the output
    merged_out = run(model, x)
    torch.testing.assert_close(merged_out, unmerged, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model, "default")
    torch.testing.assert_close(run(model, x), unmerged, atol=0, rtol=0)


def test_merged_adapter_is_not_applied_twice():
    model, x = make_site("linear", 8, 8, 1, 0, 1.0)
    inject_random(model, 2, 0, 0.5)
    want = run(model, x)
    surgery.merge(model, "default")
    with torch.no_grad():
        for ad in engine.adapters(model, "default").values():
            ad.lora_B.mul_(3)  # training after merge does not change the merged output
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride, dilation, padding", [(2, 1, 1), (1, 2, 2), (2, 2, 0)])
def test_merged_equals_unmerged_strided_dilated_conv(stride, dilation, padding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, dilation=dilation, padding=padding))
    x = torch.randn(2, 3, 11, 11)
    inject_random(model, 2, 0, 0.3)
    unmerged = run(model, x)
    surgery.merge(model, "default")
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_merged_equals_unmerged_conv_padding_mode(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    x = torch.randn(2, 3, 8, 8)
    inject_random(model, 2, 0, 0.3)
    unmerged = run(model, x)
    surgery.merge(model, "default")
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_cycles_stay_bit_exact(dtype):
    model, _ = make_site("linear", 48, 40, 1, 3, 1.0)
    model = model.to(dtype)
    inject_random(model, 4, 3, 0.5)
    before = state_bits(model)
    w0 = bits(model[0].weight)
    merged_once = None
    for i in range(60):
        surgery.merge(model, "default")
        if merged_once is None:
            merged_once = bits(model[0].weight)
        else:  # merging the same delta onto the same base gives the same bits every time
            assert torch.equal(bits(model[0].weight), merged_once), f"cycle {i}"
        surgery.unmerge(model, "default")
        assert torch.equal(bits(model[0].weight), w0), f"cycle {i}"
    assert_state_equal(before, state_bits(model))


def test_many_cycles_on_a_real_model_bf16():
    model = tiny_llama().to(torch.bfloat16)
    surgery.inject(model, "lora", targets=["q_proj", "down_proj", "embed_tokens"], r=4)
    randomize(model, std=0.2)
    before = state_bits(model)
    for _ in range(20):
        surgery.merge(model)
        surgery.unmerge(model)
    assert_state_equal(before, state_bits(model))


@FAST
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    first=st.sampled_from(["a", "b"]),
    std=st.sampled_from([0.01, 1.0, 50.0]),
)
def test_two_deltas_unmerged_in_either_order(kind, dtype, seed, first, std):
    model, x = make_site(kind, 12, 10, 3, seed, 1.0)
    model = model.to(dtype)
    inject_random(model, 3, seed, std, name="a")
    inject_random(model, 5, seed + 1, std, name="b")
    before = state_bits(model)
    both_unmerged = run(model, x.to(dtype) if x.is_floating_point() else x)
    surgery.merge(model, "a")
    surgery.merge(model, "b")
    assert set(surgery.merged(model)) == {"a", "b"}
    second = "b" if first == "a" else "a"
    surgery.unmerge(model, first)
    assert surgery.merged(model) == [second]
    if dtype == torch.float32 and std <= 1.0:
        xin = x
        torch.testing.assert_close(run(model, xin), both_unmerged, atol=1e-4, rtol=1e-4)
    surgery.unmerge(model, second)
    assert surgery.merged(model) == []
    assert_state_equal(before, state_bits(model))


def test_two_deltas_unmerge_lower_then_remerge():
    model, x = make_site("linear", 16, 16, 1, 0, 1.0)
    model = model.to(torch.bfloat16)
    inject_random(model, 2, 0, 2.0, name="a")
    inject_random(model, 2, 1, 2.0, name="b")
    before = state_bits(model)
    for _ in range(10):
        surgery.merge(model, "a")
        surgery.merge(model, "b")
        surgery.unmerge(model, "a")
        surgery.merge(model, "a")
        surgery.unmerge(model, "b")
        surgery.unmerge(model, "a")
        assert_state_equal(before, state_bits(model))


@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_merged_delta_restores_base(dtype):
    model = tiny_gpt2().to(dtype)
    pristine = snapshot(model)
    surgery.inject(model, "lora", targets=["c_attn", "c_fc", "wpe"], r=4)
    randomize(model, std=0.5)
    surgery.merge(model, "default")
    surgery.remove(model, "default")
    assert_snapshot_equal(pristine, snapshot(model))


def test_remove_one_of_two_merged_deltas():
    model = tiny_llama().to(torch.float16)
    surgery.inject(model, "lora", targets="q_proj", r=2, name="a")
    randomize(model, "a", std=1.0)
    mid = state_bits(model)
    surgery.inject(model, "lora", targets=["q_proj", "v_proj"], r=3, name="b")
    randomize(model, "b", seed=7, std=1.0)
    surgery.merge(model, "a")
    surgery.merge(model, "b")
    surgery.remove(model, "b")
    assert surgery.merged(model) == ["a"]
    surgery.unmerge(model, "a")
    assert_state_equal(mid, state_bits(model))


def test_training_while_merged_still_unmerges_exactly():
    model, _ = make_site("linear", 20, 20, 1, 0, 1.0)
    model = model.to(torch.bfloat16)
    inject_random(model, 4, 0, 0.5)
    before = state_bits(model)
    surgery.merge(model, "default")
    with torch.no_grad():
        for ad in engine.adapters(model, "default").values():
            ad.lora_A.add_(1.0)
            ad.lora_B.mul_(-3.0)
    surgery.unmerge(model, "default")
    after = state_bits(model)
    base_keys = [k for k in before if ".surgery." not in k]
    assert all(torch.equal(before[k], after[k]) for k in base_keys)


def test_merge_default_merges_all_active_and_unmerge_all():
    model = TinyTransformer()
    x = batch_for(model)
    base = state_bits(model)
    surgery.inject(model, "lora", targets="q", r=2, name="a")
    surgery.inject(model, "lora", targets=["q", "fc1"], r=2, name="b")
    surgery.inject(model, "lora", targets="v", r=2, name="c")
    for i, n in enumerate("abc"):
        randomize(model, n, seed=i)
    surgery.activate(model, "a", "b")
    want = run(model, x)
    surgery.merge(model)
    assert set(surgery.merged(model)) == {"a", "b"}
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model)
    assert surgery.merged(model) == []
    torch.testing.assert_close(run(model, x), want, atol=0, rtol=0)
    surgery.remove(model)
    assert_state_equal(base, state_bits(model))


def test_merge_errors_leave_model_unchanged():
    model = TinyTransformer()
    surgery.inject(model, "lora", targets="q", r=2, name="a")
    surgery.inject(model, "lora", targets="q", r=2, name="b")
    randomize(model, "a")
    randomize(model, "b", seed=2)

    snap = snapshot(model)
    with pytest.raises(InjectionError):
        surgery.merge(model, "nope")
    assert_snapshot_equal(snap, snapshot(model))
    with pytest.raises(MergeError):
        surgery.unmerge(model, "a")  # not merged
    assert_snapshot_equal(snap, snapshot(model))

    surgery.merge(model, "a")
    snap = snapshot(model)
    with pytest.raises(MergeError) as ei:
        surgery.merge(model, "a")  # already merged
    assert "a" in str(ei.value)
    assert_snapshot_equal(snap, snapshot(model))
    with pytest.raises(MergeError):
        with surgery.disable(model):
            pass
    with pytest.raises(MergeError):
        with surgery.use(model, "b"):
            pass
    with pytest.raises(MergeError):
        surgery.activate(model, "b")
    with pytest.raises(InjectionError):
        surgery.unmerge(model, "nope")
    assert_snapshot_equal(snap, snapshot(model))
    # sets that keep the merged delta are fine
    with surgery.use(model, "a"):
        assert surgery.active(model) == ("a",)
    surgery.activate(model, "a", "b")
    assert all(issubclass(e, SurgeryError) for e in (MergeError, InjectionError))


def test_merge_on_uninjected_model_raises():
    model = TinyTransformer()
    snap = snapshot(model)
    with pytest.raises(InjectionError):
        surgery.merge(model, "default")
    with pytest.raises(InjectionError):
        surgery.unmerge(model, "default")
    assert_snapshot_equal(snap, snapshot(model))


def test_merged_fp16_with_overflowing_delta_restores():
    model, _ = make_site("linear", 8, 8, 1, 0, 1.0)
    model = model.to(torch.float16)
    inject_random(model, 2, 0, 1.0)
    with torch.no_grad():
        for ad in engine.adapters(model, "default").values():
            ad.lora_B.mul_(3000.0)  # W + s B A leaves fp16's range: some merged values are inf
    before = state_bits(model)
    surgery.merge(model, "default")
    surgery.unmerge(model, "default")
    assert_state_equal(before, state_bits(model))


def test_merge_float64():
    model, x = make_site("linear", 10, 6, 1, 0, 1.0)
    model = model.double()
    inject_random(model, 3, 0, 0.5)
    before = state_bits(model)
    want = run(model, x.double())
    surgery.merge(model, "default")
    torch.testing.assert_close(run(model, x.double()), want, atol=1e-12, rtol=1e-12)
    surgery.unmerge(model, "default")
    assert_state_equal(before, state_bits(model))


def test_merged_model_generates_like_unmerged():
    model = tiny_llama()
    surgery.inject(model, "lora", targets=["q_proj", "v_proj", "down_proj"], r=4)
    randomize(model, std=0.3)
    x = batch_for(model)
    want = run(model, x)
    surgery.merge(model, "default")
    torch.testing.assert_close(run(model, x), want, atol=1e-5, rtol=1e-5)


def test_remove_lower_of_two_merged_deltas():
    model, x = make_site("linear", 12, 12, 1, 0, 1.0)
    model = model.to(torch.bfloat16)
    base = state_bits(model)
    inject_random(model, 2, 0, 1.0, name="a")
    inject_random(model, 3, 1, 1.0, name="b")
    surgery.merge(model, "a")
    surgery.merge(model, "b")  # b sits on top of a
    surgery.remove(model, "a")
    assert surgery.merged(model) == ["b"]
    surgery.remove(model, "b")
    assert_state_equal(base, state_bits(model))


def test_failed_unmerge_keeps_the_delta_merged():
    model, _ = make_site("linear", 6, 6, 1, 0, 1.0)
    base = state_bits(model)
    inject_random(model, 2, 0, 0.5)
    surgery.merge(model, "default")
    w = model[0].weight
    with torch.no_grad():
        w.neg_()  # the merged weight is not what merge left (as after a lossy device / dtype move)
    merged_bits = bits(w)
    with pytest.raises(MergeError):
        surgery.unmerge(model, "default")
    assert torch.equal(bits(w), merged_bits), "the merged weight must be left as it was"
    assert surgery.merged(model) == ["default"]
    with torch.no_grad():
        w.neg_()  # put it back exactly, then unmerge again, as the error message says
    surgery.unmerge(model, "default")
    surgery.remove(model)
    assert_state_equal(base, state_bits(model))


@pytest.mark.parametrize("factory, target", [(lambda: TinyTransformer(tied=True), "embed"), (tiny_gpt2, "wte")])
def test_merge_tied_embedding_keeps_outputs(factory, target):
    model = factory()
    x = batch_for(model)
    surgery.inject(model, "lora", targets=target, r=2)
    randomize(model, std=0.5)
    unmerged = run(model, x)
    try:
        surgery.merge(model, "default")
    except MergeError:
        return  # refusing to merge into a shared weight is fine too
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-4, rtol=1e-4)


def test_merge_unmerge_on_tied_weights_restores_base():
    model = TinyTransformer(tied=True)
    base = state_bits(model)
    surgery.inject(model, "lora", targets=["embed", "lm_head"], r=2)
    randomize(model, std=0.5)
    try:
        surgery.merge(model, "default")
    except MergeError:
        pass  # refusing is fine
    else:
        surgery.unmerge(model, "default")
    surgery.remove(model)
    assert_state_equal(base, state_bits(model))


def test_merge_inside_a_context_that_excludes_the_delta():
    model = TinyTransformer()
    x = batch_for(model)
    base = run(model, x)
    surgery.inject(model, "lora", targets="q", r=2, name="a")
    randomize(model, "a")
    with surgery.disable(model):
        try:
            surgery.merge(model, "a")
        except MergeError:
            return
        assert surgery.active(model) == ()
        torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_on_cuda(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192), nn.Conv2d(4, 6, 3, padding=1), nn.Embedding(50, 16)).to("cuda", dtype)
    surgery.inject(model, "lora", targets=["0", "1", "2"], r=8)
    randomize(model, std=0.5)
    before = state_bits(model)
    x = torch.randn(5, 256, device="cuda", dtype=dtype)
    want = model[0](x)
    for _ in range(20):
        surgery.merge(model, "default")
        surgery.unmerge(model, "default")
    assert_state_equal(before, state_bits(model))
    surgery.merge(model, "default")
    if dtype == torch.float32:
        torch.testing.assert_close(model[0](x), want, atol=1e-4, rtol=1e-4)
    surgery.remove(model)
    base = {k: v for k, v in before.items() if ".surgery." not in k}
    assert_state_equal(base, state_bits(model))
