"""Roles found from the dataflow graph: exact sets per architecture, speed, caching, no side effects."""

from __future__ import annotations

import gc
import re
import time
import warnings
import weakref

import models
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.nn.modules import module as torch_module

import surgery
from surgery import graph
from surgery.errors import GraphError, SelectorError

TIMINGS: dict[str, float] = {}

# ----------------------------------------------------------------------------- expectations

_ATTN = {"q", "k", "v", "qkv", "o"}


def _expand(spec: str) -> frozenset[str]:
    """Expand a spec: q/k/v/qkv/o also mean attn + linear, mlp.* also mlp + linear; the rest as is."""
    out: set[str] = set()
    for role in spec.split():
        out.add(role)
        if role in _ATTN:
            out |= {"attn", "linear"}
        elif role.startswith("mlp."):
            out |= {"mlp", "linear"}
    return frozenset(out)


def expect(layers: dict[str, dict[str, str]], top: dict[str, str], n: int = 2) -> dict[str, frozenset[str]]:
    """{layer-list path: {path inside a layer: roles}} for layers 0..n-1, plus top-level paths."""
    out = {
        f"{prefix}.{i}.{rel}": _expand(spec)
        for prefix, rel_specs in layers.items()
        for i in range(n)
        for rel, spec in rel_specs.items()
    }
    out.update({path: _expand(spec) for path, spec in top.items()})
    return out


LLAMA_LAYER = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}
LLAMA = expect({"model.layers": LLAMA_LAYER}, {"model.embed_tokens": "embed", "lm_head": "head"})
GPT2 = expect(
    {"transformer.h": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}},
    {"transformer.wte": "embed", "transformer.wpe": "embed", "lm_head": "head"},
)
BERT_LAYER = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
}
BERT_EMB = {f"embeddings.{e}_embeddings": "embed" for e in ("word", "position", "token_type")}


def _bert(prefix: str = "", n: int = 2, **top: str) -> dict[str, frozenset[str]]:
    return expect({f"{prefix}encoder.layer": BERT_LAYER}, {**{prefix + k: v for k, v in BERT_EMB.items()}, **top}, n)


BERT = _bert(**{"pooler.dense": "linear"})
BERT_CLS = _bert("bert.", **{"bert.pooler.dense": "linear", "classifier": "head"})
MINILM = _bert(n=6, **{"pooler.dense": "linear"})

