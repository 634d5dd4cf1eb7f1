r"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021).

A prompt is :math:`n` learned vectors :math:`P \in \mathbb{R}^{n \times d}` in the
model's input-embedding space. With the prompt active, a sequence of token
embeddings :math:`E = (e_1, \dots, e_T)` becomes

.. math::  (p_1, \dots, p_n, e_1, \dots, e_T)

and everything else is the frozen model. With ``encoder="mlp"`` or ``"lstm"``
(P-tuning, as PEFT's ``PromptEncoder``) the vectors are reparameterised,
:math:`P = f(P_0)`, with :math:`f` a 3-layer MLP or a 2-layer bidirectional
LSTM followed by a 2-layer MLP; :math:`P_0` and :math:`f` train together.

How the prompt gets in (``placement="prepend"``, the default): the model's root
forward pre-hook (`Method.prepare_inputs`) puts ``n`` placeholder token ids in
front of ``input_ids`` and extends the other inputs to match:
``attention_mask`` gets ``n`` ones in front, ``token_type_ids`` ``n`` zeros,
token-level ``labels`` (integer, ``[B, T]``) ``n`` ``-100``, explicit
``position_ids`` / ``cache_position`` become ``0..n-1`` followed by the given
ones shifted by ``n``. The input embedding module then runs on those ids as
usual and the site's hook writes :math:`P` over the placeholder rows. Keeping
``input_ids`` (instead of switching to ``inputs_embeds``) keeps what models
read from the ids working: the last-non-pad-token pooling of decoder sequence
classifiers, RoBERTa's position ids. A call with ``inputs_embeds`` gets
:math:`P` concatenated in front of them directly. Outputs have the ``n`` extra
positions in front (``logits[:, n:]`` line up with the input), as in PEFT.

With a KV cache (``generate()``), the prompt is put in only on a call whose
cache is empty; a call continuing a non-empty cache only gets ``n`` ones in
front of an attention mask that lacks them, and its ``position_ids`` /
``cache_position`` shifted by ``n``.

``placement="inline"`` is for `surgery.Template`'s ``[soft:N]`` placeholders:
the vectors replace placeholder positions that the template names per call
(`inline`), nothing is prepended.

Initialisation (``init=``): ``"random"`` draws :math:`N(0, \sigma^2)` with
:math:`\sigma` the standard deviation of the embedding matrix (PEFT draws
:math:`N(0, 1)`), ``"vocab"`` copies random rows of the vocabulary,
``"text:<text>"`` the embeddings of ``<text>``'s tokens (``tokenizer=`` needed;
repeated or cut to ``n`` as PEFT's ``prompt_tuning_init_text``), a list of
token ids those rows. Tensors are stored under the embedding's path:
``prompt_embeddings`` ``[n, d]`` and the encoder's (``mlp.*``, ``lstm.*``,
``lstm_head.*``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.errors import CompositionError, ConfigError, SurgeryError
from surgery.methods.base import Adapter, Method, register

PLACEMENTS = ("prepend", "inline")
ENCODERS = (None, "mlp", "lstm")
IGNORE_INDEX = -100

# (token of a model's state, delta name) -> slots [B, T] (-1, or the prompt row at that position),
# set by `inline` for the calls of a template
_INLINE: ContextVar[dict[tuple[int, str], torch.Tensor] | None] = ContextVar("surgery_prompt_inline", default=None)

_MLP = tuple(f"mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias"))
_LSTM = tuple(f"lstm.{w}_{k}_l{layer}{rev}" for layer in (0, 1) for rev in ("", "_reverse")
              for w in ("weight", "bias") for k in ("ih", "hh"))
