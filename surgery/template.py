r"""Hard and mixed prompts: `Template` (pattern-verbalizer pairs, PET; Schick and Schütze, 2021).

A template is text with ``{field}`` (filled from the input), ``[MASK]`` (where the label word
goes: scored at the mask token by a masked LM, at the next-token position after the text before
it by a causal LM) and ``[soft:N]`` (``N`` trainable vectors: one inline ``"prompt"`` delta
named after the template). A label's score is the mean over its words of the mean
log-probability of each word's tokens at that position; :math:`p(y \mid x)` is their softmax and
`Template.loss` its cross-entropy (PET's loss). Details: docs/prompts.md.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import engine
from surgery.errors import ConfigError
from surgery.methods import prompt as _prompt

_PART = re.compile(r"\[MASK\]|\[soft:([^\]]*)\]|\{(\w+)\}")
KINDS = ("mlm", "causal")


class Template:
    """A pattern with ``{fields}``, ``[MASK]`` and ``[soft:N]``, plus a verbalizer (label -> word(s)).

    ``kind`` is ``"mlm"`` or ``"causal"``; by default it is read from the model
    (a class ending in ``ForMaskedLM`` is a masked LM; ``ForCausalLM``,
    ``LMHeadModel`` or a decoder config a causal one). ``soft_init`` initialises
    the ``[soft:N]`` vectors as `"prompt"`'s ``init=`` does (default ``"vocab"``).
    """

    def __init__(
        self,
        text: str,
        verbalizer: Mapping[Any, str | Sequence[str]],
        tokenizer: Any,
        *,
        name: str = "template",
        kind: str | None = None,
        soft_init: Any = "vocab",
    ) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"Template: the pattern must be a non-empty string, got {text!r}")
        if tokenizer is None:
            raise ConfigError("Template: tokenizer= is needed (the model's tokenizer)")
        if kind is not None and kind not in KINDS:
            raise ConfigError(f"Template: kind must be one of {list(KINDS)} or None, got {kind!r}")
        self.text, self.tokenizer, self.name, self.kind, self.soft_init = text, tokenizer, name, kind, soft_init
        self.parts: list[tuple[str, Any]] = []
        at = 0
        for m in _PART.finditer(text):
            if m.start() > at:
                self.parts.append(("text", text[at : m.start()]))
            if m.group(0) == "[MASK]":
                self.parts.append(("mask", None))
            elif m.group(2) is not None:
                self.parts.append(("field", m.group(2)))
            else:
                raw = m.group(1).strip()
                if not raw.isdigit() or int(raw) <= 0:
                    raise ConfigError(
                        f"Template: [soft:{m.group(1)}] needs a positive number of vectors, e.g. [soft:4]"
                    )
                self.parts.append(("soft", int(raw)))
            at = m.end()
        if at < len(text):
            self.parts.append(("text", text[at:]))
        masks = sum(1 for k, _ in self.parts if k == "mask")
        if masks > 1:
            raise ConfigError(f"Template: {masks} [MASK]s in {text!r}; a template scores one position")
        self.has_mask = masks == 1
        self.fields = list(dict.fromkeys(v for k, v in self.parts if k == "field"))
        self.n_soft = sum(v for k, v in self.parts if k == "soft")
        if kind == "mlm":
            self._check_mlm()
        self.labels, self.word_ids = self._verbalize(verbalizer)
        self.split_words = [w for ws in self.word_ids.values() for w, ids in ws if len(ids) > 1]
        self._head, self._tail = _special_tokens(tokenizer)

    def __repr__(self) -> str:
        return f"Template({self.text!r}, labels={self.labels}, name={self.name!r})"

    # ------------------------------------------------------------------ setup

    def _verbalize(self, verbalizer: Any) -> tuple[list[Any], dict[Any, list[tuple[str, list[int]]]]]:
        if not isinstance(verbalizer, Mapping) or not verbalizer:
            raise ConfigError("Template: verbalizer must be a non-empty dict label -> word or list of words")
        out: dict[Any, list[tuple[str, list[int]]]] = {}
        for label, words in verbalizer.items():
            ws = [words] if isinstance(words, str) else list(words) if isinstance(words, (list, tuple)) else None
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise ConfigError(f"Template: label {label!r} needs a word or a non-empty list of words, got {words!r}")
            out[label] = []
            for w in ws:
                ids = list(self.tokenizer(w, add_special_tokens=False)["input_ids"])
                if not ids:
                    raise ConfigError(f"Template: the tokenizer gives no tokens for the label word {w!r}")
                out[label].append((w, ids))
        return list(out), out

    def _check_mlm(self) -> None:
        if not self.has_mask:
            raise ConfigError(
                f"Template: {self.text!r} has no [MASK]; a masked LM scores the label words at the mask, "
                "so put [MASK] where the label word goes"
            )
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ConfigError("Template: the tokenizer has no mask token, which a masked LM needs at [MASK]")

    def _check_vocab(self, model: nn.Module, ids: torch.Tensor) -> None:
        """Every token id the template feeds or scores must be a row of the model's vocabulary (a larger
        tokenizer's ids would crash deep inside torch's embedding lookup)."""
        emb = _prompt.token_embedding(model)
        vocab = (
            emb[1].num_embeddings if emb is not None else getattr(getattr(model, "config", None), "vocab_size", None)
        )
        if not isinstance(vocab, int):
            return
        words = [i for ws in self.word_ids.values() for _, w in ws for i in w]
        top = max(int(ids.max()) if ids.numel() else -1, max(words, default=-1))
        if top >= vocab:
            size = len(self.tokenizer) if callable(getattr(self.tokenizer, "__len__", None)) else "more"
            raise ConfigError(
                f"Template: the tokenizer gives token id {top}, but {type(model).__name__} has a vocabulary of "
                f"{vocab} (ids 0..{vocab - 1}); the tokenizer ({size} ids) is not this model's. Use the model's own "
                "tokenizer, or grow the model's vocabulary first: model.resize_token_embeddings(len(tokenizer))"
            )

    def model_kind(self, model: nn.Module) -> str:
        if self.kind is not None:
            return self.kind
        cls = type(model).__name__
        if cls.endswith("ForMaskedLM"):
            return "mlm"
        if cls.endswith(("ForCausalLM", "LMHeadModel")) or getattr(getattr(model, "config", None), "is_decoder", False):
            return "causal"
        raise ConfigError(
            f"Template: cannot tell whether {cls} is a masked or a causal LM; pass kind='mlm' or kind='causal'"
        )

    def attach(self, model: nn.Module) -> engine.Injection | None:
        """Inject the template's ``[soft:N]`` vectors into `model` (once; a later call returns the
        same injection). None when the template has no soft part."""
        if not self.n_soft:
            return None
        if self.name in engine.names(model):
            inj = engine.injection(model, self.name)
            got = (inj.method, inj.config.get("placement"), inj.config.get("n_tokens"))
            if got != ("prompt", "inline", self.n_soft):
                raise ConfigError(
                    f"Template: the model already has a delta named {self.name!r} that is not this template's "
                    f"{self.n_soft} soft vectors ({inj.method}, {inj.config}); give the template another name="
                )
            return inj
        return engine.inject(
            model,
            "prompt",
            n_tokens=self.n_soft,
            init=self.soft_init,
            tokenizer=self.tokenizer,
            placement="inline",
            name=self.name,
        )

    # ------------------------------------------------------------------ encoding

    def _values(self, x: Any) -> dict[str, Any]:
        if isinstance(x, Mapping):
            if missing := [f for f in self.fields if f not in x]:
                raise ConfigError(f"Template: input {dict(x)!r} lacks field(s) {missing} of {self.text!r}")
            return dict(x)
        if isinstance(x, str):
            if len(self.fields) != 1:
                raise ConfigError(
                    f"Template: {self.text!r} has fields {self.fields}; give each input as a dict of them"
                )
            return {self.fields[0]: x}
        raise ConfigError(f"Template: an input must be a string or a dict of fields, got {type(x).__name__}")

    def _ids(self, s: str) -> list[int]:
        return list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    def encode(self, inputs: Sequence[Any], kind: str) -> dict[str, torch.Tensor]:
        """The batch for `inputs`: input_ids, attention_mask, the scored position per row (``at``)
        and the soft positions (``slots``: -1, or the soft vector there)."""
        if isinstance(inputs, (str, Mapping)):
            inputs = [inputs]
        if not len(inputs):
            raise ConfigError("Template: no inputs")
        if kind == "mlm":
            self._check_mlm()
        tok = self.tokenizer
        holder = getattr(tok, "unk_token_id", None)
        holder = holder if holder is not None else 0
        rows, ats, slots = [], [], []
        for x in inputs:
            vals = self._values(x)
            # fields go into the text first, so subword tokenizers see the words with their spaces
            segs: list[tuple[str, Any]] = []
            for is_text, group in itertools.groupby(self.parts, key=lambda kv: kv[0] in ("text", "field")):
                if is_text:
                    segs.append(("text", "".join(str(vals[v]) if k == "field" else v for k, v in group)))
                else:
                    segs.extend(group)
            if kind == "causal" and self.has_mask:
                segs = segs[: next(i for i, (k, _) in enumerate(segs) if k == "mask")]
                if segs and segs[-1][0] == "text":
                    segs[-1] = ("text", segs[-1][1].rstrip())
            ids, slot, at, k_soft = list(self._head), [-1] * len(self._head), -1, 0
            for k, v in segs:
                if k == "text":
                    t = self._ids(v)
                    ids += t
                    slot += [-1] * len(t)
                elif k == "mask":
                    at = len(ids)
                    ids.append(tok.mask_token_id)
                    slot.append(-1)
                else:  # soft
                    ids += [holder] * v
                    slot += list(range(k_soft, k_soft + v))
                    k_soft += v
            if kind == "mlm":
                ids += self._tail
                slot += [-1] * len(self._tail)
            else:
                at = len(ids) - 1
                if at < 0:
                    raise ConfigError(
                        f"Template: nothing comes before [MASK] in {self.text!r}; "
                        "a causal LM needs some text to predict the label word from"
                    )
            rows.append(ids)
            slots.append(slot)
            ats.append(at)
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else 0
        width = max(len(r) for r in rows)
        ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        slot_t = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, slots, strict=True)):
            ids_t[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
            slot_t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return {"input_ids": ids_t, "attention_mask": mask, "at": torch.tensor(ats), "slots": slot_t}

    # ------------------------------------------------------------------ scoring

    @contextlib.contextmanager
    def _soft(self, model: nn.Module, slots: torch.Tensor) -> Iterator[None]:
        if not self.n_soft:
            yield
            return
        spec = engine.active(model)
        names = {n for it in spec for n in ([it] if isinstance(it, str) else it.names())}
        # the template's own soft vectors always take part in its calls
        ctx = contextlib.nullcontext() if self.name in names else engine.use(model, *spec, self.name)
        with ctx, _prompt.inline(model, self.name, slots):
            yield

    def scores(self, model: nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
        """Label scores s(y) [batch, labels] (mean log-probabilities of the label words), with gradients."""
        kind = self.model_kind(model)
        batch = self.encode(inputs, kind)  # every check on the input before the model is touched
        self._check_vocab(model, batch["input_ids"])
        limit = _prompt.max_positions(model)
        t = batch["input_ids"].shape[1]
        if limit is not None and t + _prompt.prompt_length(model) > limit:
            raise ConfigError(
                f"Template: the longest input has {t} tokens (+{_prompt.prompt_length(model)} of active prompts), "
                f"more than the model's maximum of {limit} positions"
            )
        self.attach(model)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with self._soft(model, batch["slots"].to(dev)):
            out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if logits is None:
            logits = out[0]
        off = logits.shape[1] - t  # positions the active prompts put in front
        rows = torch.arange(logits.shape[0], device=logits.device)
        lp = logits[rows, batch["at"].to(logits.device) + off].float().log_softmax(-1)
        words = [torch.stack([lp[:, ids].mean(-1) for _, ids in self.word_ids[y]], -1) for y in self.labels]
        return torch.stack([w.mean(-1) for w in words], -1)

    def predict(self, model: nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
        """Label probabilities [batch, labels] (columns in the order of `labels`), without gradients.
        The model's train/eval mode is left as it is."""
        with torch.no_grad():
            return self.scores(model, inputs).softmax(-1)

    def loss(self, model: nn.Module, inputs: Sequence[Any], labels: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the label distribution against `labels` (label keys, or their indices)."""
        if isinstance(labels, torch.Tensor):
            target = labels.long().flatten()
        else:
            index = {lab: i for i, lab in enumerate(self.labels)}
            try:
                target = torch.tensor([index[lab] for lab in labels], dtype=torch.long)
            except KeyError as e:
                raise ConfigError(f"Template: unknown label {e.args[0]!r}; labels are {self.labels}") from None
        n = len(inputs) if not isinstance(inputs, (str, Mapping)) else 1
        if target.numel() != n:
            raise ConfigError(f"Template: {target.numel()} labels for {n} inputs")
        s = self.scores(model, inputs)
        return F.cross_entropy(s, target.to(s.device))


def _special_tokens(tok: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text by itself ([CLS] ... [SEP], <s> ...)."""
    for probe in ("a", "x", "the", "1"):
        bare = list(tok(probe, add_special_tokens=False)["input_ids"])
        full = list(tok(probe)["input_ids"])
        if bare:
            for i in range(len(full) - len(bare) + 1):
                if full[i : i + len(bare)] == bare:
                    return full[:i], full[i + len(bare) :]
    return [], []


__all__ = ["Template"]
