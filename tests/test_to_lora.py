"""surgery.to_lora: the error against an SVD of the merged weight change computed here, exact at full
rank for sparse / LoHa / IA3 deltas (outputs equal the source's), GPT-2 Conv1D layout, the result
loaded by PEFT, save_peft of a sparse delta pointing to to_lora, and refusals leaving the model alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import batch_for, tiny_cnn, tiny_gpt2, tiny_llama
from torch import nn

import registry
import surgery
from registry.peft_format import PeftFormatError
from surgery import engine
from surgery.to_lora import to_lora


def _logits(model: nn.Module, name: str | None) -> torch.Tensor:
    with torch.no_grad(), surgery.use(model, name) if name else surgery.disable(model):
        return model(**batch_for(model)).logits


@torch.no_grad()
def _sparse(model: nn.Module, name: str = "s") -> None:
    surgery.inject(model, "sparse", density=0.02, name=name)
    g = torch.Generator().manual_seed(0)
    for ad in engine.adapters(model, name).values():
        ad.values.copy_(torch.randn(ad.values.shape, generator=g) * 0.1)


def test_error_matches_svd_of_merged_change() -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _sparse(model)
    fit = to_lora(model, "s", r=3)
    assert surgery.active(model) == ("s",) and fit.name == "s_lora" and "s_lora" in surgery.names(model)
    merged = copy.deepcopy(model)
    surgery.merge(merged, "s")
    res = tot = 0.0
    for path, err in fit.errors.items():
        d = merged.get_submodule(path).weight - base[f"{path}.weight"]
        s = torch.linalg.svdvals(d.double())
        res, tot = res + float(s[3:].square().sum()), tot + float(s.square().sum())
        assert err == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
        ts = fit.delta.sites()[path]  # B A is the best rank-3 approximation of the change
        best = torch.linalg.matrix_norm(d.double() - ts["lora_B.weight"].double() @ ts["lora_A.weight"].double())
        assert float(best) == pytest.approx(float(s[3:].norm()), rel=1e-3)
    assert fit.error == pytest.approx(math.sqrt(res / tot), rel=1e-4)
    assert 0 < fit.error < 1


@pytest.mark.parametrize(
    ("factory", "method", "config"),
    [
        (tiny_llama, "loha", {"r": 4}),
        (tiny_gpt2, "dora", {"r": 4}),
        (tiny_gpt2, "ia3", {}),
        (tiny_gpt2, "sparse", {"density": 0.02}),
    ],
    ids=["loha", "dora-conv1d", "ia3-conv1d", "sparse-conv1d"],
)
def test_full_rank_reproduces_source(factory, method: str, config: dict) -> None:
    model = factory()
    surgery.inject(model, method, name="src", **config)
    with torch.no_grad():
        for p in engine.adapters(model, "src").values():
            for t in p.parameters():
                t.add_(torch.randn_like(t) * 0.1)
    fit = to_lora(model, "src", r=128)
    assert fit.error < 1e-5  # the tiny GPT-2's biases are zero: IA3's scaling of them changes nothing
    torch.testing.assert_close(_logits(model, "src_lora"), _logits(model, "src"), rtol=1e-4, atol=1e-4)


def test_bias_change_counts_in_the_error() -> None:
    model = tiny_gpt2()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and m.bias.dim() == 1:
                m.bias.normal_()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.inject(model, "ia3", name="src")
    with torch.no_grad():
        for ad in engine.adapters(model, "src").values():
            ad.ia3_l.add_(torch.randn_like(ad.ia3_l) * 0.1)
    fit = to_lora(model, "src", r=128)
    merged = copy.deepcopy(model)
    surgery.merge(merged, "src")
    for path, err in fit.errors.items():  # full rank: what is left is the bias change
        mod = merged.get_submodule(path)
        dw = (mod.weight - base[f"{path}.weight"]).square().sum()
        db = (mod.bias - base[f"{path}.bias"]).square().sum()
        assert err == pytest.approx(float((db / (dw + db)).sqrt()), rel=1e-3, abs=1e-6)
    assert fit.error > 1e-3


def test_peft_loads_the_result_and_save_peft_of_sparse_points_to_to_lora(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    _sparse(model)
    with pytest.raises(PeftFormatError, match="to_lora"):
        registry.save_peft(model, tmp_path / "s", adapter="s")
    fit = to_lora(model, "s", r=8)
    registry.save_peft(model, tmp_path / "l", adapter=fit.name)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "l").eval()
    with torch.no_grad():
        theirs = loaded(**batch_for(model)).logits
    torch.testing.assert_close(theirs, _logits(model, fit.name), rtol=1e-4, atol=1e-4)


def test_refusals_leave_model_alone() -> None:
    model = tiny_llama()
    surgery.inject(model, "bitfit", name="b")
    with pytest.raises(surgery.ConfigError, match="only biases"):
        to_lora(model, "b")
    _sparse(model)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(surgery.ConfigError, match="positive integer"):
            to_lora(model, "s", r=bad)  # type: ignore[arg-type]
    surgery.merge(model, "s")
    with pytest.raises(surgery.ConfigError, match="unmerge"):
        to_lora(model, "s")
    assert surgery.names(model) == ["b", "s"]


def test_conv_site_refused() -> None:
    model = tiny_cnn()
    surgery.inject(model, "sparse", targets=nn.Conv2d, density=0.1, name="c")
    with pytest.raises(surgery.ConfigError, match="conv"):
        to_lora(model, "c")
    assert surgery.names(model) == ["c"]
