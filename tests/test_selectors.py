"""Selector semantics: globs, regexes, types, lists, layer ranges, combinations, no-hit errors, find().

Expected hit sets are computed from `named_modules()` by the rule the spec states in words,
never copied from what the library returns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import TinyTransformer, tiny_gpt2, tiny_llama
from torch import nn

import surgery
from surgery.errors import SelectorError, SurgeryError


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def paths(model, selector) -> list[str]:
    return [s.path for s in surgery.find(model, selector)]


def all_paths(model) -> list[str]:
    return [p for p, _ in model.named_modules() if p]


def last_ends(model, suffix: str) -> list[str]:
    return [p for p in all_paths(model) if p.rsplit(".", 1)[-1].endswith(suffix)]


def inside(model, suffix: str) -> list[str]:
    """Paths strictly inside some module whose own name ends in `suffix`."""
    out = []
    for p in all_paths(model):
        segs = p.split(".")
        if any(s.endswith(suffix) for s in segs[:-1]):
            out.append(p)
    return out


# ---------------------------------------------------------------- globs


def test_plain_name_hits_modules_whose_last_segment_ends_in_it(llama):
    got = paths(llama, "q_proj")
    assert got == last_ends(llama, "q_proj")
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_plain_name_suffix_of_segment(llama):
    # "proj" ends q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: 7 per layer
    got = paths(llama, "proj")
    assert got == last_ends(llama, "proj")
    assert len(got) == 14


def test_plain_name_does_not_match_middle_of_segment(llama):
    with pytest.raises(SelectorError):
        surgery.find(llama, "_pro")


def test_attn_star_gpt2(gpt2):
    got = paths(gpt2, "attn.*")
    assert got == inside(gpt2, "attn")
    assert {p for p in got if p.rsplit(".", 1)[-1] in ("c_attn", "c_proj")} == {
        f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")
    }
    # the attn module itself and the MLP's c_proj are not inside an *attn module
    assert "transformer.h.0.attn" not in got
    assert "transformer.h.0.mlp.c_proj" not in got


def test_attn_star_llama(llama):
    got = paths(llama, "attn.*")
    assert got == inside(llama, "attn")
    assert got == [f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qkvo"]


def test_inject_attn_star_gpt2_sites_are_the_conv1d_layers():
    m = tiny_gpt2()
    inj = surgery.inject(m, "lora", targets="attn.*", r=2)
    assert list(inj.sites) == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]


def test_star_crosses_dots(llama):
    got = paths(llama, "layers.*.mlp.*")
    want = [p for p in all_paths(llama) if p.startswith("model.layers.") and ".mlp." in p]
    assert got == want
    assert {p.rsplit(".", 1)[-1] for p in got} >= {"gate_proj", "up_proj", "down_proj"}


def test_question_mark_is_one_non_dot_char(llama):
    got = paths(llama, "self_attn.?_proj")
    assert got == [f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qkvo"]


def test_full_path_glob(llama):
    assert paths(llama, "model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize(
    "pattern, layer_ids",
    [
        ("layers.[0:1].mlp.*", {0}),
        ("layers.[1:2].mlp.*", {1}),
        ("layers.[0:2].mlp.*", {0, 1}),
        ("layers.[1:].mlp.*", {1}),
        ("layers.[:1].mlp.*", {0}),
    ],
)
def test_range_segment(llama, pattern, layer_ids):
    got = paths(llama, pattern)
    want = [
        p
        for p in all_paths(llama)
        if p.startswith("model.layers.") and ".mlp." in p and int(p.split(".")[2]) in layer_ids
    ]
    assert got == want and got


def test_range_segment_that_hits_nothing(llama):
    with pytest.raises(SelectorError):
        surgery.find(llama, "layers.[5:9].mlp.*")


def test_range_segment_gpt2(gpt2):
    assert paths(gpt2, "h.[1:2].attn.c_attn") == ["transformer.h.1.attn.c_attn"]


# ---------------------------------------------------------------- regexes


def test_regex_matches_whole_path(llama):
    assert paths(llama, r"re:.*\.(q|v)_proj") == [
        f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qv"
    ]
    assert paths(llama, r"re:model\.layers\.0\.mlp\..*_proj") == [
        f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")
    ]


def test_regex_is_not_a_search(llama):
    # "q_proj" alone does not match a whole path: a regex must cover the path
    with pytest.raises(SelectorError):
        surgery.find(llama, "re:q_proj")


def test_bad_regex_is_selector_error(llama):
    with pytest.raises(SelectorError):
        surgery.find(llama, "re:(unclosed")


# ---------------------------------------------------------------- types, lists, combinations


def test_type_selector(llama, gpt2):
    assert paths(llama, nn.Linear) == [p for p, m in llama.named_modules() if p and isinstance(m, nn.Linear)]
    from transformers.pytorch_utils import Conv1D

    assert paths(gpt2, Conv1D) == [p for p, m in gpt2.named_modules() if p and isinstance(m, Conv1D)]
    assert len(paths(gpt2, Conv1D)) == 8


def test_tuple_of_types(llama):
    got = paths(llama, (nn.Embedding, nn.Linear))
    assert got == [p for p, m in llama.named_modules() if p and isinstance(m, (nn.Embedding, nn.Linear))]
    assert "model.embed_tokens" in got and "lm_head" in got


def test_list_is_union_in_module_order(llama):
    got = paths(llama, ["v_proj", "q_proj"])
    assert got == [p for p in all_paths(llama) if p.endswith(("q_proj", "v_proj"))]


def test_list_mixing_kinds(llama):
    got = paths(llama, ["re:lm_head", nn.Embedding, "layers.[1:].mlp.up_proj"])
    assert got == ["model.embed_tokens", "model.layers.1.mlp.up_proj", "lm_head"]


def test_and_or_not(llama):
    s = surgery.sel("attn.*") & surgery.layers("1:")
    assert paths(llama, s) == [f"model.layers.1.self_attn.{n}_proj" for n in "qkvo"]
    s = surgery.sel("proj") & ~surgery.sel("o_proj") & ~surgery.sel("mlp.*")
    assert paths(llama, s) == [f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qkv"]
    s = surgery.sel(nn.Embedding) | "lm_head"
    assert paths(llama, s) == ["model.embed_tokens", "lm_head"]
    # a plain value on the left works too
    s = "lm_head" | surgery.sel(nn.Embedding)
    assert paths(llama, s) == ["model.embed_tokens", "lm_head"]
    s = ["q_proj"] & surgery.layers(0)
    assert paths(llama, s) == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize(
    "spec, ids",
    [("1:", {1}), (":1", {0}), ("0:2", {0, 1}), (0, {0}), (range(1, 2), {1}), ([0, 1], {0, 1})],
)
def test_layers(llama, spec, ids):
    got = paths(llama, surgery.layers(spec))
    want = [
        p
        for p in all_paths(llama)
        if p.startswith("model.layers.") and p.count(".") >= 2 and int(p.split(".")[2]) in ids
    ]
    assert got == want


def test_layers_bad_spec():
    with pytest.raises(SelectorError):
        surgery.layers("a-b")


def test_unusable_selectors(llama):
    with pytest.raises(SelectorError):
        surgery.find(llama, [])
    with pytest.raises(SelectorError):
        surgery.find(llama, 3.5)
    with pytest.raises(SelectorError):
        surgery.find(llama, "@nope")
    for bad in ("", ".q_proj", "q_proj.", "a..b"):
        with pytest.raises(SelectorError):
            surgery.find(llama, bad)


_PIECES = [
    "q_proj",
    "v_proj",
    "proj",
    "mlp.*",
    "attn.*",
    "layers.[1:].*",
    "norm",
    "re:.*\\.0\\..*",
    "embed_tokens",
    "lm_head",
    nn.Linear,
    nn.Embedding,
]


@settings(max_examples=60, deadline=None)
@given(a=st.sampled_from(_PIECES), b=st.sampled_from(_PIECES), op=st.sampled_from(["|", "&", "~a|b", "a&~b"]))
def test_combinations_are_set_algebra(a, b, op):
    model = _LLAMA_FOR_PROPS
    universe = all_paths(model)

    def hits(s) -> set[str]:
        from surgery.selectors import select

        return {p for p, _ in select(model, s)}

    A, B = hits(a), hits(b)
    s = {
        "|": lambda: surgery.sel(a) | b,
        "&": lambda: surgery.sel(a) & b,
        "~a|b": lambda: ~surgery.sel(a) | b,
        "a&~b": lambda: surgery.sel(a) & ~surgery.sel(b),
    }[op]()
    want = {"|": A | B, "&": A & B, "~a|b": (set(universe) - A) | B, "a&~b": A - B}[op]
    assert hits(s) == want
    assert hits([a, b]) == A | B


_LLAMA_FOR_PROPS = tiny_llama()


# ---------------------------------------------------------------- roles (light: the graph has its own tests)


def test_role_selectors_on_llama(llama):
    assert paths(llama, "@q") == last_ends(llama, "q_proj")
    assert paths(llama, "@v") == last_ends(llama, "v_proj")
    assert set(paths(llama, "@attn")) == set(inside(llama, "self_attn")) & set(last_ends(llama, "proj"))
    assert paths(llama, surgery.sel("@mlp") & surgery.layers(":1")) == [
        f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")
    ]


def test_role_qkv_on_gpt2(gpt2):
    assert paths(gpt2, "@qkv") == last_ends(gpt2, "c_attn")


# ---------------------------------------------------------------- find() and no-hit errors


def test_find_returns_sites_with_type_names(llama, gpt2):
    sites = surgery.find(llama, ["q_proj", "embed_tokens", "norm"])
    assert all(isinstance(s, surgery.Site) for s in sites)
    mods = dict(llama.named_modules())
    for s in sites:
        assert s.type == type(mods[s.path]).__name__
        assert isinstance(s.roles, frozenset)
    by_path = {s.path: s for s in sites}
    assert by_path["model.embed_tokens"].type == "Embedding"
    assert by_path["model.layers.0.self_attn.q_proj"].type == "Linear"
    assert "q" in by_path["model.layers.0.self_attn.q_proj"].roles
    assert {s.type for s in surgery.find(gpt2, "c_attn")} == {"Conv1D"}


def test_find_hides_injected_adapters():
    m = tiny_llama()
    before = surgery.find(m, "re:.*")
    surgery.inject(m, "lora", targets="attn.*", r=2)
    after = surgery.find(m, "re:.*")
    assert [s.path for s in after] == [s.path for s in before]
    with pytest.raises(SelectorError):
        surgery.find(m, "re:.*lora.*")


@pytest.mark.parametrize(
    "typo, near",
    [("q_prj", "q_proj"), ("down_prj", "down_proj"), ("self_atn.*", "self_attn"), ("embed_token", "embed_tokens")],
)
def test_no_hit_names_close_paths(llama, typo, near):
    with pytest.raises(SelectorError) as ei:
        surgery.find(llama, typo)
    msg = str(ei.value)
    assert near in msg
    assert typo in msg
    assert isinstance(ei.value, SurgeryError) and isinstance(ei.value, LookupError)


def test_no_hit_on_gpt2_names_close_paths(gpt2):
    with pytest.raises(SelectorError) as ei:
        surgery.find(gpt2, "c_atn")
    assert "c_attn" in str(ei.value)


def test_inject_no_hit_names_close_paths():
    m = tiny_llama()
    with pytest.raises(SelectorError) as ei:
        surgery.inject(m, "lora", targets="v_prj", r=2)
    assert "v_proj" in str(ei.value)


def test_selectors_on_plain_module():
    m = TinyTransformer()
    assert paths(m, "blocks.[0:1].fc?") == ["blocks.0.fc1", "blocks.0.fc2"]
    assert paths(m, "re:blocks\\.1\\.(q|k|v)") == ["blocks.1.q", "blocks.1.k", "blocks.1.v"]
    out = m(torch.zeros(1, 3, dtype=torch.long))
    assert out.shape == (1, 3, 128)


def test_range_as_first_segment_matches_whole_numbers():
    m = TinyTransformer(layers=12)
    assert paths(m, "[0:2].fc1") == ["blocks.0.fc1", "blocks.1.fc1"]


def test_range_segment_with_two_digit_layers():
    m = TinyTransformer(layers=12)
    assert paths(m, "blocks.[0:2].fc1") == ["blocks.0.fc1", "blocks.1.fc1"]
    assert paths(m, "blocks.[9:11].fc1") == ["blocks.9.fc1", "blocks.10.fc1"]
    assert paths(m, surgery.sel("fc1") & surgery.layers("10:")) == ["blocks.10.fc1", "blocks.11.fc1"]
