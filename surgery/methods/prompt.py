r"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021).

A prompt is :math:`n` learned vectors :math:`P \in \mathbb{R}^{n \times d}` in the model's
input-embedding space. With the prompt active, token embeddings :math:`(e_1, \dots, e_T)` become
:math:`(p_1, \dots, p_n, e_1, \dots, e_T)`; everything else is the frozen model. With
``encoder="mlp"`` or ``"lstm"`` (P-tuning, as PEFT's ``PromptEncoder``) :math:`P = f(P_0)`, with
:math:`f` a 3-layer MLP or a 2-layer bidirectional LSTM then a 2-layer MLP, trained together.

How the prompt gets in (``placement="prepend"``): the model's root forward pre-hook
(`Method.prepare_inputs`) puts ``n`` placeholder ids in front of ``input_ids`` and extends the
other inputs to match; the site's hook then writes :math:`P` over the placeholder rows. Keeping
``input_ids`` (not switching to ``inputs_embeds``) keeps what models read from the ids working
(last-non-pad pooling, RoBERTa's position ids). With a KV cache the prompt goes in only on a call
whose cache is empty. ``placement="inline"`` fills a `surgery.Template`'s ``[soft:N]`` slots.
Inputs, caches, ``init=`` and the stored tensors: docs/prompts.md.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeGuard

import torch
from torch import nn

from surgery.errors import CompositionError, ConfigError, SurgeryError
from surgery.methods.base import Adapter, Method, MethodConfig, NotMergeable, SiteView, register

PLACEMENTS = ("prepend", "inline")
ENCODERS = (None, "mlp", "lstm")
IGNORE_INDEX = -100

# (token of a model's state, delta name) -> slots [B, T] (-1, or the prompt row at that position),
# set by `inline` for the calls of a template
_INLINE: ContextVar[dict[tuple[int | None, str], torch.Tensor] | None] = ContextVar(
    "surgery_prompt_inline", default=None
)

_MLP = tuple(f"mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias"))
_LSTM = tuple(
    f"lstm.{w}_{k}_l{layer}{rev}"
    for layer, rev, w, k in itertools.product((0, 1), ("", "_reverse"), ("weight", "bias"), ("ih", "hh"))
)
_HEAD = tuple(f"lstm_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))


@dataclass
class PromptConfig(MethodConfig):
    """Attributes:
    n_tokens: number of prompt vectors (required).
    init: how the vectors start: "random", "vocab" (random token embeddings), "text:<text>", or token ids.
    tokenizer: the tokenizer for init="text:..."; not stored in a Delta.
    encoder: None (plain prompt tuning), "mlp" or "lstm" (P-tuning's prompt encoder).
    encoder_hidden: the encoder's width (default: the embedding width).
    placement: "prepend" (in front of the input) or "inline" (at a Template's [soft:N] slots).
    """

    n_tokens: int | None = None  # number of prompt vectors (required)
    init: Any = "random"  # "random" | "vocab" | "text:<text>" | list of token ids
    tokenizer: Any = None  # for init="text:..."; not stored in a Delta
    encoder: str | None = None  # None (plain prompt tuning) | "mlp" | "lstm" (P-tuning)
    encoder_hidden: int | None = None  # the encoder's width (default: the embedding width)
    placement: str = "prepend"  # "prepend" | "inline" (a Template's [soft:N])


def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


class Prompt(Adapter):
    """The prompt vectors of one delta, at the model's input embedding."""

    def __init__(self, n: int, dim: int, encoder: str | None, hidden: int, placement: str, like: torch.Tensor) -> None:
        super().__init__()
        kw: dict[str, Any] = {
            "device": like.device,
            "dtype": torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype,
        }
        self.n, self.dim, self.encoder, self.placement = n, dim, encoder, placement
        self.prompt_embeddings = nn.Parameter(torch.zeros(n, dim, **kw))

        def lin(d_in: int, d_out: int) -> nn.Linear:
            return nn.Linear(d_in, d_out, **kw)

        if encoder == "mlp":
            self.mlp = nn.Sequential(lin(dim, hidden), nn.ReLU(), lin(hidden, hidden), nn.ReLU(), lin(hidden, dim))
        elif encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.lstm_head = nn.Sequential(lin(2 * hidden, hidden), nn.ReLU(), lin(hidden, dim))
        # thread -> (shape of the ids, rows, cols, prompt rows) for the next call of the embedding
        self.pending: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def merge(self, site: SiteView) -> NotMergeable:
        return NotMergeable("it adds positions to the model's input, which no weight can hold")

    def extra_repr(self) -> str:
        enc = f", encoder={self.encoder}" if self.encoder else ""
        return f"n_tokens={self.n}, dim={self.dim}{enc}, placement={self.placement}"

    def prompt(self) -> torch.Tensor:
        """The prompt vectors [n, d] (through the encoder for P-tuning)."""
        e = self.prompt_embeddings
        if self.encoder == "mlp":
            return self.mlp(e)
        if self.encoder == "lstm":
            return self.lstm_head(self.lstm(e.unsqueeze(0))[0]).squeeze(0)
        return e

    def contribute(self, x: torch.Tensor, out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        got = self.pending.pop(threading.get_ident(), None)
        if got is None:
            return out
        shape, rows, cols, ks = got
        if tuple(x.shape) != shape:
            raise SurgeryError(
                f"prompt: the input embedding got ids of shape {tuple(x.shape)}, but the model was called "
                f"with {shape}; call the whole model, not its embedding"
            )
        return out.index_put((rows, cols), self.prompt().to(out.dtype)[ks])

    def arm(self, slots: torch.Tensor) -> None:
        """Write the prompt at the positions `slots` names ([B, T]: -1, or the prompt row) in the
        next call of the embedding on this thread."""
        rows, cols = (slots >= 0).nonzero(as_tuple=True)
        self.pending[threading.get_ident()] = (tuple(slots.shape), rows, cols, slots[rows, cols])


def _embed(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    # the module's own forward (so scaled embeddings stay scaled), without hooks
    return type(module).forward(module, ids.to(module.weight.device))


@register
class PromptTuning(Method):
    name = "prompt"
    identity_at_init = False
    Config = PromptConfig
    default_targets = nn.Embedding
    tensor_suffixes = ("prompt_embeddings", *_MLP, *_LSTM, *_HEAD)
    changes_inputs: ClassVar[bool] = True

    def validate(self, cfg: PromptConfig) -> None:
        if cfg.n_tokens is None:
            raise ConfigError("prompt: n_tokens= is required (the number of prompt vectors, e.g. n_tokens=20)")
        if not _int(cfg.n_tokens) or cfg.n_tokens <= 0:
            raise ConfigError(f"prompt: n_tokens must be a positive integer, got {cfg.n_tokens!r}")
        init = cfg.init
        if isinstance(init, str):
            if init not in ("random", "vocab") and not (init.startswith("text:") and init[5:].strip()):
                raise ConfigError(
                    f"prompt: init must be 'random', 'vocab', 'text:<some text>' or a list of token ids, got {init!r}"
                )
        elif not (isinstance(init, (list, tuple)) and init and all(_int(i) and i >= 0 for i in init)):
            raise ConfigError(f"prompt: init as token ids must be a non-empty list of ids >= 0, got {init!r}")
        if cfg.encoder not in ENCODERS:
            raise ConfigError(f"prompt: encoder must be None, 'mlp' or 'lstm' (P-tuning), got {cfg.encoder!r}")
        if cfg.encoder_hidden is not None and not (_int(cfg.encoder_hidden) and cfg.encoder_hidden > 0):
            raise ConfigError(f"prompt: encoder_hidden must be a positive integer, got {cfg.encoder_hidden!r}")
        if cfg.placement not in PLACEMENTS:
            raise ConfigError(f"prompt: placement must be one of {list(PLACEMENTS)}, got {cfg.placement!r}")

    def config_dict(self, cfg: PromptConfig) -> dict[str, Any]:
        out = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "tokenizer"}
        if isinstance(out["init"], tuple):
            out["init"] = list(out["init"])
        return out

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def place(self, model: nn.Module, hits: list[tuple[str, nn.Module]], cfg: PromptConfig) -> list:
        embs = [(p, m) for p, m in hits if self.supports(m)]
        check_token_input(model)
        want = token_embedding(model)
        if want is not None:
            if mine := [(p, m) for p, m in embs if m is want[1]]:
                return mine[:1]
            if embs:
                raise ConfigError(
                    f"prompt: targets= hits {', '.join(p for p, _ in embs[:6])}, but {type(model).__name__} reads "
                    f"its token ids through {want[0]!r}: a prompt must sit on that embedding to be used; leave "
                    "targets= out (the default finds it) or point it there"
                )
            return embs
        if len(embs) <= 1:
            return embs
        raise ConfigError(
            f"prompt: the selector hits {len(embs)} embeddings ({', '.join(p for p, _ in embs[:6])}) and the "
            "model names no input embedding (get_input_embeddings); point targets= at the token embedding"
        )

    def make(self, site: SiteView, cfg: PromptConfig, shapes: dict[str, torch.Size] | None = None) -> Adapter:
        module, path, model = site.module, site.path, site.model
        assert isinstance(module, nn.Embedding)
        if model is not None:  # apply() builds sites without place(): the same rule
            check_token_input(model)
            want = token_embedding(model)
            if want is not None and module is not want[1]:
                raise ConfigError(
                    f"prompt: {path!r} is not the embedding {type(model).__name__} reads its token ids through "
                    f"({want[0]!r}); a prompt there would never be used. Inject it at {want[0]!r}"
                )
        dim, like = module.embedding_dim, module.weight
        n = int(shapes["prompt_embeddings"][0]) if shapes and "prompt_embeddings" in shapes else cfg.n_tokens
        hidden = cfg.encoder_hidden or dim
        if shapes and "mlp.0.weight" in shapes:
            hidden = int(shapes["mlp.0.weight"][0])
        elif shapes and "lstm.weight_hh_l0" in shapes:
            hidden = int(shapes["lstm.weight_hh_l0"][1])
        assert n is not None
        ad = Prompt(n, dim, cfg.encoder, hidden, cfg.placement, like)
        if shapes is None and not like.is_meta:
            rows = self._init_rows(module, cfg, n)
            with torch.no_grad():
                ad.prompt_embeddings.copy_(rows.to(ad.prompt_embeddings.dtype))
            cfg.tokenizer = None  # used once, for init; the model does not keep it
        get_encoder = getattr(model, "get_encoder", None)
        if model is not None and cfg.placement == "prepend" and is_seq2seq(model) and callable(get_encoder):
            # a plain tuple, not an attribute nn.Module would register; `attached` takes it
            ad.__dict__["_seq2seq"] = (model, get_encoder())
        return ad

    def attached(self, adapters: dict[str, Adapter]) -> None:
        for ad in adapters.values():
            got = ad.__dict__.pop("_seq2seq", None)
            if got is not None and isinstance(ad, Prompt):
                model, encoder = got
                ad.__dict__["encoder_hook"] = encoder.register_forward_pre_hook(
                    _EncoderInputs(model, ad), with_kwargs=True
                )

    def detached(self, adapters: dict[str, Adapter]) -> None:
        for ad in adapters.values():
            handle = ad.__dict__.pop("encoder_hook", None)
            if handle is not None:
                handle.remove()

    def _init_rows(self, module: nn.Embedding, cfg: PromptConfig, n: int) -> torch.Tensor:
        init, vocab = cfg.init, module.num_embeddings
        with torch.no_grad():
            if init == "random":
                std = module.weight.detach().float().std().item()
                return torch.randn(n, module.embedding_dim, device=module.weight.device) * std
            if init == "vocab":
                return _embed(module, torch.randint(0, vocab, (n,))).float()
            if isinstance(init, str):  # text:...
                tok = cfg.tokenizer
                if tok is None:
                    raise ConfigError(
                        f"prompt: init={init!r} needs the model's tokenizer: pass tokenizer=tok (or init=[token ids])"
                    )
                ids = list(tok(init[5:], add_special_tokens=False)["input_ids"])
                if not ids:
                    raise ConfigError(f"prompt: the tokenizer gives no tokens for {init[5:]!r}")
            else:
                ids = list(init)
            if bad := [i for i in ids if i >= vocab]:
                raise ConfigError(f"prompt: init token ids {bad[:5]} are outside the vocabulary (size {vocab})")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return _embed(module, torch.tensor(ids, dtype=torch.long)).float()

    # ------------------------------------------------------------------ the model's inputs

    def prepare_inputs(
        self, model: nn.Module, spec: tuple[Any, ...], args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        got = _active(model, spec)
        if got is None:
            return None
        front, inline = got
        if is_seq2seq(model):
            # the encoder's own pre-hook (`_EncoderInputs`) extends its input; here only the mask the
            # decoder's cross-attention reads over the encoder's output gets the prompt's positions
            return _seq2seq_mask(front, args, kwargs)
        return _extend(model, front, inline, args, kwargs)


def _prompts(model: nn.Module) -> list[str]:
    """The names of the model's prompt deltas, in injection order."""
    from surgery import engine

    return [n for n in engine.names(model) if engine.method_of(model, n).name == PromptTuning.name]


def _active(model: nn.Module, spec: tuple[Any, ...]) -> tuple[list[Prompt], list[tuple[Prompt, torch.Tensor]]] | None:
    """The prompts active in `spec` that put vectors in front, and the inline ones with their slots."""
    from surgery import engine

    key = engine.context_key(model)
    mine = set(_prompts(model))
    if not mine:
        return None
    ads: dict[str, Prompt] = {n: next(iter(engine.adapters(model, n).values())) for n in mine}  # type: ignore[misc]
    tid = threading.get_ident()
    for ad in ads.values():  # what a failed call may have left
        ad.pending.pop(tid, None)
    if nested := [n for b in spec if not isinstance(b, str) for n in b.names() if n in mine]:
        raise CompositionError(
            f"prompt {nested[0]!r} sits inside a composition block; a prompt extends the model's input "
            f"for every row, so activate it by name: surgery.use(model, {nested[0]!r}, <block>)"
        )
    front = [ads[n] for n in spec if isinstance(n, str) and n in mine and ads[n].placement == "prepend"]
    given = _INLINE.get() or {}
    inline = [
        (ads[n], given[(key, n)])
        for n in spec
        if isinstance(n, str) and n in mine and ads[n].placement == "inline" and (key, n) in given
    ]
    if not front and not inline:
        return None
    return front, inline


class _EncoderInputs:
    """Forward pre-hook on a seq2seq model's encoder: the prompt goes in front of the encoder's input
    there, because generate() runs the encoder by itself before any call of the whole model. Each
    prepend prompt has one; only the first prompt injected acts (for all active ones, in order)."""

    def __init__(self, model: nn.Module, adapter: Prompt) -> None:
        self.model, self.adapter = model, adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        from surgery import engine

        model = self.model
        lead = next((n for n in _prompts(model) if engine.config_of(model, n).placement == "prepend"), None)
        if lead is None or next(iter(engine.adapters(self.model, lead).values())) is not self.adapter:
            return None
        got = _active(self.model, engine.active(self.model))
        return None if got is None else _extend(self.model, *got, args, kwargs, encoder=True)


def _seq2seq_mask(front: list[Prompt], args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    n = sum(ad.n for ad in front)
    mask = kwargs.get("attention_mask")
    if not n or not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() != 2:
        raise SurgeryError(
            f"a prompt is active and the attention mask has {mask.dim()} dimensions; only a 2-D [batch, length] "
            "mask can be extended to cover the prompt"
        )
    enc = kwargs.get("encoder_outputs")
    if enc is not None:  # the encoder ran already (generate): its output has the prompt's positions or not
        h = getattr(enc, "last_hidden_state", None)
        length = (enc[0] if h is None else h).shape[1]
        if mask.shape[-1] == length:
            return None
        if mask.shape[-1] != length - n:
            raise SurgeryError(
                f"prompt: the attention mask has {mask.shape[-1]} positions and the encoder's output {length}; "
                f"with the active prompts' {n} it must have {length - n} (or {length} counting them)"
            )
    else:
        given = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1])
        x = next((v for v in given if isinstance(v, torch.Tensor)), None)
        if x is None or mask.shape[-1] != x.shape[1]:
            return None  # the model reports the mismatch itself
    return args, {**kwargs, "attention_mask": _front(mask, n, 1)}


# the names transformers has given the KV cache argument (5.x: `cache`; 4.x: `past_key_values`)
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "cache_params", "layer_past", "past", "mems")


def _find_cache(kwargs: dict) -> Any:
    """The KV cache of a call, whatever its keyword: a known name, else any `transformers.Cache` value."""
    if known := [kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None]:
        return known[0]
    try:
        from transformers import Cache
    except ImportError:  # a plain torch model
        return None
    return next((v for v in kwargs.values() if isinstance(v, Cache)), None)


def _fixed_length(cache: Any) -> bool:
    """Whether a transformers cache has layers of a fixed length that do not roll (StaticCache's)."""
    try:
        from transformers import cache_utils
    except ImportError:  # a plain torch model
        return False
    static = getattr(cache_utils, "StaticLayer", None)
    rolling = getattr(cache_utils, "StaticSlidingWindowLayer", ())
    layers = getattr(cache, "layers", None)
    if static is None or not isinstance(layers, (list, tuple)):
        return False
    return any(isinstance(la, static) and not isinstance(la, rolling) for la in layers)


def _cache_len(past: Any) -> int | None:
    """How many positions a KV cache holds (0: none, or empty: the call starts a sequence); None for
    a recurrent state that has seen input but has no length (Mamba's): a continuing call."""
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except ValueError:  # transformers: a cache of recurrent layers only has no sequence length
            has = getattr(past, "has_previous_state", None)
            seen = False
            if callable(has):
                with contextlib.suppress(ValueError):
                    seen = bool(has())
            return None if seen else 0
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])  # legacy tuples: ((key [B, H, T, D], value), ...) per layer
    return 0


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder (T5, BART, ...): the prompt goes in front of the encoder's input."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


