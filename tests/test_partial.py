"""surgery.recipes.partial: the partial fine-tuning presets against the module tree (per stack), the
summary's count, deltas left alone, bad input leaving the model unchanged."""

from __future__ import annotations

import pytest
from models import tiny_bert_cls, tiny_llama, tiny_t5

import surgery
from surgery.errors import ConfigError
from surgery.recipes.partial import partial


def _trains(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _under(model, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


BERT_HEAD = ("bert.pooler.", "classifier.")


def test_top_and_bottom_per_stack():
    m = tiny_bert_cls()
    s = partial(m, "top", layers=1)
    assert _trains(m) == _under(m, "bert.encoder.layer.1.", *BERT_HEAD)
    assert s.trainable == sum(p.numel() for p in m.parameters() if p.requires_grad) and s.trainable < s.total
    partial(m, "bottom", layers=1)  # embeddings and block 0 frozen
    assert _trains(m) == _under(m, "bert.encoder.layer.1.", *BERT_HEAD)
    partial(m, "bottom", layers=0)
    assert _trains(m) == _under(m, "bert.encoder.", *BERT_HEAD)
    partial(m, "top", layers=0)
    assert _trains(m) == _under(m, *BERT_HEAD)

    m = tiny_t5()  # each stack gets its top block; the tied shared embedding sits at the encoder's bottom
    partial(m, "top", layers=1)
    assert _trains(m) == _under(
        m, "encoder.block.1.", "decoder.block.1.", "encoder.final_layer_norm.", "decoder.final_layer_norm."
    )


def test_head_attention_ffn():
    m = tiny_bert_cls()
    partial(m, "head")
    assert _trains(m) == _under(m, *BERT_HEAD)
    partial(m, "attention")
    attn = {n for n in _under(m, "bert.encoder.") if ".attention.self." in n or ".attention.output.dense." in n}
    assert _trains(m) == attn | _under(m, *BERT_HEAD)
    partial(m, "ffn")
    ffn = {n for n in _under(m, "bert.encoder.") if ".intermediate.dense." in n or ".output.dense." in n}
    ffn -= {n for n in ffn if ".attention." in n}
    assert _trains(m) == ffn | _under(m, *BERT_HEAD)

    m = tiny_llama()
    partial(m, "ffn")
    assert _trains(m) == {n for n, _ in m.named_parameters() if ".mlp." in n} | _under(m, "model.norm.", "lm_head.")


def test_deltas_keep_their_flags():
    m = tiny_llama()
    surgery.inject(m, "lora", targets=["q_proj"], r=2)
    lora = {n for n, _ in m.named_parameters() if ".surgery." in n}
    partial(m, "head")
    assert _trains(m) == lora | _under(m, "model.norm.", "lm_head.")
    assert "lora" in str(surgery.summary(m))


def test_bad_input_leaves_the_model_unchanged():
    m = tiny_bert_cls()
    partial(m, "head")
    before = _trains(m)
    for args, kw in [
        (("everything",), {}),
        (("top",), {}),
        (("top",), {"layers": 3}),
        (("bottom",), {"layers": -1}),
        (("head",), {"layers": 1}),
        (("top",), {"layers": True}),
    ]:
        with pytest.raises(ConfigError):
            partial(m, *args, **kw)
        assert _trains(m) == before
    with pytest.raises(ConfigError, match="presets: top, bottom, head, attention, ffn"):
        partial(m, "tail")
