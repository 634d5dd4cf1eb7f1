"""QLoRA: a 4-bit NF4 base (surgery.quantize, or a transformers BitsAndBytesConfig load) under
every delta method; merge refuses 4-bit weights; dequantize; training reaches only the delta."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery import engine
from surgery.quantize import DequantReport, dequantize, is_quantized, quantize, weight_of
from tests.models import batch_for, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

# bitsandbytes' NF4 code book (QLoRA, appendix E): the values a normalised block is rounded to
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_BASE: list[nn.Module] = []


def _fp_and_q() -> tuple[nn.Module, nn.Module]:
    """(a fresh fp32 tiny Llama, its NF4 copy); the quantised one is built once, then copied."""
    if not _BASE:
        q = tiny_llama()
        quantize(q)
        _BASE.append(q)
    return tiny_llama(), copy.deepcopy(_BASE[0])


@pytest.fixture
def lent() -> Iterator[nn.Module]:
    """One NF4 tiny Llama lent to each test in turn (its graph, for role selectors, traced once),
    given back with every delta removed."""
    if len(_BASE) < 2:
        _BASE.append(_fp_and_q()[1])
    q = _BASE[1]
    try:
        yield q
    finally:
        surgery.remove(q)
        q.eval().zero_grad(set_to_none=True)


def _nearest_nf4(x: torch.Tensor) -> torch.Tensor:
    return NF4[(x.unsqueeze(-1) - NF4).abs().argmin(-1)]


# ---------------------------------------------------------------------------- the codec


def test_quantize_is_nf4_with_double_quant_blocks_64():
    fp = tiny_llama()
    q = copy.deepcopy(fp)
    report = quantize(q)
    paths = [p for p, m in fp.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"]
    assert report.layers == tuple(paths) and len(paths) == 14
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens) is nn.Embedding  # the head stays
    worst = 0.0
    for p in paths:
        m, w = q.get_submodule(p), fp.get_submodule(p).weight.detach()
        assert isinstance(m, bnb.nn.Linear4bit) and is_quantized(m) and not m.weight.requires_grad
        qs = m.weight.quant_state
        assert (qs.quant_type, qs.blocksize, qs.nested, qs.state2.blocksize) == ("nf4", 64, True, 256)
        deq = weight_of(m)
        assert deq.shape == w.shape and deq.dtype == w.dtype
        blocks, ref = deq.reshape(-1, 64), w.reshape(-1, 64)
        absmax = ref.abs().amax(1, keepdim=True)
        absmax_dq = blocks.abs().amax(1, keepdim=True)  # the block's largest weight is coded +-1 exactly
        # each block: the codes are the nearest NF4 values of w / absmax; the absmax 8-bit (double quantised)
        assert torch.allclose(blocks / absmax_dq, _nearest_nf4(ref / absmax), rtol=0, atol=1e-6)
        assert ((absmax_dq - absmax).abs() / absmax).max() < 0.02
        worst = max(worst, float((deq - w).abs().max()))
    assert report.max_abs_error == pytest.approx(worst)
    assert report.bytes_before == sum(fp.get_submodule(p).weight.numel() for p in paths) * 4


def test_nf4_bytes_against_bf16():
    lin = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    r = quantize(lin)
    n = 1024 * 1024
    # 4-bit codes, an 8-bit absmax per 64, an fp32 absmax per 256 of those, the offset, two code books
    assert r.bytes_after == n // 2 + n // 64 + 4 * n // (64 * 256) + 4 + 4 * (16 + 256)
    assert r.bytes_after / (2 * n) <= 0.28  # against the same weights in bf16


def test_quantize_forward_is_the_dequantised_linear():
    fp, q = _fp_and_q()
    x = torch.randn(3, 5, 64)
    m = q.model.layers[0].self_attn.q_proj
    assert torch.allclose(m(x), F.linear(x, weight_of(m)), atol=1e-6)
    b = batch_for(q)
    with torch.no_grad():
        assert not torch.equal(q(**b).logits, fp(**b).logits)  # 4-bit: close, not equal
        assert torch.allclose(q(**b).logits, fp(**b).logits, atol=0.1)


def test_quantize_options():
    fp = tiny_llama()
    r = quantize(copy.deepcopy(fp), targets="re:.*_proj", skip="re:.*mlp.*")
    assert r.layers == tuple(p for p, m in fp.named_modules() if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    q = copy.deepcopy(fp)
    plain = quantize(q, double_quant=False, compute_dtype=torch.bfloat16)
    m = q.model.layers[0].mlp.up_proj
    assert not m.weight.quant_state.nested and m.compute_dtype == torch.bfloat16
    assert plain.bytes_after > r.bytes_after  # fp32 absmax per block: 0.5 bit a weight more


def test_quantize_refusals(monkeypatch):
    fp, q = _fp_and_q()
    with pytest.raises(surgery.ConfigError, match="unknown quantisation scheme 'int3'"):
        quantize(fp, "int3")
    with pytest.raises(surgery.ConfigError, match="already 4-bit"):
        quantize(q)
    with pytest.raises(surgery.ConfigError, match="hit no nn.Linear"):
        quantize(fp, targets="model.norm")
    surgery.inject(fp, "prefix", n_tokens=2)
    with pytest.raises(surgery.InjectionError, match="quantise the base first"):
        quantize(fp)
    assert not any(is_quantized(m) for m in fp.modules())  # nothing half-done
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(surgery.ConfigError, match=r"pip install model-surgery\[qlora\]"):
        quantize(tiny_llama())


# ---------------------------------------------------------------------------- every method on top

# method -> how to inject it on tiny_llama where its defaults do not do (as tests/test_contract.py)
SETUP = {"prompt": {"n_tokens": 4}, "head": {"heads": {"t": 2}}}


def _inject(model: nn.Module, method: str) -> None:
    if method == "fusion":
        for i in range(2):
            surgery.inject(model, "lora", name=f"m{i}")
            _perturb(model, f"m{i}", 10 + i)
        surgery.fuse(model, ["m0", "m1"], name=method)
    else:
        surgery.inject(model, method, name=method, **SETUP.get(method, {}))


def _perturb(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in engine.adapters(model, name).values():
            for t in ad.parameters():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.05)


@pytest.mark.parametrize("method", sorted(surgery.METHODS))
def test_every_method_on_an_nf4_base(method, lent):
    q = lent
    b = batch_for(q)
    with torch.no_grad():
        base = q(**b).logits
    packed = {p: m.weight.detach().clone() for p, m in q.named_modules() if is_quantized(m)}
    _inject(q, method)
    _perturb(q, method, 0)
    with torch.no_grad():
        on = q(**b).logits
        with surgery.disable(q):
            off = q(**b).logits
    assert torch.equal(off, base)  # disable: the quantised base, bit for bit
    if method != "head":  # a task head acts only on calls naming its task (tests/test_heads.py)
        assert not torch.allclose(on[:, -base.shape[1] :], base)  # a prompt's positions come first
        q.train()
        q(**b, labels=b["input_ids"]).loss.backward()
        mine = {id(p) for ad in engine.adapters(q, method).values() for p in ad.parameters()}
        got = {id(p) for p in q.parameters() if p.grad is not None}
        assert got and got <= mine
    for p, w in packed.items():  # the 4-bit weights never change
        assert torch.equal(q.get_submodule(p).weight, w)


def test_lora_on_nf4_is_the_dequantised_base_plus_the_update(lent):
    q = lent
    surgery.inject(q, "lora", targets="re:.*q_proj", r=4, alpha=8)
    _perturb(q, "default", 1)
    m = q.model.layers[1].self_attn.q_proj
    ad = engine.adapters(q, "default")["model.layers.1.self_attn.q_proj"]
    x = torch.randn(2, 3, 64)
    want = F.linear(x, weight_of(m)) + 2.0 * F.linear(F.linear(x, ad.lora_A), ad.lora_B)
    assert torch.allclose(m(x), want, atol=1e-5)


def test_dora_norm_is_of_the_dequantised_weight(lent):
    q = lent
    surgery.inject(q, "dora", targets="re:.*v_proj", r=2)
    ad = engine.adapters(q, "default")["model.layers.0.self_attn.v_proj"]
    m = q.model.layers[0].self_attn.v_proj
    # at injection the magnitude is the norm of the weight the forward uses: the output is the base's
    assert torch.allclose(ad.lora_magnitude_vector, weight_of(m).norm(dim=1))


# ---------------------------------------------------------------------------- merge and dequantize


def test_merge_refuses_4bit_weights_and_merges_after_dequantize():
    fp, q = _fp_and_q()
    preview = surgery.find(q, "re:.*(q|v)_proj", method="lora", r=4)  # the preview says so before injecting
    assert preview and all("surgery.dequantize(model)" in str(s.mergeable) for s in preview)
    surgery.inject(q, "lora", targets="re:.*(q|v)_proj", r=4)
    _perturb(q, "default", 2)
    b = batch_for(q)
    with torch.no_grad():
        qlora = q(**b).logits
    assert "surgery.dequantize(model)" in str(surgery.engine.mergeable(q, "default"))
    with pytest.raises(surgery.MergeError, match=r"4-bit weight of 'model\.layers\.0\.self_attn\.q_proj'"):
        surgery.merge(q, "default")
    assert surgery.merged(q) == [] and all(is_quantized(q.get_submodule(p)) for p in _linear_paths(q))
    report = dequantize(q)  # with the delta injected: it stays attached
    assert isinstance(report, DequantReport) and len(report.layers) == 14
    worst = max(
        float((q.get_submodule(p).weight - fp.get_submodule(p).weight).detach().abs().max()) for p in report.layers
    )
    assert report.max_abs_error == pytest.approx(worst) and 0 < worst < 0.05
    assert not any(is_quantized(m) for m in q.modules()) and type(q.model.layers[0].mlp.up_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(q(**b).logits, qlora, atol=1e-5)  # dequantised: the 4-bit model's outputs
        deq = {p: q.get_submodule(p).weight.clone() for p in report.layers}
        surgery.merge(q, "default")
        assert torch.allclose(q(**b).logits, qlora, atol=1e-4)
        surgery.unmerge(q, "default")
    assert all(torch.equal(q.get_submodule(p).weight, w) for p, w in deq.items())  # unmerge: exact


def test_a_bias_delta_merges_on_a_4bit_layer():
    from tests.models import tiny_qwen2

    q = tiny_qwen2()  # q / k / v projections with biases
    quantize(q)
    packed = q.model.layers[0].self_attn.q_proj.weight.detach().clone()
    bias = q.model.layers[0].self_attn.q_proj.bias.detach().clone()
    surgery.inject(q, "bitfit", targets="re:.*q_proj")
    _perturb(q, "default", 4)
    b = batch_for(q)
    with torch.no_grad():
        on = q(**b).logits
        surgery.merge(q, "default")  # a bias is full precision: it merges, the 4-bit weight is untouched
        assert torch.allclose(q(**b).logits, on, atol=1e-5)
        assert torch.equal(q.model.layers[0].self_attn.q_proj.weight, packed)
        surgery.unmerge(q, "default")
    assert torch.equal(q.model.layers[0].self_attn.q_proj.bias, bias)


def test_a_qlora_delta_fits_the_base_it_was_quantised_from():
    fp, q = _fp_and_q()
    assert surgery.fingerprint(q) == surgery.fingerprint(fp)  # the 4-bit weights by their logical shapes
    surgery.inject(q, "lora", targets="re:.*_proj", r=4)
    _perturb(q, "default", 5)
    surgery.apply(fp, surgery.delta(q))  # no allow_other_base: the same base, in another precision
    theirs = engine.adapters(fp, "default")
    for path, ad in engine.adapters(q, "default").items():
        assert all(torch.equal(t, theirs[path].tensors()[k]) for k, t in ad.tensors().items())


# ---------------------------------------------------------------------------- LoftQ


def _loftq(rank: int = 4) -> tuple[nn.Module, nn.Module, surgery.quantize.QuantReport]:
    fp = tiny_llama()
    q = copy.deepcopy(fp)
    return fp, q, quantize(q, loftq_rank=rank)


def test_loftq_keeps_the_nf4_codes_and_starts_near_the_full_precision_model():
    fp, q, rep = _loftq(8)
    plain = _fp_and_q()[1]
    assert rep.loftq_rank == 8 and 0 < rep.loftq_rel_error < rep.rel_error  # the correction removes error
    for p in _linear_paths(q):  # one iteration: the 4-bit base is plain NF4's, code for code
        assert torch.equal(q.get_submodule(p).weight, plain.get_submodule(p).weight)
    surgery.inject(q, "lora", targets="re:.*_proj", r=4, alpha=8, init="loftq")  # r below the rank kept
    for p, ad in engine.adapters(q, "default").items():
        w = fp.get_submodule(p).weight
        res = w - weight_of(q.get_submodule(p))
        s = torch.linalg.svdvals(res)
        corrected = res - ad.scale * ad.lora_B @ ad.lora_A  # what is left: the residual past rank 4
        assert torch.allclose(corrected.norm(), s[4:].norm(), rtol=1e-4)
    b = batch_for(q)
    with torch.no_grad():
        ref, start = fp(**b).logits, q(**b).logits
        with surgery.disable(q):  # the quantised base, bit for bit: the correction is the delta's
            assert torch.equal(q(**b).logits, plain(**b).logits)
            off = q(**b).logits
    assert (start - ref).abs().mean() < (off - ref).abs().mean()  # random weights: a near-isotropic residual


def test_loftq_refusals():
    fp, q, _ = _loftq(4)
    for bad in (0, True, 2.0):
        with pytest.raises(surgery.ConfigError, match="loftq_rank must be a positive integer"):
            quantize(tiny_llama(), loftq_rank=bad)
    with pytest.raises(surgery.ConfigError, match="exceeds the rank of layer"):
        quantize(fp, loftq_rank=10_000)
    assert not any(is_quantized(m) for m in fp.modules())  # refused before anything changed
    with pytest.raises(surgery.InjectionError, match="rank 4 < r=8: quantise with loftq_rank >= 8"):
        surgery.inject(q, "lora", targets="re:.*_proj", r=8, init="loftq")
    with pytest.raises(surgery.InjectionError, match=r"has no LoftQ factors: quantise the full-precision model"):
        surgery.inject(fp, "lora", targets="re:.*_proj", r=4, init="loftq")
    with pytest.raises(surgery.InjectionError, match="no LoftQ factors"):
        surgery.inject(_fp_and_q()[1], "lora", targets="re:.*_proj", r=4, init="loftq")  # quantised without
    with pytest.raises(surgery.ConfigError, match="dora: init='loftq' is not supported"):
        surgery.inject(q, "dora", targets="re:.*_proj", r=4, init="loftq")
    assert surgery.names(q) == [] and surgery.names(fp) == []


def test_a_loftq_delta_fits_only_a_4bit_base():
    fp, q, _ = _loftq(4)
    surgery.inject(q, "lora", targets="re:.*_proj", r=4, init="loftq")
    _perturb(q, "default", 6)
    d = surgery.delta(q)
    assert d.config["init"] == "loftq"
    with pytest.raises(surgery.DeltaMismatchError, match="counts? that correction twice|count that correction twice"):
        surgery.apply(fp, d)
    surgery.inject(fp, "lora", targets="re:.*_proj", r=4)  # a LoRA slot on the full-precision base
    with pytest.raises(surgery.DeltaMismatchError, match="is not 4-bit"):
        surgery.apply(fp, d, name="default")  # a hot-swap is refused too, the slot left as it was
    assert all(not ad.lora_B.any() for ad in engine.adapters(fp, "default").values())
    surgery.remove(fp)
    bank = surgery.serve(fp, slots=2, max_rank=4, targets="re:.*_proj")  # nor served on it
    with pytest.raises(surgery.DeltaMismatchError, match="is not 4-bit"):
        bank.load(0, d)
    other = _fp_and_q()[1]  # the same NF4 base, quantised without LoftQ: the delta carries its correction
    surgery.apply(other, d)
    b = batch_for(q)
    with torch.no_grad():
        assert torch.equal(other(**b).logits, q(**b).logits)
        dequantize(q)  # the way to a merged full-precision model: W_nf4 + s B A, not W + s B A
        before = q(**b).logits
        surgery.merge(q, "default")
        assert torch.allclose(q(**b).logits, before, atol=1e-4)


def test_save_peft_refuses_a_loftq_delta(tmp_path):
    from registry.peft_format import PeftFormatError, save_peft_delta

    _, q, _ = _loftq(4)
    surgery.inject(q, "lora", targets="re:.*_proj", r=4, init="loftq")
    with pytest.raises(PeftFormatError, match="LoftQ"):
        save_peft_delta(surgery.delta(q), tmp_path / "out", model=q)
    assert not (tmp_path / "out").exists()


def _linear_paths(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if p.endswith(LINEARS)]


def test_dequantize_needs_4bit_layers():
    with pytest.raises(surgery.ModelTypeError, match="no 4-bit layer"):
        dequantize(tiny_llama())


# ---------------------------------------------------------------------------- training


def _train_lora(model: nn.Module, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    surgery.inject(model, "lora", targets="re:.*_proj", r=4)
    b = batch_for(model, batch=4, seq=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**b, labels=b["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_trains_only_the_delta(lent):
    q = lent
    packed = {p: q.get_submodule(p).weight.detach().clone() for p in _linear_paths(q)}
    head = q.lm_head.weight.detach().clone()
    losses, fp_losses = _train_lora(q), _train_lora(tiny_llama())
    assert losses[-1] < 0.85 * losses[0]
    assert abs(losses[-1] - fp_losses[-1]) < 0.1  # as LoRA on the fp32 base it was quantised from
    assert all(p.grad is None for n, p in q.named_parameters() if "lora_" not in n)
    assert all(torch.equal(q.get_submodule(p).weight, w) for p, w in packed.items())
    assert torch.equal(q.lm_head.weight, head)


# ---------------------------------------------------------------------------- a transformers 4-bit load


@pytest.fixture(scope="module")
def hf_4bit(tmp_path_factory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")


def test_transformers_load_is_the_same_codec(hf_4bit):
    hf = hf_4bit()
    _, q = _fp_and_q()
    for p in _linear_paths(q):  # our quantize and transformers' load: the same 4-bit codes and absmax
        a, b = hf.get_submodule(p), q.get_submodule(p)
        assert torch.equal(a.weight, b.weight) and torch.equal(weight_of(a), weight_of(b))
    with pytest.raises(surgery.ConfigError, match="already 4-bit"):
        quantize(hf)


def test_a_quantised_model_saves_and_loads_back_4bit(tmp_path):
    from transformers import AutoModelForCausalLM

    q = tiny_llama()
    r = quantize(q, targets="re:.*self_attn.*")  # a part only: the loader must keep the MLPs full precision
    b = batch_for(q)
    q.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert [p for p, m in back.named_modules() if is_quantized(m)] == list(r.layers)
    assert all(torch.equal(weight_of(back.get_submodule(p)), weight_of(q.get_submodule(p))) for p in r.layers)
    for p in r.layers:  # as quantize() does: bnb's AVX512-BF16 CPU path (bf16 compute, where the CPU has it) off
        back.get_submodule(p).support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.equal(back(**b).logits, q(**b).logits)


def test_transformers_4bit_load_takes_lora_by_role(hf_4bit):
    hf = hf_4bit()
    b = batch_for(hf)
    with torch.no_grad():
        base = hf(**b).logits
    inj = surgery.inject(hf, "lora", targets="@linear", r=4)  # roles read through the 4-bit layers
    assert len(inj.sites) == 14 and "lm_head" not in inj.sites
    _perturb(hf, "default", 3)
    with torch.no_grad():
        assert not torch.allclose(hf(**b).logits, base)
        with surgery.disable(hf):
            assert torch.equal(hf(**b).logits, base)
    with pytest.raises(surgery.MergeError, match="dequantize"):
        surgery.merge(hf, "default")
    assert dequantize(hf).max_abs_error is None  # loaded 4-bit: the original weights are unknown here


def test_reading_a_layer_bnb_repacked_for_cpu_leaves_it_as_it_is(hf_4bit):
    hf = hf_4bit().eval()
    with torch.no_grad():
        hf(**batch_for(hf))  # bitsandbytes' AVX512-BF16 CPU path repacks a loaded layer's weight here
    layer = hf.model.layers[0].self_attn.q_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    held = layer.weight.data.clone()
    w = weight_of(layer)
    assert w.shape == (layer.out_features, layer.in_features) and torch.equal(weight_of(layer), w)
    assert torch.equal(layer.weight.data, held) and layer.weight.quant_state.packing_format_for_cpu


def test_bench_qlora_smoke():
    from tests._helpers import load_benchmark

    res = load_benchmark("bench_qlora").run(smoke=True, rounds=1)
    assert res["bytes"]["layers"] == 14 and 0.25 < res["bytes"]["nf4_bytes_vs_bf16"] < 0.5  # code books weigh here
    assert set(res["step"]["steps"]) == {"qlora", "lora_fp32_base", "peft_qlora"}  # PEFT's QLoRA runs on CPU