_HEAD = tuple(f"lstm_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))


@dataclass
class PromptConfig:
    n_tokens: int | None = None  # number of prompt vectors (required)
    init: Any = "random"  # "random" | "vocab" | "text:<text>" | list of token ids
    tokenizer: Any = None  # for init="text:..."; not stored in a Delta
    encoder: str | None = None  # None (plain prompt tuning) | "mlp" | "lstm" (P-tuning)
    encoder_hidden: int | None = None  # the encoder's width (default: the embedding width)
    placement: str = "prepend"  # "prepend" | "inline" (a Template's [soft:N])


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Prompt(Adapter):
    """The prompt vectors of one delta, at the model's input embedding."""

    def __init__(self, n: int, dim: int, encoder: str | None, hidden: int, placement: str,
                 like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device,
              "dtype": torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype}
        self.n, self.dim, self.encoder, self.placement = n, dim, encoder, placement
        self.prompt_embeddings = nn.Parameter(torch.zeros(n, dim, **kw))
        if encoder == "mlp":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                     nn.ReLU(), nn.Linear(hidden, dim, **kw))
        elif encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.lstm_head = nn.Sequential(nn.Linear(2 * hidden, hidden, **kw), nn.ReLU(),
                                           nn.Linear(hidden, dim, **kw))
        # thread -> (shape of the ids, rows, cols, prompt rows) for the next call of the embedding
        self.pending: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        enc = f", encoder={self.encoder}" if self.encoder else ""
        return f"n_tokens={self.n}, dim={self.dim}{enc}, placement={self.placement}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

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


def _embed(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # the module's own forward (so scaled embeddings stay scaled), without hooks
    return type(module).forward(module, ids.to(module.weight.device))


@register
class PromptTuning(Method):
    name = "prompt"
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
        if len(embs) <= 1:
            return embs
        get = getattr(model, "get_input_embeddings", None)
        inp = None
        if callable(get):
            with contextlib.suppress(NotImplementedError, AttributeError):
                inp = get()
        for p, m in embs:
            if m is inp:
                return [(p, m)]
        raise ConfigError(
            f"prompt: the selector hits {len(embs)} embeddings ({', '.join(p for p, _ in embs[:6])}) and the "
            "model names no input embedding (get_input_embeddings); point targets= at the token embedding"
        )

    def make(self, module: nn.Module, path: str, cfg: PromptConfig, shapes: dict[str, torch.Size] | None = None,
             *, model: nn.Module | None = None) -> Adapter:
        assert isinstance(module, nn.Embedding)
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
        return ad

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
                        f"prompt: init={init!r} needs the model's tokenizer: pass tokenizer=tok "
                        "(or init=[token ids])"
                    )
                ids = list(tok(init[5:], add_special_tokens=False)["input_ids"])
                if not ids:
                    raise ConfigError(f"prompt: the tokenizer gives no tokens for {init[5:]!r}")
            else:
                ids = list(init)
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise ConfigError(f"prompt: init token ids {bad[:5]} are outside the vocabulary (size {vocab})")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return _embed(module, torch.tensor(ids, dtype=torch.long)).float()

    # ------------------------------------------------------------------ the model's inputs

    def prepare_inputs(self, model: nn.Module, spec: tuple[Any, ...], args: tuple,
                       kwargs: dict) -> tuple[tuple, dict] | None:
        from surgery import engine

        st = engine.state_of(model)
        if st is None:
            return None
        mine = {n for n, e in st.entries.items() if e.injection.method == self.name}
        ads: dict[str, Prompt] = {n: next(iter(engine.adapters(model, n).values())) for n in mine}  # type: ignore[misc]
        tid = threading.get_ident()
        for ad in ads.values():  # what a failed call may have left
            ad.pending.pop(tid, None)
        nested = [n for b in spec if not isinstance(b, str) for n in b.names() if n in mine]
        if nested:
            raise CompositionError(
                f"prompt {nested[0]!r} sits inside a composition block; a prompt extends the model's input "
                f"for every row, so activate it by name: surgery.use(model, {nested[0]!r}, <block>)"
            )
        front = [ads[n] for n in spec if isinstance(n, str) and n in mine and ads[n].placement == "prepend"]
        given = _INLINE.get() or {}
        inline = [(ads[n], given[(st.token, n)]) for n in spec
                  if isinstance(n, str) and n in mine and ads[n].placement == "inline" and (st.token, n) in given]
        if not front and not inline:
            return None
        return _extend(model, front, inline, args, kwargs)


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])
    return 0


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