TINY = expect(
    {"blocks": {"q": "q", "k": "k", "v": "v", "out": "o", "fc1": "mlp.up", "fc2": "mlp.down"}},
    {"embed": "embed", "pos": "embed", "lm_head": "head"},
)
FUSED = expect(
    {"layers": {"qkv": "qkv", "proj": "o", "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}},
    {"tok": "embed", "head": "head"},
)

# ----------------------------------------------------------------------------- other architectures

DEC = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENC = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


def _t5(gated: bool):
    cfg = T.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        **IDS,
    )
    return T.T5ForConditionalGeneration(cfg)


def _t5_expected(gated: bool) -> dict[str, frozenset[str]]:
    ffn = {"wi_0": "mlp.gate", "wi_1": "mlp.up", "wo": "mlp.down"} if gated else {"wi": "mlp.up", "wo": "mlp.down"}
    attn = {f"{a}.{x}": x for a in ("SelfAttention", "EncDecAttention") for x in "qkvo"}
    enc = {k: v for k, v in attn.items() if k.startswith("Self")}
    enc = {f"layer.0.{k}": v for k, v in enc.items()} | {f"layer.1.DenseReluDense.{k}": v for k, v in ffn.items()}
    dec = {f"layer.{0 if k.startswith('Self') else 1}.{k}": v for k, v in attn.items()}
    dec |= {f"layer.2.DenseReluDense.{k}": v for k, v in ffn.items()}
    bias = "layer.0.SelfAttention.relative_attention_bias"
    return expect(
        {"encoder.block": enc, "decoder.block": dec},
        {
            "shared": "embed",
            "encoder.embed_tokens": "embed",
            "decoder.embed_tokens": "embed",
            f"encoder.block.0.{bias}": "embed",
            f"decoder.block.0.{bias}": "embed",
            "lm_head": "head",
        },
    )


def _bart_expected() -> dict[str, frozenset[str]]:
    def attn(name: str) -> dict[str, str]:
        return {f"{name}.q_proj": "q", f"{name}.k_proj": "k", f"{name}.v_proj": "v", f"{name}.out_proj": "o"}

    ffn = {"fc1": "mlp.up", "fc2": "mlp.down"}
    top = {f"model.{s}.{e}": "embed" for s in ("encoder", "decoder") for e in ("embed_tokens", "embed_positions")}
    return expect(
        {
            "model.encoder.layers": attn("self_attn") | ffn,
            "model.decoder.layers": attn("self_attn") | attn("encoder_attn") | ffn,
        },
        top | {"model.shared": "embed", "lm_head": "head"},
    )


QKVO = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
FC = {"fc1": "mlp.up", "fc2": "mlp.down"}
# DeBERTa-v2 names them query_proj / key_proj / value_proj, not BERT's query / key / value.
DEBERTA_LAYER = {
    k.replace("self.query", "self.query_proj")
    .replace("self.key", "self.key_proj")
    .replace("self.value", "self.value_proj"): v
    for k, v in BERT_LAYER.items()
}


def _sub(parent: str, d: dict[str, str]) -> dict[str, str]:
    return {f"{parent}.{k}": v for k, v in d.items()}


LLAMA_LIKE_TOP = {"model.embed_tokens": "embed", "lm_head": "head"}
FALCON_LIKE = expect(
    {
        "transformer.h": {
            "self_attention.query_key_value": "qkv",
            "self_attention.dense": "o",
            "mlp.dense_h_to_4h": "mlp.up",
            "mlp.dense_4h_to_h": "mlp.down",
        }
    },
    {"transformer.word_embeddings": "embed", "lm_head": "head"},
)

# name -> (factory, expected roles)
ARCHS = {
    "opt": (
        lambda: T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                ffn_dim=128,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=64,
                **IDS,
            )
        ),
        expect(
            {"model.decoder.layers": _sub("self_attn", QKVO | {"out_proj": "o"}) | FC},
            {"model.decoder.embed_tokens": "embed", "model.decoder.embed_positions": "embed", "lm_head": "head"},
        ),
    ),
    "gpt_neox": (
        lambda: T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, **IDS
            )
        ),
        expect(
            {
                "gpt_neox.layers": {
                    "attention.query_key_value": "qkv",
                    "attention.dense": "o",
                    "mlp.dense_h_to_4h": "mlp.up",
                    "mlp.dense_4h_to_h": "mlp.down",
                }
            },
            {"gpt_neox.embed_in": "embed", "lm_head": "head"},
        ),
    ),
    "phi": (
        lambda: T.PhiForCausalLM(T.PhiConfig(**{**DEC, "num_key_value_heads": 4})),
        expect({"model.layers": _sub("self_attn", QKVO | {"dense": "o"}) | _sub("mlp", FC)}, LLAMA_LIKE_TOP),
    ),
    "phi3": (
        lambda: T.Phi3ForCausalLM(T.Phi3Config(**DEC)),
        expect(
            {
                "model.layers": {
                    "self_attn.qkv_proj": "qkv",
                    "self_attn.o_proj": "o",
                    "mlp.gate_up_proj": "mlp.up mlp.gate",
                    "mlp.down_proj": "mlp.down",
                }
            },
            LLAMA_LIKE_TOP,
        ),
    ),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**DEC, head_dim=16)), LLAMA),
    "gemma2_eager": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DEC, head_dim=16)), LLAMA),
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DEC, head_dim=16)), LLAMA),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DEC, head_dim=16)), LLAMA),
    "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DEC)), LLAMA),
    "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**DEC)), LLAMA),
    "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**DEC)), LLAMA),
    "starcoder2": (
        lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**DEC)),
        expect(
            {
                "model.layers": _sub("self_attn", QKVO | {"o_proj": "o"})
                | {"mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
            },
            LLAMA_LIKE_TOP,
        ),
    ),
    "llama_eager": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**DEC, attn_implementation="eager")), LLAMA),
    "mixtral_moe": (
        lambda: T.MixtralForCausalLM(T.MixtralConfig(**DEC, num_local_experts=4, num_experts_per_tok=2)),
        expect({"model.layers": _sub("self_attn", QKVO | {"o_proj": "o"})}, LLAMA_LIKE_TOP),
    ),
    "qwen2_moe": (
        lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                **DEC,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
            )
        ),
        expect(
            {
                "model.layers": _sub("self_attn", QKVO | {"o_proj": "o"})
                | _sub("mlp.shared_expert", {"gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"})
                | {"mlp.shared_expert_gate": "linear"}
            },
            LLAMA_LIKE_TOP,
        ),
    ),
    "gpt2_eager": (
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager", **IDS
            )
        ),
        GPT2,
    ),
    "gpt_bigcode": (
        lambda: T.GPTBigCodeForCausalLM(
            T.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **IDS)
        ),
        GPT2,
    ),
    "gptj": (
        lambda: T.GPTJForCausalLM(
            T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **IDS)
        ),
        expect(
            {
                "transformer.h": _sub("attn", QKVO | {"out_proj": "o"})
                | {"mlp.fc_in": "mlp.up", "mlp.fc_out": "mlp.down"}
            },
            {"transformer.wte": "embed", "lm_head": "head"},
        ),
    ),
    "gpt_neo": (
        lambda: T.GPTNeoForCausalLM(
            T.GPTNeoConfig(
                vocab_size=128,
                hidden_size=64,
                num_layers=2,
                num_heads=4,
                attention_types=[[["global", "local"], 1]],
                max_position_embeddings=64,
                **IDS,
            )
        ),
        expect(
            {
                "transformer.h": _sub("attn.attention", QKVO | {"out_proj": "o"})
                | {"mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
            },
            {"transformer.wte": "embed", "transformer.wpe": "embed", "lm_head": "head"},
        ),
    ),
    "falcon": (
        lambda: T.FalconForCausalLM(
            T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **IDS)
        ),
        FALCON_LIKE,
    ),
    "bloom": (
        lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, **IDS)),
        FALCON_LIKE,
    ),
    "mpt": (
        lambda: T.MptForCausalLM(T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, **IDS)),
        expect(
            {
                "transformer.blocks": {
                    "attn.Wqkv": "qkv",
                    "attn.out_proj": "o",
                    "ffn.up_proj": "mlp.up",
                    "ffn.down_proj": "mlp.down",
                }
            },
            {"transformer.wte": "embed", "lm_head": "head"},
        ),
    ),
    "xglm": (
        lambda: T.XGLMForCausalLM(
            T.XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, **IDS)
        ),
        expect({"model.layers": _sub("self_attn", QKVO | {"out_proj": "o"}) | FC}, LLAMA_LIKE_TOP),
    ),
    "t5": (lambda: _t5(False), _t5_expected(False)),
    "t5_gated": (lambda: _t5(True), _t5_expected(True)),
    "bart": (
        lambda: T.BartForConditionalGeneration(
            T.BartConfig(
                vocab_size=128,
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_position_embeddings=64,
                **IDS,
            )
        ),
        _bart_expected(),
    ),
    "bert_eager": (lambda: T.BertModel(T.BertConfig(**ENC, attn_implementation="eager")), BERT),
    "roberta_cls": (
        lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**ENC, pad_token_id=1)),
        _bert("roberta.", **{"classifier.dense": "linear", "classifier.out_proj": "head"}),
    ),
    "electra_cls": (
        lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**ENC, embedding_size=32)),
        _bert(
            "electra.",
            **{"electra.embeddings_project": "linear", "classifier.dense": "linear", "classifier.out_proj": "head"},
        ),
    ),
    "distilbert_cls": (
        lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(
                vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64
            )
        ),
        expect(
            {
                "distilbert.transformer.layer": {
                    "attention.q_lin": "q",
                    "attention.k_lin": "k",
                    "attention.v_lin": "v",
                    "attention.out_lin": "o",
                    "ffn.lin1": "mlp.up",
                    "ffn.lin2": "mlp.down",
                }
            },
            {
                "distilbert.embeddings.word_embeddings": "embed",
                "distilbert.embeddings.position_embeddings": "embed",
                "pre_classifier": "linear",
                "classifier": "head",
            },
        ),
    ),
    "albert": (
        lambda: T.AlbertModel(T.AlbertConfig(**ENC, embedding_size=32)),
        expect(
            {
                "encoder.albert_layer_groups.0.albert_layers": {
                    "attention.query": "q",
                    "attention.key": "k",
                    "attention.value": "v",
                    "attention.dense": "o",
                    "ffn": "mlp.up",
                    "ffn_output": "mlp.down",
                }
            },
            BERT_EMB | {"encoder.embedding_hidden_mapping_in": "linear", "pooler": "linear"},
            n=1,
        ),
    ),
    "deberta_v2": (
        lambda: T.DebertaV2Model(T.DebertaV2Config(**ENC)),
        expect(
            {"encoder.layer": DEBERTA_LAYER},
            {"embeddings.word_embeddings": "embed", "embeddings.position_embeddings": "embed"},
        ),
    ),
    "clip_text": (
        lambda: T.CLIPTextModel(
            T.CLIPTextConfig(
                vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
            )
        ),
        expect(
            {"encoder.layers": _sub("self_attn", QKVO | {"out_proj": "o"}) | _sub("mlp", FC)},
            {"embeddings.token_embedding": "embed", "embeddings.position_embedding": "embed"},
        ),
    ),
    "vit_cls": (
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                image_size=32,
                patch_size=8,
                num_labels=3,
            )
        ),
        expect(
            {"vit.layers": _sub("attention", QKVO | {"o_proj": "o"}) | _sub("mlp", FC)},
            {"vit.embeddings.patch_embeddings.projection": "linear", "classifier": "head"},
        ),
    ),
}


