"""Prompt / completion pairs as token ids, and the padded batches every RL role reads.

A row is a mapping with ``prompt`` and ``chosen`` (and ``rejected`` for preferences). With a chat
tokenizer the prompt becomes a user turn and the generation prompt (``apply_chat_template``); the
completion is tokenised after it and ends with the tokenizer's end-of-sequence token, so the model
learns to stop. Labels are -100 on the prompt and on padding: log-probabilities count only the
completion's tokens."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgery.errors import ConfigError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One row as ids: the prompt's, and each completion's (``rejected`` empty for SFT rows)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _ids(out: Any) -> list[int]:
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.reshape(-1).tolist()
    return [int(i) for i in out]


def prompt_ids(tokenizer: Any, prompt: str, chat: bool | None = None) -> list[int]:
    """`prompt` as the model sees it before its answer: a user turn and the generation prompt when
    the tokenizer has a chat template (or `chat=True`), the plain text otherwise."""
    if chat is None:  # an HF tokenizer without a template has chat_template None
        chat = hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer, "chat_template", True) is not None
    if chat:
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return _ids(tokenizer(prompt))


def _completion(tokenizer: Any, text: str) -> list[int]:
    ids = _ids(tokenizer(text, add_special_tokens=False) if _takes_special(tokenizer) else tokenizer(text))
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("rl: the tokenizer has no eos_token_id; set one so completions can end")
    return ids + [int(eos)]


def _takes_special(tokenizer: Any) -> bool:
    import inspect

    try:
        params = inspect.signature(tokenizer.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "add_special_tokens" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def encode(
    tokenizer: Any, rows: Iterable[Mapping[str, str]], *, max_length: int = 512, chat: bool | None = None
) -> list[Encoded]:
    """Rows (``prompt``, ``chosen``, optional ``rejected``) as ids. A prompt is cut from the left and a
    completion from the right so that prompt + completion fits `max_length` (the prompt keeps at least
    half); a row whose completion is empty is refused."""
    if max_length < 2:
        raise ConfigError(f"rl.encode: max_length must be >= 2, got {max_length}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row or "chosen" not in row:
            raise ConfigError(f"rl.encode: row {i} needs the keys 'prompt' and 'chosen' (and 'rejected' for pairs)")
        p = prompt_ids(tokenizer, str(row["prompt"]), chat)
        comps = [_completion(tokenizer, str(row["chosen"]))]
        if row.get("rejected") is not None:
            comps.append(_completion(tokenizer, str(row["rejected"])))
        longest = max(len(c) for c in comps)
        p = p[-max(max_length // 2, max_length - longest) :]
        comps = [c[: max_length - len(p)] for c in comps]
        if any(len(c) == 0 for c in comps):
            raise ConfigError(f"rl.encode: row {i} has no room for its completion in max_length={max_length}")
        out.append(Encoded(p, comps[0], comps[1] if len(comps) > 1 else []))
    return out


def _pad(seqs: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([[value] * (n - len(s)) + s if left else s + [value] * (n - len(s)) for s in seqs])


def sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + completion, right-padded: ``input_ids``, ``attention_mask`` and ``labels`` (the
    completion's ids, -100 elsewhere)."""
    ids = [p + c for p, c in zip(prompts, completions, strict=True)]
    labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions, strict=True)]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(s) for s in ids], 0),
        "labels": _pad(labels, IGNORE),
    }


def collate(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch: ``chosen_input_ids / _attention_mask / _labels``, and the same with ``rejected_`` when
    every row has a rejected completion."""
    if not rows:
        raise ConfigError("rl.collate: an empty batch")
    out = {f"chosen_{k}": v for k, v in sequences([r.prompt for r in rows], [r.chosen for r in rows], pad_id).items()}
    if all(r.rejected for r in rows):
        rej = sequences([r.prompt for r in rows], [r.rejected for r in rows], pad_id)
        out.update({f"rejected_{k}": v for k, v in rej.items()})
    return out


def prompts(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """The prompts alone, left-padded for `generate()`: ``input_ids`` and ``attention_mask``."""
    return {
        "input_ids": _pad([r.prompt for r in rows], pad_id, left=True),
        "attention_mask": _pad([[1] * len(r.prompt) for r in rows], 0, left=True),
    }


def batches(
    rows: Sequence[Encoded], batch_size: int, pad_id: int, *, shuffle: bool = True, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of collated batches (the last may be smaller); shuffled by `seed`."""
    if batch_size < 1:
        raise ConfigError(f"rl.batches: batch_size must be >= 1, got {batch_size}")
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([rows[j] for j in order[i : i + batch_size]], pad_id)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding id, its end-of-sequence id when it has none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ConfigError("rl: the tokenizer has neither pad_token_id nor eos_token_id")
    return int(pad)