def _extend(model: nn.Module, front: list[Prompt], inline: list[tuple[Prompt, torch.Tensor]],
            args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = dict(kwargs)
    hf = getattr(model, "config", None) is not None
    embeds = kwargs.get("inputs_embeds")
    ids, positional = kwargs.get("input_ids"), False
    if ids is None and embeds is None and args and isinstance(args[0], torch.Tensor):
        if hf and len(args) > 1:
            raise SurgeryError("a prompt is active: pass the model's inputs as keywords (input_ids=..., "
                               "attention_mask=...) so they can be extended to match")
        ids, positional = args[0], True
    x = ids if ids is not None else embeds
    if x is None:
        raise SurgeryError("a prompt is active but the call has neither input_ids nor inputs_embeds")
    b, t = x.shape[0], x.shape[1]
    n = sum(ad.n for ad in front)
    past = _cache_len(kwargs.get("past_key_values"))
    limit = max_positions(model)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2 and n:
        raise SurgeryError(
            f"a prompt is active and the attention mask has {mask.dim()} dimensions; only a 2-D [batch, length] "
            "mask can be extended to cover the prompt"
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
                    slots[:, at:at + ad.n] = torch.arange(ad.n, device=ids.device)
                    ad.arm(slots)
                    at += ad.n
            else:
                assert embeds is not None
                ps = [ad.prompt().to(embeds.dtype).to(embeds.device).expand(b, ad.n, -1) for ad in front]
                embeds = torch.cat([*ps, embeds], dim=1)
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = _front(mask, n, 1)
            for key in ("token_type_ids",):
                v = kwargs.get(key)
                if isinstance(v, torch.Tensor) and v.shape[-1] == t:
                    kwargs[key] = _front(v, n, 0)
            for key in ("position_ids", "cache_position"):
                v = kwargs.get(key)
                if isinstance(v, torch.Tensor) and v.shape[-1] == t:
                    kwargs[key] = _positions(v, n)
            labels = kwargs.get("labels")
            if (isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape == (b, t)
                    and not labels.is_floating_point()):
                kwargs["labels"] = _front(labels, n, IGNORE_INDEX)
        for ad, slots in inline:
            if slots.shape != (b, t):
                raise SurgeryError(f"prompt: the template's soft positions are for inputs of shape "
                                   f"{tuple(slots.shape)}, the call has {(b, t)}")
            slots = _front(slots.to(x.device), n, -1) if n else slots.to(x.device)
            if ids is not None:
                ad.arm(slots)
            else:
                assert embeds is not None
                rows, cols = (slots >= 0).nonzero(as_tuple=True)
                embeds = embeds.index_put((rows, cols), ad.prompt().to(embeds.dtype)[slots[rows, cols]])
    elif n:  # continuing a cache that holds the prompt (generate's later steps)
        if limit is not None and past + t > limit:
            raise SurgeryError(f"the cache holds {past} positions (with the prompt) and the call adds {t}: "
                               f"more than the model's maximum of {limit}")
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
    if ids is not None:
        if positional:
            args = (ids, *args[1:])
        else:
            kwargs["input_ids"] = ids
    else:
        kwargs["inputs_embeds"] = embeds
    return args, kwargs


@contextlib.contextmanager
def inline(model: nn.Module, name: str, slots: torch.Tensor) -> Iterator[None]:
    """Within this context, the inline prompt `name` of `model` goes at the positions `slots`
    names ([batch, length] of the call's input_ids: -1, or the prompt row there)."""
    from surgery import engine

    st = engine.state_of(model)
    if st is None or name not in st.entries:
        raise SurgeryError(f"no prompt named {name!r} in this model")
    cur = _INLINE.get()
    new = dict(cur) if cur else {}
    new[(st.token, name)] = slots
    tok = _INLINE.set(new)
    try:
        yield
    finally:
        _INLINE.reset(tok)


def prompt_length(model: nn.Module) -> int:
    """How many positions the prompts active in this context put in front of the input."""
    from surgery import engine

    st = engine.state_of(model)
    if st is None:
        return 0
    total = 0
    for n in st.active():
        if isinstance(n, str) and st.entries[n].injection.method == PromptTuning.name:
            ad = next(iter(engine.adapters(model, n).values()))
            if getattr(ad, "placement", None) == "prepend":
                total += ad.n  # type: ignore[operator]
    return total


__all__ = ["PromptConfig", "Prompt", "PromptTuning", "inline", "max_positions", "prompt_length"]