def _build(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory().eval()


def _timed_roles(name: str, model: nn.Module, **kw) -> dict[str, frozenset[str]]:
    start = time.perf_counter()
    found = graph.roles(model, **kw)
    TIMINGS[name] = time.perf_counter() - start
    return found


def _diff(got: dict, want: dict) -> str:
    lines = [
        f"{p}: got {sorted(got.get(p, ()))} want {sorted(want.get(p, ()))}"
        for p in sorted(set(got) | set(want))
        if got.get(p) != want.get(p)
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- role tests

NAMED = {
    "gpt2": (models.tiny_gpt2, GPT2),
    "bert": (models.tiny_bert, BERT),
    "bert_cls": (models.tiny_bert_cls, BERT_CLS),
    "llama": (models.tiny_llama, LLAMA),
    "qwen2": (models.tiny_qwen2, LLAMA),
    "mistral": (models.tiny_mistral, LLAMA),
    "tiny_transformer": (models.TinyTransformer, TINY),
    "tiny_transformer_tied": (lambda: models.TinyTransformer(tied=True), TINY),
    "fused_qkv": (models.FusedQKVTransformer, FUSED),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_roles_named_models(name):
    factory, want = NAMED[name]
    got = _timed_roles(name, factory())
    assert got == want, _diff(got, want)


@pytest.mark.parametrize("name", list(ARCHS))
def test_roles_other_architectures(name):
    factory, want = ARCHS[name]
    got = _timed_roles(name, _build(factory))
    assert got == want, _diff(got, want)


def test_roles_minilm_real_weights():
    model = models.minilm()
    got = _timed_roles("minilm (6 layers, stand-in)", model)
    assert got == MINILM, _diff(got, MINILM)
    assert graph._CACHE[model].graph is None  # found from the few-layer stand-in, not a full trace


def test_every_role_path_is_a_module_and_linear_roles_are_linear_like():
    model = models.tiny_gpt2()
    mods = dict(model.named_modules())
    for path, found in graph.roles(model).items():
        assert path in mods
        if "linear" in found:
            assert isinstance(mods[path], (nn.Linear, T.pytorch_utils.Conv1D))


# ----------------------------------------------------------------------------- plain modules


class TiedFunctional(models.TinyTransformer):
    """Tied output projection written as F.linear with the embedding's weight (no head module)."""

    def __init__(self) -> None:
        super().__init__()
        del self.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.embed.weight)


class NeedsInputs(models.TinyTransformer):
    """symbolic_trace cannot follow int(shape); torch.export can, given example inputs."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids[:, : int(input_ids.shape[1])])


class DataDependent(nn.Module):
    """Control flow on tensor values: neither tracer can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(1, 4), heads=st.sampled_from([1, 2, 4]), tied=st.booleans(), fused=st.booleans())
def test_plain_transformers_of_any_size(layers, heads, tied, fused):
    if fused:
        got = graph.roles(models.FusedQKVTransformer(layers=layers, heads=heads))
        want = expect(
            {"layers": {"qkv": "qkv", "proj": "o", "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}},
            {"tok": "embed", "head": "head"},
            n=layers,
        )
    else:
        got = graph.roles(models.TinyTransformer(layers=layers, heads=heads, tied=tied))
        want = expect(
            {"blocks": {"q": "q", "k": "k", "v": "v", "out": "o", "fc1": "mlp.up", "fc2": "mlp.down"}},
            {"embed": "embed", "pos": "embed", "lm_head": "head"},
            n=layers,
        )
    assert got == want, _diff(got, want)


def test_tied_functional_head_is_the_embedding():
    got = graph.roles(TiedFunctional())
    want = {**TINY, "embed": frozenset({"embed", "head"})}
    del want["lm_head"]
    assert got == want, _diff(got, want)


def test_torch_transformer_encoder_mlp_found_through_export():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False
            )
            self.out = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.enc(self.emb(x)))

    model = Encoder().eval()
    got = graph.roles(model, example_inputs=(torch.zeros(2, 8, dtype=torch.long),))
    # MultiheadAttention keeps q/k/v in one raw in_proj_weight, so only its FFN has module roles.
    want = expect(
        {"enc.layers": {"linear1": "mlp.up", "linear2": "mlp.down", "self_attn.out_proj": "linear"}},
        {"emb": "embed", "out": "head"},
    )
    assert got == want, _diff(got, want)


def test_graph_error_without_example_inputs_names_the_fix():
    model = NeedsInputs()
    with pytest.raises(GraphError, match="example_inputs=") as err:
        graph.roles(model)
    assert "symbolic_trace" in str(err.value)
    # With inputs, torch.export takes over; the result is cached for later calls without inputs.
    got = graph.roles(model, example_inputs=(models.batch_for(model),))
    assert got == TINY, _diff(got, TINY)
    assert graph.roles(model) == TINY


def test_graph_error_names_both_failures():
    with pytest.raises(GraphError) as err:
        graph.roles(DataDependent(), example_inputs=(torch.ones(2, 4),))
    msg = str(err.value)
    assert "symbolic_trace" in msg and "torch.export" in msg and "example_inputs=" in msg


# ----------------------------------------------------------------------------- meta device, stand-in


def test_meta_device_models():
    with torch.device("meta"):
        plain = models.TinyTransformer()
    assert graph.roles(plain) == TINY
    cfg = models.tiny_llama().config
    with torch.device("meta"):
        llama = T.LlamaForCausalLM(cfg)
    got = graph.roles(llama)
    assert got == LLAMA, _diff(got, LLAMA)


def _full_graph_roles(model: nn.Module) -> dict[str, frozenset[str]]:
    graph.clear_cache(model)
    graph.build_graph(model)  # a cached full graph makes roles() read it instead of a stand-in
    return graph.roles(model)


def test_standin_matches_full_graph_on_deeper_models():
    cfg = T.LlamaConfig(**{**DEC, "num_hidden_layers": 5})
    model = _build(lambda: T.LlamaForCausalLM(cfg))
    via_standin = graph.roles(model)
    assert graph._CACHE[model].graph is None
    assert via_standin == expect({"model.layers": LLAMA_LAYER}, LLAMA_LIKE_TOP, n=5)
    assert _full_graph_roles(model) == via_standin


def test_standin_maps_heterogeneous_layers_by_structure():
    # Sparse MoE blocks on odd layers, dense MLPs on even ones: each layer maps to a stand-in layer
    # of the same structure, not merely the same index.
    cfg = T.Qwen2MoeConfig(
        **{**DEC, "num_hidden_layers": 4},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=2,
    )
    model = _build(lambda: T.Qwen2MoeForCausalLM(cfg))
    dense = _sub("mlp", {"gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"})
    sparse = _sub("mlp.shared_expert", {"gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"})
    sparse["mlp.shared_expert_gate"] = "linear"
    attn = _sub("self_attn", QKVO | {"o_proj": "o"})
    want = {}
    for i in range(4):
        want |= {f"model.layers.{i}.{k}": _expand(v) for k, v in (attn | (sparse if i % 2 else dense)).items()}
    want |= {k: _expand(v) for k, v in LLAMA_LIKE_TOP.items()}
    got = graph.roles(model)
    assert got == want, _diff(got, want)
    assert graph._CACHE[model].graph is None
    assert _full_graph_roles(model) == want


def test_standin_not_trusted_when_a_layer_was_changed():
    cfg = T.LlamaConfig(**{**DEC, "num_hidden_layers": 4})
    model = _build(lambda: T.LlamaForCausalLM(cfg))

    class MyLinear(nn.Linear):
        pass

    old = model.model.layers[3].mlp.up_proj
    model.model.layers[3].mlp.up_proj = MyLinear(old.in_features, old.out_features, bias=False)
    got = graph.roles(model)
    assert graph._CACHE[model].graph is not None  # fell back to tracing the model itself
    assert got == expect({"model.layers": LLAMA_LAYER}, LLAMA_LIKE_TOP, n=4)


def test_llama2_7b_shape_on_meta_is_fast(capsys):
    cfg = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    start = time.perf_counter()
    got = graph.roles(model)
    elapsed = time.perf_counter() - start
    TIMINGS["llama-2-7b shape, meta"] = elapsed
    with capsys.disabled():
        print(f"\n[graph] roles of a Llama-2-7B-shaped model on meta: {elapsed:.2f}s")
    assert got == expect({"model.layers": LLAMA_LAYER}, LLAMA_LIKE_TOP, n=32)


# ----------------------------------------------------------------------------- cache and side effects


def test_cache_second_call_does_not_rebuild(monkeypatch):
    calls = []
    real_trace = graph._trace
    monkeypatch.setattr(graph, "_trace", lambda *a: calls.append(1) or real_trace(*a))
    model = models.tiny_llama()
    first = graph.roles(model)
    assert len(calls) == 1
    with torch.no_grad():  # parameter values are not part of the cache key
        for p in model.parameters():
            p.add_(1.0)
    assert graph.roles(model) == first and graph.build_graph(model) is graph.build_graph(model)
    assert len(calls) == 1
    graph.clear_cache(model)
    assert graph.roles(model) == first and len(calls) == 2


def test_cache_is_invisible_on_the_model():
    model = models.tiny_gpt2()
    keys, attrs = list(model.state_dict()), set(vars(model))
    mods = [p for p, _ in model.named_modules()]
    graph.roles(model)
    graph.build_graph(model)
    assert list(model.state_dict()) == keys and set(vars(model)) == attrs
    assert [p for p, _ in model.named_modules()] == mods


def test_cache_does_not_keep_the_model_alive():
    for factory in (models.TinyTransformer, models.tiny_llama):
        model = factory()
        graph.roles(model)
        graph.build_graph(model)
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None


def _snapshot(model: nn.Module):
    tensors = {
        k: (v.data_ptr(), v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()
    }
    flags = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    config = model.config.to_dict() if hasattr(model, "config") else None
    return tensors, flags, hooks, config


@pytest.mark.parametrize(
    "factory",
    [models.tiny_gpt2, models.tiny_llama, models.tiny_bert_cls, models.TinyTransformer, NeedsInputs],
    ids=lambda f: f.__name__,
)
def test_graph_build_leaves_the_model_unchanged(factory):
    model = factory()
    model.train()
    model.blocks[0].eval() if hasattr(model, "blocks") else None  # mixed flags must come back as they were
    before = _snapshot(model)
    global_hooks = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))
    graph.roles(model, example_inputs=(models.batch_for(model),) if factory is NeedsInputs else None)
    graph.build_graph(model)
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    for key, (ptr, value, grad) in before[0].items():
        assert after[0][key][0] == ptr and after[0][key][2] == grad and torch.equal(after[0][key][1], value), key
    assert before[1:] == after[1:]
    assert global_hooks == (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))


