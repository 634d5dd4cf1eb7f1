"""Method configs are validated when they are built, and unknown keys get a "did you mean"."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import surgery
from surgery.methods.adapter import AdapterConfig
from surgery.methods.base import MethodConfig
from surgery.methods.lora import LoRAConfig
from surgery.methods.lora_moe import LoRAMoEConfig
from surgery.methods.moe import MoEConfig
from surgery.methods.prefix import PrefixConfig
from surgery.methods.prompt import PromptConfig

BAD = [
    (LoRAConfig, {"r": -1}, "r must be"),
    (LoRAConfig, {"dropout": 1.5}, "dropout"),
    (AdapterConfig, {"style": "nope"}, "style"),
    (PromptConfig, {"n_tokens": 0}, "n_tokens"),
    (PrefixConfig, {"n_tokens": -3}, "n_tokens"),
    (MoEConfig, {"experts": 0}, "experts"),
    (LoRAMoEConfig, {"experts": 0}, "experts"),
]


@pytest.mark.parametrize(("cls", "kw", "says"), BAD, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_bad_config_is_refused_when_built(cls, kw, says):
    with pytest.raises(surgery.ConfigError, match=says):
        cls(**kw)


def test_every_registered_config_is_validated_on_build():
    for name, method in surgery.METHODS.items():
        assert issubclass(method.Config, MethodConfig), name


def test_replace_validates_too():
    cfg = LoRAConfig(r=4)
    with pytest.raises(surgery.ConfigError):
        dataclasses.replace(cfg, r=0)
    assert dataclasses.replace(cfg, r=2).r == 2


@pytest.mark.parametrize(
    ("key", "hint"),
    [("rank", "'r'"), ("lora_alpha", "'alpha'"), ("alhpa", "'alpha'"), ("target_modules", "targets=")],
)
def test_unknown_keys_say_what_was_meant(key, hint):
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.ConfigError, match=f"did you mean {hint}"):
        surgery.inject(model, "lora", targets="0", **{key: 4})
    assert surgery.names(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_method_says_what_was_meant():
    with pytest.raises(surgery.ConfigError, match="did you mean 'lora'"):
        surgery.inject(nn.Sequential(nn.Linear(4, 4)), "lroa", targets="0")
