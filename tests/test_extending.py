"""docs/extending.md's worked example, run as written: a method defined in one file joins the
library by registering (inject, summary, merge / unmerge bit-exact, delta round trip, the hub)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import surgery
from registry import Hub
from surgery.methods.base import _BY_CONFIG, METHODS
from tests.models import tiny_llama

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


@pytest.fixture
def scale_method():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102
    yield ns
    cfg = METHODS.pop("scale").Config  # leave the table as it was
    _BY_CONFIG.pop(cfg, None)


def _run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_worked_example_is_a_whole_method(scale_method, tmp_path):
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (2, 7))
    base = _run(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inj = surgery.inject(model, "scale", targets="@v")
    assert inj.sites and torch.equal(_run(model, ids), base)  # identity at injection
    row = surgery.summary(model).deltas["default"]
    assert row["mergeable"] is True and row["trainable"] == sum(model.get_submodule(p).out_features for p in inj.sites)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "default").values():
            ad.scale.uniform_(0.5, 1.5)
    out = _run(model, ids)
    assert not torch.allclose(out, base)
    surgery.merge(model)
    torch.testing.assert_close(_run(model, ids), out, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model)
    for p in inj.sites:
        assert torch.equal(model.get_submodule(p).weight, before[p + ".weight"])
    hub = Hub(tmp_path / "hub")
    hub.push(model, "acme/scaled", adapter="default")
    fresh = tiny_llama().eval()
    hub.load(fresh, "acme/scaled")
    torch.testing.assert_close(_run(fresh, ids), out, atol=0, rtol=0)
    surgery.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(surgery.ConfigError, match="init must be a positive"):
        surgery.inject(model, "scale", init=-1.0)