def test_build_graph_is_an_fx_graph_with_owners():
    g = graph.build_graph(models.tiny_llama())
    assert isinstance(g, fx.Graph)
    stacks = [list(n.meta["nn_module_stack"].values())[-1][0] for n in g.nodes if n.meta.get("nn_module_stack")]
    assert "model.layers.0.self_attn.q_proj" in stacks


# ----------------------------------------------------------------------------- roles out of the box (issue 9)

_FINE = ("q", "k", "v", "qkv", "o", "mlp.gate", "mlp.up", "mlp.down", "head")
_L = r"\d+"  # any layer index


def _attn(prefix: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "o_proj") -> dict[str, str]:
    return {"q": f"{prefix}\\.{q}", "k": f"{prefix}\\.{k}", "v": f"{prefix}\\.{v}", "o": f"{prefix}\\.{o}"}


def _ffn(prefix: str, up: str, down: str, gate: str | None = None) -> dict[str, str]:
    out = {"mlp.up": f"{prefix}\\.{up}", "mlp.down": f"{prefix}\\.{down}"}
    return out | ({"mlp.gate": f"{prefix}\\.{gate}"} if gate else {})


_BERTISH = _attn(f"encoder\\.layer\\.{_L}\\.attention", "self.query", "self.key", "self.value", "output.dense") | _ffn(
    f"encoder\\.layer\\.{_L}", "intermediate.dense", "output.dense"
)
_SEQ2SEQ = _attn(f"model\\.(en|de)coder\\.layers\\.{_L}\\.(self_attn|encoder_attn)", o="out_proj") | _ffn(
    f"model\\.(en|de)coder\\.layers\\.{_L}", "fc1", "fc2"
)
_CLIPISH = _attn(f"(text|vision)_model\\.encoder\\.layers\\.{_L}\\.self_attn", o="out_proj") | _ffn(
    f"(text|vision)_model\\.encoder\\.layers\\.{_L}\\.mlp", "fc1", "fc2"
)