def check_token_input(model: nn.Module) -> None:
    """Refuse a model whose main input is not token ids (speech, vision): a prompt is vectors put in
    front of token embeddings, and such a model's input never goes through a token embedding."""
    main = getattr(model, "main_input_name", None)
    if getattr(model, "config", None) is None or not isinstance(main, str) or main in _TOKEN_INPUTS:
        return
    raise ConfigError(
        f"prompt: {type(model).__name__}'s main input is {main!r}, not token ids; a prompt puts learned vectors "
        "in front of the token embeddings of the input, which this model's input never goes through. "
        "Use 'prefix' (learned keys and values in every attention layer), 'lora' or 'adapter' instead"
    )


def token_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The embedding the model reads its main input's token ids through, or None when the model
    does not say (a plain module): the encoder's input embedding when the model has an encoder of
    its own with one (T5's `encoder.embed_tokens`, not the `shared` it is tied to), else
    `get_input_embeddings()`, else the one embedding whose size is the config's vocabulary."""
    found: nn.Module | None = None
    get_enc = getattr(model, "get_encoder", None)
    if callable(get_enc):
        with contextlib.suppress(Exception):  # a best-effort lookup in transformers
            enc = get_enc()
            if enc is not model and callable(getattr(enc, "get_input_embeddings", None)):
                found = enc.get_input_embeddings()
    if not isinstance(found, nn.Embedding):
        found = None
        get = getattr(model, "get_input_embeddings", None)
        if callable(get):
            with contextlib.suppress(NotImplementedError, AttributeError):
                found = get()
    if not isinstance(found, nn.Embedding):
        cfg = getattr(model, "config", None)
        text = cfg.get_text_config() if cfg is not None and callable(getattr(cfg, "get_text_config", None)) else cfg
        vocab = getattr(text, "vocab_size", None)
        same = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab]
        found = same[0] if _int(vocab) and len(same) == 1 else None
    if found is None:
        return None
    path = next((p for p, m in model.named_modules() if m is found), None)
    return None if path is None else (path, found)


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's config allows, if it says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if _int(v) and v > 0:
            return int(v)
    return None