def _untowered(spec: dict[str, str]) -> dict[str, str]:
    """CLIPTextModel / CLIPVisionModel hold one tower's modules at the top (no text_model. prefix)."""
    return {k: v.replace("(text|vision)_model\\.", "") for k, v in spec.items()}


_LLAMA_ATTN = _attn(f"model\\.layers\\.{_L}\\.self_attn")
_FALCONISH = {
    "qkv": f"transformer\\.h\\.{_L}\\.self_attention\\.query_key_value",
    "o": f"transformer\\.h\\.{_L}\\.self_attention\\.dense",
    "head": "lm_head",
} | _ffn(f"transformer\\.h\\.{_L}\\.mlp", "dense_h_to_4h", "dense_4h_to_h")

# name -> (factory, {fine role: regex over the module paths it must hit exactly}); a fine role not
# listed must hit nothing (a SelectorError, not a crash). Every factory lives in tests/models.py.
OUT_OF_THE_BOX = {
    "llama": (
        models.tiny_llama,
        _LLAMA_ATTN | {"head": "lm_head"} | _ffn(f"model\\.layers\\.{_L}\\.mlp", "up_proj", "down_proj", "gate_proj"),
    ),
    "gpt2": (
        models.tiny_gpt2,
        {
            "qkv": f"transformer\\.h\\.{_L}\\.attn\\.c_attn",
            "head": "lm_head",
            "o": f"transformer\\.h\\.{_L}\\.attn\\.c_proj",
        }
        | _ffn(f"transformer\\.h\\.{_L}\\.mlp", "c_fc", "c_proj"),
    ),
    "gptj": (
        models.tiny_gptj,
        _attn(f"transformer\\.h\\.{_L}\\.attn", o="out_proj")
        | {"head": "lm_head"}
        | _ffn(f"transformer\\.h\\.{_L}\\.mlp", "fc_in", "fc_out"),
    ),
    "bert": (models.tiny_bert, _BERTISH),
    "roberta": (models.tiny_roberta, _BERTISH),
    "deberta_v2": (
        models.tiny_deberta_v2,
        _BERTISH
        | _attn(
            f"encoder\\.layer\\.{_L}\\.attention", "self.query_proj", "self.key_proj", "self.value_proj", "output.dense"
        ),
    ),
    "t5": (
        models.tiny_t5,
        {"head": "lm_head"}
        | {r: f"(en|de)coder\\.block\\.{_L}\\.layer\\.{_L}\\.(SelfAttention|EncDecAttention)\\.{r}" for r in "qkvo"}
        | _ffn(f"(en|de)coder\\.block\\.{_L}\\.layer\\.{_L}\\.DenseReluDense", "wi", "wo"),
    ),
    "bart": (models.tiny_bart, _SEQ2SEQ | {"head": "lm_head"}),
    "whisper": (models.tiny_whisper, _SEQ2SEQ | {"head": "proj_out"}),
    "clip": (models.tiny_clip, _CLIPISH | {"head": "(text|visual)_projection"}),
    "clip_text": (models.tiny_clip_text, _untowered(_CLIPISH)),
    "clip_vision": (models.tiny_clip_vision, _untowered(_CLIPISH)),
    # SigLIP's vision tower ends in an attention-pooling head: an nn.MultiheadAttention (fused raw
    # in_proj_weight, no q/k/v modules) followed by an MLP, which is found as one.
    "siglip": (
        models.tiny_siglip,
        _CLIPISH
        | {
            "head": "text_model\\.head",
            "mlp.up": _CLIPISH["mlp.up"] + "|vision_model\\.head\\.mlp\\.fc1",
            "mlp.down": _CLIPISH["mlp.down"] + "|vision_model\\.head\\.mlp\\.fc2",
        },
    ),
    "vit": (
        models.tiny_vit,
        _attn(f"vit\\.layers\\.{_L}\\.attention")
        | {"head": "classifier"}
        | _ffn(f"vit\\.layers\\.{_L}\\.mlp", "fc1", "fc2"),
    ),
    # Convolutional nets: no attention; ResNet has no FFN either (conv -> batch norm -> relu -> conv).
    "resnet": (models.tiny_resnet, {"head": "classifier\\.1"}),
    "convnext": (
        models.tiny_convnext,
        {"head": "classifier"} | _ffn(f"convnext\\.encoder\\.stages\\.{_L}\\.layers\\.{_L}", "pwconv1", "pwconv2"),
    ),
    "bloom": (models.tiny_bloom, _FALCONISH),
    "falcon": (models.tiny_falcon, _FALCONISH),
    # Mixtral / Qwen3-MoE experts are fused 3-D parameters (no linear modules), so only attention is found;
    # Qwen2-MoE's shared expert is a plain gated MLP.
    "mixtral": (models.tiny_mixtral, _LLAMA_ATTN | {"head": "lm_head"}),
    "qwen2_moe": (
        models.tiny_qwen2_moe,
        _LLAMA_ATTN
        | {"head": "lm_head"}
        | _ffn(f"model\\.layers\\.{_L}\\.mlp\\.shared_expert", "up_proj", "down_proj", "gate_proj"),
    ),
    "qwen3_moe": (models.tiny_qwen3_moe, _LLAMA_ATTN | {"head": "lm_head"}),
    # Mamba: no attention; its mixer is gated, out_proj(ssm(x) * silu(z)) with x, z from in_proj, which reads
    # as an FFN pair; the causal conv1d mixes positions, so conv1d -> silu -> x_proj is not one.
    "mamba": (
        models.tiny_mamba,
        {"head": "lm_head"} | _ffn(f"backbone\\.layers\\.{_L}\\.mixer", "in_proj", "out_proj"),
    ),
    "mlp": (models.tiny_mlp, {"head": "head"}),  # no residual stream: fc1 -> relu -> fc2 is not an FFN block
    "cnn": (models.tiny_cnn, {"head": "fc"}),
}


def _hits(model: nn.Module, selector: str) -> set[str]:
    try:
        return {site.path for site in surgery.find(model, selector)}
    except SelectorError as err:
        assert "hits no module" in str(err), err  # the usual "selector hits nothing" error, nothing else
        return set()


@pytest.mark.parametrize("name", list(OUT_OF_THE_BOX))
def test_roles_out_of_the_box(name):
    factory, spec = OUT_OF_THE_BOX[name]
    model = factory()
    paths = [p for p, _ in model.named_modules() if p]
    start = time.perf_counter()
    linear = _hits(model, "@linear")  # no inputs given: transformers models get dummy ones from their config
    TIMINGS[f"out of the box: {name}"] = time.perf_counter() - start
    want: dict[str, set[str]] = {}
    for role in _FINE:
        want[role] = {p for p in paths if role in spec and re.fullmatch(spec[role], p)}
        assert (role in spec) == bool(want[role]), f"spec for {role} matches no module: {spec.get(role)}"
        assert _hits(model, "@" + role) == want[role], role
    assert _hits(model, "@attn") == want["q"] | want["k"] | want["v"] | want["qkv"] | want["o"]
    assert _hits(model, "@mlp") == want["mlp.gate"] | want["mlp.up"] | want["mlp.down"]
    # @linear: every linear-like leaf (Linear, Conv1d/2d, transformers' Conv1D) except the head.
    leaves = {p for p, m in model.named_modules() if isinstance(m, graph._linear_types())}
    assert linear == leaves - want["head"] and linear