def placeholder_id(model: nn.Module) -> int:
    """The token id put where prompt vectors go (never the pad id: pad-aware pooling and
    position ids must count the prompt as tokens)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 1 if pad == 0 else 0


def _front(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    pad = torch.full((*t.shape[:-1], n), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-1)


def _positions(t: torch.Tensor, n: int) -> torch.Tensor:
    head = torch.arange(n, dtype=t.dtype, device=t.device).expand(*t.shape[:-1], n)
    return torch.cat([head, t + n], dim=-1)


def _extend(
    model: nn.Module,
    front: list[Prompt],
    inline: list[tuple[Prompt, torch.Tensor]],
    args: tuple,
    kwargs: dict,
    *,
    encoder: bool = False,
) -> tuple[tuple, dict]:
    """The call's inputs with the prompts in front. `encoder`: the call of a seq2seq model's encoder
    (no cache, no labels; its mask may already count the prompt, put there by the model's own hook)."""
    kwargs = dict(kwargs)
    embeds = kwargs.get("inputs_embeds")
    ids, positional = kwargs.get("input_ids"), False
    if ids is None and embeds is None and args and isinstance(args[0], torch.Tensor):
        if getattr(model, "config", None) is not None and len(args) > 1:
            raise SurgeryError(
                "a prompt is active: pass the model's inputs as keywords (input_ids=..., "
                "attention_mask=...) so they can be extended to match"
            )
        ids, positional = args[0], True
    x = ids if ids is not None else embeds
    if x is None:
        raise SurgeryError("a prompt is active but the call has neither input_ids nor inputs_embeds")
    b, t = x.shape[0], x.shape[1]
    n = sum(ad.n for ad in front)
    cache = None if encoder else _find_cache(kwargs)
    past = _cache_len(cache)
    limit = max_positions(model)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2 and n:
        raise SurgeryError(
            f"a prompt is active and the attention mask has {mask.dim()} dimensions; only a 2-D [batch, length] "
            "mask can be extended to cover the prompt (generate() with a static cache builds 4-D masks: "
            "use the default dynamic cache)"
        )
    if past == 0 and n and _fixed_length(cache):
        raise SurgeryError(
            "a prompt is active and the call fills a static (fixed-length) KV cache, sized without the prompt's "
            f"{n} positions (generate() with cache_implementation='static'); use the default dynamic cache"
        )
    if past == 0:
        if limit is not None and t + n > limit:
            raise SurgeryError(
                f"the input has {t} tokens and the active prompt(s) add {n}: {t + n} is more than the model's "
                f"maximum of {limit} positions; shorten the input to at most {limit - n} tokens"
            )
        if n:
            if ids is not None:
                ids = _front(ids, n, placeholder_id(model))
                at = 0
                for ad in front:
                    slots = torch.full((b, t + n), -1, dtype=torch.long, device=ids.device)
                    slots[:, at : at + ad.n] = torch.arange(ad.n, device=ids.device)
                    ad.arm(slots)
                    at += ad.n
            else:
                assert embeds is not None
                ps = [ad.prompt().to(embeds.dtype).to(embeds.device).expand(b, ad.n, -1) for ad in front]
                embeds = torch.cat([*ps, embeds], dim=1)
            if isinstance(mask, torch.Tensor) and not (encoder and mask.shape[-1] == t + n):
                kwargs["attention_mask"] = _front(mask, n, 1)
            for key in ("token_type_ids", "position_ids", "cache_position"):
                v = kwargs.get(key)
                if isinstance(v, torch.Tensor) and v.shape[-1] == t:
                    kwargs[key] = _front(v, n, 0) if key == "token_type_ids" else _positions(v, n)
            labels = None if encoder else kwargs.get("labels")
            if isinstance(labels, torch.Tensor) and labels.shape == (b, t) and not labels.is_floating_point():
                kwargs["labels"] = _front(labels, n, IGNORE_INDEX)
        for ad, slots in inline:
            if slots.shape != (b, t):
                raise SurgeryError(
                    f"prompt: the template's soft positions are for inputs of shape "
                    f"{tuple(slots.shape)}, the call has {(b, t)}"
                )
            slots = _front(slots.to(x.device), n, -1) if n else slots.to(x.device)
            if ids is not None:
                ad.arm(slots)
            else:
                assert embeds is not None
                rows, cols = (slots >= 0).nonzero(as_tuple=True)
                embeds = embeds.index_put((rows, cols), ad.prompt().to(embeds.dtype)[slots[rows, cols]])
    elif n and past is not None:  # continuing a cache that holds the prompt (generate's later steps)
        if limit is not None and past + t > limit:
            raise SurgeryError(
                f"the cache holds {past} positions (with the prompt) and the call adds {t}: "
                f"more than the model's maximum of {limit}"
            )
        shift = True
        if isinstance(mask, torch.Tensor):
            if mask.shape[-1] == past + t - n:
                kwargs["attention_mask"] = _front(mask, n, 1)
            elif mask.shape[-1] == past + t:
                shift = False  # the caller's mask (and positions) already count the prompt
            else:
                raise SurgeryError(
                    f"prompt: the attention mask has {mask.shape[-1]} positions; with {past} cached (the prompt's "
                    f"{n} included) and {t} new it must have {past + t - n} (without the prompt) or {past + t}"
                )
        if shift:
            for key in ("position_ids", "cache_position"):
                v = kwargs.get(key)
                if isinstance(v, torch.Tensor):
                    kwargs[key] = v + n
    if positional:
        args = (ids, *args[1:])
    elif ids is not None:
        kwargs["input_ids"] = ids
    else:
        kwargs["inputs_embeds"] = embeds
    return args, kwargs


@contextlib.contextmanager
def inline(model: nn.Module, name: str, slots: torch.Tensor) -> Iterator[None]:
    """Within this context, the inline prompt `name` of `model` goes at the positions `slots`
    names ([batch, length] of the call's input_ids: -1, or the prompt row there)."""
    from surgery import engine

    if name not in engine.names(model):
        raise SurgeryError(f"no prompt named {name!r} in this model")
    tok = _INLINE.set({**(_INLINE.get() or {}), (engine.context_key(model), name): slots})
    try:
        yield
    finally:
        _INLINE.reset(tok)


def prompt_length(model: nn.Module) -> int:
    """How many positions the prompts active in this context put in front of the input."""
    from surgery import engine

    mine = set(_prompts(model))
    ads = [
        next(iter(engine.adapters(model, n).values())) for n in engine.active(model) if isinstance(n, str) and n in mine
    ]
    return sum(ad.n for ad in ads if isinstance(ad, Prompt) and ad.placement == "prepend")


__all__ = [
    "PromptConfig",
    "Prompt",
    "PromptTuning",
    "check_token_input",
    "inline",
    "is_seq2seq",
    "max_positions",
    "prompt_length",
    "token_embedding",
]