def test_roles_out_of_the_box_on_a_real_batch_agree():
    # The dummy inputs are only a way to run the model: a real batch gives the same roles.
    for factory in (models.tiny_whisper, models.tiny_clip, models.tiny_resnet):
        model = factory()
        dummy = graph.roles(model)
        surgery.trace(model, models.batch_for(model))
        assert graph._CACHE[model].graph is not None and graph.roles(model) == dummy, factory.__name__


def test_dummy_inputs_are_built_from_the_model():
    whisper, clip, resnet = models.tiny_whisper(), models.tiny_clip(), models.tiny_resnet()
    (w,) = graph._hf_inputs(whisper)
    assert w["input_features"].shape == (1, 16, 2 * whisper.config.max_source_positions)
    assert w["decoder_input_ids"][0, 0] == whisper.config.decoder_start_token_id
    full, minimal = graph._hf_inputs(clip)  # both towers first, the main input alone next
    assert full["pixel_values"].shape == (1, 3, 32, 32) and "input_ids" in full
    assert "pixel_values" not in minimal
    (r,) = graph._hf_inputs(resnet)  # no image_size in ResNetConfig: a small size that fits
    assert r["pixel_values"].shape == (1, 3, graph._IMAGE, graph._IMAGE)
    assert graph._hf_inputs(models.tiny_mlp()) == []


class NeedsInputsMLP(nn.Module):
    """A plain module symbolic_trace cannot follow (int() of a traced shape) and that has no config."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, : int(x.shape[1])])


def test_untraceable_plain_module_names_surgery_trace():
    model = NeedsInputsMLP()
    with pytest.raises(GraphError, match=re.escape("surgery.trace(model, inputs)")):
        surgery.find(model, "@linear")
    surgery.trace(model, torch.ones(2, 4))
    assert [s.path for s in surgery.find(model, "@head")] == ["fc"]


def test_dummy_inputs_that_do_not_run_name_surgery_trace():
    model = models.tiny_whisper()
    model.config.max_source_positions = 7  # dummy features of the wrong length: the encoder refuses them
    with pytest.raises(GraphError, match=re.escape("surgery.trace(model, inputs)")) as err:
        surgery.find(model, "@q")
    assert "dummy inputs" in str(err.value) and "input_features" in str(err.value)
    model.config.max_source_positions = 16
    surgery.trace(model, models.batch_for(model))  # a real batch fixes it
    assert len(surgery.find(model, "@q")) == 6


def test_internal_errors_become_graph_errors(monkeypatch):
    model = models.tiny_resnet()

    def broken_builder(m: nn.Module) -> list:
        raise AttributeError("'FancyConfig' object has no attribute 'image_size'")

    monkeypatch.setattr(graph, "_hf_inputs", broken_builder)
    with pytest.raises(GraphError, match=re.escape("surgery.trace(model, inputs)")) as err:
        surgery.find(model, "@head")
    assert "AttributeError" in str(err.value)
    monkeypatch.undo()

    def broken_reader(*a: object) -> dict:
        raise TypeError("unexpected node")

    monkeypatch.setattr(graph, "_find_roles", broken_reader)
    graph.clear_cache(model)
    with pytest.raises(GraphError, match="TypeError: unexpected node"):
        graph.roles(model)


def test_trace_with_inputs_replaces_the_cached_graph():
    model = models.tiny_llama()
    first = graph.build_graph(model)
    surgery.trace(model, T.BatchEncoding(models.batch_for(model)))  # a tokenizer's output: a Mapping, not a dict
    assert graph.build_graph(model) is not first and graph.roles(model) == LLAMA
    surgery.trace(model)  # without inputs: the cached graph stays
    assert graph.build_graph(model) is graph.build_graph(model)


# ----------------------------------------------------------------------------- factories


@pytest.mark.parametrize(
    "factory",
    [
        models.tiny_gpt2,
        models.tiny_bert,
        models.tiny_bert_cls,
        models.tiny_llama,
        models.tiny_qwen2,
        models.tiny_mistral,
        models.TinyTransformer,
        models.FusedQKVTransformer,
        *(f for f, _ in OUT_OF_THE_BOX.values()),
    ],
    ids=lambda f: f.__name__,
)
def test_factories_run_on_their_batch(factory):
    model = factory()
    batch = models.batch_for(model)
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    logits = out if isinstance(out, torch.Tensor) else out[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_zz_print_timings(capsys):
    with capsys.disabled():
        print("\n[graph] roles() time per model (first call, incl. graph build):")
        for name, secs in sorted(TIMINGS.items(), key=lambda kv: kv[0]):
            print(f"  {name:32s} {secs:6.2f}s")
