"""Task heads on a shared backbone (surgery.heads), per-call and per-row task choice, the hub and
transformers' head layout, and the task samplers."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import registry
import surgery
from surgery.recipes.heads import heads, heads_from_hf, heads_to_hf, route_tasks, tasks
from surgery.recipes.tasks import TaskSampler
from tests._helpers import state_bits
from tests.models import tiny_bert, tiny_bert_cls, tiny_llama

FACTORIES = {"bert": tiny_bert, "llama": tiny_llama, "bert_cls": tiny_bert_cls}


def padded(batch: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    """Ids with right padding (pad id 0) on some rows, and their mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([seq, seq - 2, seq - 4, 3][:batch]):
        ids[row, n:], mask[row, n:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def backbone_out(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's input: the backbone's own last hidden states and pooler output."""
    out = model.base_model(**batch)
    return out.last_hidden_state, getattr(out, "pooler_output", None)


def pooled(how: str, h: torch.Tensor, pool: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    if how == "pooler":
        assert pool is not None
        return pool
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        return torch.stack([h[i, mask[i].bool()].mean(0) for i in range(h.shape[0])])
    return torch.stack([h[i, int(mask[i].nonzero().max())] for i in range(h.shape[0])])  # last non-pad


def perturb(head: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [("bert", None), ("bert", "mean"), ("bert", "cls"), ("llama", None), ("llama", "mean"), ("bert_cls", None)],
)
def test_sequence_head_is_pooling_then_its_linear(arch: str, pooling: str | None) -> None:
    model = FACTORIES[arch]()
    batch = padded()
    h = heads(model, {"sections": 8, "score": 1}, pooling=pooling)
    want_pool = pooling or {"bert": "pooler", "llama": "last", "bert_cls": "pooler"}[arch]
    assert h.specs["sections"]["pooling"] == want_pool
    assert (h["sections"].bias is None) == (want_pool == "last")  # as transformers' decoder heads
    with torch.no_grad():
        hidden, pool = backbone_out(model, batch)
        x = pooled(want_pool, hidden, pool, batch["attention_mask"])
        for task, n in (("sections", 8), ("score", 1)):
            lin = h[task]
            got = model(**batch, task=task)
            assert type(got).__name__ == "SequenceClassifierOutput" and got.loss is None
            torch.testing.assert_close(got.logits, F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-6)
            assert got.logits.shape == (4, n)


def test_losses_are_transformers_conventions() -> None:
    model = tiny_bert()
    batch = padded()
    h = heads(model, {"cls": 3, "reg": 1, "tags": ("token", 5), "multi": {"num_labels": 4, "pooling": "mean"}})
    y = torch.tensor([0, 2, 1, 2])
    out = model(**batch, task="cls", labels=y)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    r = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(**batch, task="reg", labels=r)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - r) ** 2).mean())
    tags = torch.randint(0, 5, (4, 7)).masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, task="tags", labels=tags)
    assert type(out).__name__ == "TokenClassifierOutput" and out.logits.shape == (4, 7, 5)
    with torch.no_grad():
        hidden, _ = backbone_out(model, batch)
        torch.testing.assert_close(out.logits, F.linear(hidden, h["tags"].weight, h["tags"].bias), rtol=0, atol=1e-6)
    keep = tags != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], tags[keep]))
    hot = torch.tensor([[1.0, 0, 1, 0]] * 4)  # float labels on several outputs: multi-label
    out = model(**batch, task="multi", labels=hot)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, hot))


@pytest.mark.parametrize("arch", ["bert", "bert_cls"])
def test_one_pass_for_a_mixed_batch_equals_per_task_passes(arch: str) -> None:
    model = FACTORIES[arch]()
    batch = padded()
    h = heads(model, {"a": 3, "b": 1, "t": ("token", 5)})
    for task in ("a", "b", "t"):
        perturb(h[task], seed=len(task))
    ids = ["a", "t", "b", "a"]
    labels = {"a": torch.tensor([2, 0]), "b": torch.tensor([0.5]), "t": torch.randint(0, 5, (1, 7))}
    with route_tasks(model, ids) as plan, torch.no_grad():
        out = model(**batch, labels=labels)
    assert {t: r.tolist() for t, r in plan.items()} == {"a": [0, 3], "t": [1], "b": [2]}
    assert {t: r.tolist() for t, r in out.rows.items()} == {"a": [0, 3], "t": [1], "b": [2]}
    with torch.no_grad():
        for task, rows in out.rows.items():
            sub = {k: v[rows] for k, v in batch.items()}
            one = model(**sub, task=task, labels=labels[task])
            torch.testing.assert_close(out.logits[task], one.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.losses[task], one.loss, rtol=0, atol=1e-5)
    share = sum(out.losses[t] * len(out.rows[t]) / 4 for t in out.rows)
    torch.testing.assert_close(out.loss, share)
    with torch.no_grad():  # one task per row as task= (a data collator's column) routes the same way
        per_row = model(**batch, task=ids, labels=labels)
    assert all(torch.equal(per_row.logits[t], out.logits[t]) for t in out.rows) and torch.equal(per_row.loss, out.loss)
    with route_tasks(model, torch.tensor([0, 0, 1, 2])), torch.no_grad():  # ids: indices into tasks(model)
        out = model(**batch)
    assert tasks(model) == ["a", "b", "t"] and out.rows["a"].tolist() == [0, 1] and out.loss is None


def test_a_causal_lms_own_head_is_reused() -> None:
    model = tiny_llama()
    batch = padded()
    with torch.no_grad():
        base = model(**batch, labels=batch["input_ids"])
    heads(model, {"lm": "lm_head", "sent": 2})
    with torch.no_grad():
        own = model(**batch, task="lm", labels=batch["input_ids"])  # the model's own output and loss
        assert torch.equal(own.logits, base.logits) and torch.equal(own.loss, base.loss)
        labels = {"lm": batch["input_ids"][[0, 2]], "sent": torch.tensor([1, 0])}
        with route_tasks(model, ["lm", "sent", "lm", "sent"]):
            out = model(**batch, labels=labels)
        sub = {k: v[[0, 2]] for k, v in batch.items()}
        one = model(**sub, labels=labels["lm"])
    torch.testing.assert_close(out.logits["lm"], one.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.losses["lm"], one.loss, rtol=0, atol=1e-5)
    assert out.logits["sent"].shape == (2, 2)


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_plain_forward_is_unchanged_and_remove_gives_the_base_back(arch: str) -> None:
    model = FACTORIES[arch]()
    batch = padded()
    before = state_bits(model)
    with torch.no_grad():
        want = model(**batch)
    h = heads(model, {"x": 4, "y": ("token", 3)})
    perturb(h["x"], 0)
    with torch.no_grad():
        got = model(**batch)
        with route_tasks(model, ["x"] * 4):
            model(**batch)
        model(**batch, task="x")
        again = model(**batch)
    for out in (got, again):
        assert type(out) is type(want) and out.keys() == want.keys()
        assert all(torch.equal(out[k], want[k]) for k in want.keys() if isinstance(want[k], torch.Tensor))
    with surgery.disable(model), pytest.raises(surgery.ConfigError, match="not active"):
        model(**batch, task="x")
    surgery.remove(model)
    assert surgery.names(model) == [] and state_bits(model).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in state_bits(model).items())
    with torch.no_grad():
        assert torch.equal(model(**batch)[0], want[0])


def test_training_two_heads_moves_only_their_parameters() -> None:
    model = tiny_bert()
    batch = padded()
    h = heads(model, {"a": 3, "b": 1, "c": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    home = surgery.engine.injection(model, "heads").sites[0]  # a bare backbone keeps them at its input embedding
    assert home == "embeddings.word_embeddings"
    assert trainable == {f"{home}.surgery.heads.task_heads.{t}.{w}" for t in "abc" for w in ("weight", "bias")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = {"a": torch.tensor([0, 2]), "b": torch.tensor([0.3, -0.2])}
    losses = []
    for _ in range(5):
        with route_tasks(model, ["a", "b", "a", "b"]):
            loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in trainable if ".task_heads.a." in n or ".task_heads.b." in n}
    assert torch.equal(h["c"].weight, before[next(n for n in before if n.endswith("task_heads.c.weight"))])


def test_heads_train_with_a_lora_on_the_backbone() -> None:
    model = tiny_llama()
    surgery.inject(model, "lora", r=4)
    heads(model, {"sent": 2})
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in params) and any("task_heads.sent" in n for n in params)
    loss = model(**padded(), task="sent", labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n or "task_heads" in n)
    with torch.no_grad():
        want = model(**padded(), task="sent").logits
        surgery.merge(model)  # the LoRA folds into the base; the heads stay as they are
        torch.testing.assert_close(model(**padded(), task="sent").logits, want, rtol=0, atol=1e-5)
    assert sorted(surgery.merged(model)) == ["default", "heads"]
    surgery.unmerge(model, "heads")
    surgery.unmerge(model, "default")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hub_round_trip(arch: str, tmp_path) -> None:
    model = FACTORIES[arch]()
    batch = padded()
    h = heads(model, {"sections": 8, "ner": ("token", 9)})
    perturb(h["sections"], 1)
    perturb(h["ner"], 2)
    hub = registry.Hub(tmp_path)
    hub.push(model, "acme/tasks", adapter="heads")
    d = hub.pull("acme/tasks")
    site = surgery.engine.injection(model, "heads").sites[0]
    assert d.method == "head" and len(d.tensors) == (4 if arch == "bert" else 3)  # llama's sequence head: no bias
    assert sorted(d.tensors) == sorted(f"{site}.task_heads.{n}" for n, _ in h.task_heads.named_parameters())
    fresh = FACTORIES[arch]()
    hub.load(fresh, "acme/tasks")
    with torch.no_grad():
        for task in ("sections", "ner"):
            assert torch.equal(fresh(**batch, task=task).logits, model(**batch, task=task).logits)
    d = surgery.delta(model, "heads")
    d.config["heads"]["sections"]["pooling"] = "mean"  # another pooling travels with a hot-swap's tensors
    surgery.apply(fresh, d)
    assert surgery.engine.config_of(fresh, "heads").heads["sections"]["pooling"] == "mean"
    with torch.no_grad():
        assert not torch.equal(fresh(**batch, task="sections").logits, model(**batch, task="sections").logits)
    copied = copy.deepcopy(fresh)  # a copy has its own heads and hooks
    with torch.no_grad():
        assert torch.equal(copied(**batch, task="sections").logits, fresh(**batch, task="sections").logits)
    surgery.remove(copied)
    with torch.no_grad():
        assert fresh(**batch, task="ner").logits.shape[-1] == 9
    surgery.remove(fresh)
    assert all(torch.equal(v, FACTORIES[arch]().state_dict()[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    ("arch", "spec", "cls"),
    [
        ("bert", 8, "BertForSequenceClassification"),
        ("bert", ("token", 5), "BertForTokenClassification"),
        ("llama", 3, "LlamaForSequenceClassification"),
        ("bert_cls", 4, "BertForSequenceClassification"),
    ],
)
def test_transformers_layout_round_trip(arch: str, spec, cls: str) -> None:
    import transformers

    model = FACTORIES[arch]()
    batch = padded()
    h = heads(model, {"task": spec})
    perturb(h["task"], 3)
    sd = heads_to_hf(model, "task")
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_labels = h["task"].out_features
    hf = getattr(transformers, cls)(cfg).eval()
    hf.load_state_dict(sd, strict=True)  # every key there, none left over
    with torch.no_grad():
        want = model(**batch, task="task").logits
        torch.testing.assert_close(hf(**batch).logits, want, rtol=0, atol=1e-5)
        fresh = FACTORIES[arch]()
        heads_from_hf(fresh, "task", hf)
        torch.testing.assert_close(fresh(**batch, task="task").logits, want, rtol=0, atol=1e-6)
        again = FACTORIES[arch]()
        kind = "token" if isinstance(spec, tuple) else "sequence"
        heads_from_hf(again, "task", hf.state_dict(), kind=kind)
        assert torch.equal(again(**batch, task="task").logits, fresh(**batch, task="task").logits)


def test_transformers_layout_refusals() -> None:
    model = tiny_bert()
    heads(model, {"m": {"num_labels": 2, "pooling": "mean"}})
    with pytest.raises(surgery.ConfigError, match="pools by 'pooler'"):
        heads_to_hf(model, "m")
    llama = tiny_llama()
    surgery.inject(llama, "lora", r=2)
    heads(llama, {"s": 2, "lm": "lm_head"})
    with pytest.raises(surgery.ConfigError, match="not merged"):
        heads_to_hf(llama, "s")
    with pytest.raises(surgery.ConfigError, match="model's own"):
        heads_to_hf(llama, "lm")
    with pytest.raises(surgery.ConfigError, match="no head for task 'nope'"):
        heads_to_hf(llama, "nope")


def test_heads_join_an_existing_delta() -> None:
    model = tiny_bert()
    heads(model, {"a": 2})
    h = heads(model, {"b": ("token", 3)})
    assert h.tasks == ["a", "b"] and surgery.names(model) == ["heads"]
    assert set(surgery.delta(model, "heads").config["heads"]) == {"a", "b"}
    assert model(**padded(), task="b").logits.shape == (4, 7, 3)


def test_bad_input_is_refused_with_nothing_half_applied() -> None:
    model = tiny_bert_cls()
    batch = padded()
    heads(model, {"a": 2})
    before = state_bits(model)
    bad = [
        ({"a": 3}, "exists already"),
        ({"b": 2, "classifier": 2}, "attribute of BertForSequenceClassification"),
        ({"c": ("tree", 2)}, "unknown head kind 'tree'"),
        ({"c": 0}, "num_labels must be an integer >= 1"),
        ({"c": ("token", -1)}, "num_labels must be an integer >= 1"),
        ({"c": "lm_head"}, "own LM head"),
        ({"c": {"num_labels": 2, "pooling": "max"}}, "pooling"),
        ({"c": 2.5}, "is no head"),
        ({}, "heads= is required"),
    ]
    for spec, says in bad:
        with pytest.raises(surgery.ConfigError, match=says):
            heads(model, spec)
        with pytest.raises(surgery.ConfigError, match=says):
            heads(model, spec, name="other")
        assert surgery.names(model) == ["heads"] and tasks(model) == ["a"]
        assert state_bits(model).keys() == before.keys()
    with pytest.raises(surgery.ConfigError, match=r"no head for task 'zz'; the heads there are: \['a'\]"):
        model(**batch, task="zz")
    with pytest.raises(surgery.ConfigError, match="row 1 asks for task 'zz'.*heads there are"):
        with route_tasks(model, ["a", "zz"]):
            pass
    with pytest.raises(surgery.ConfigError, match="2 task ids but the model got a batch of 4"):
        with route_tasks(model, ["a", "a"]):
            model(**batch)
    with pytest.raises(surgery.ConfigError, match="no task heads"):
        with route_tasks(tiny_bert(), ["a"]):
            pass
    assert model(**batch).logits.shape == (4, 3)  # a failed call leaves nothing behind


def test_route_is_per_context() -> None:
    import threading

    model = tiny_bert()
    batch = padded()
    heads(model, {"a": 2, "b": 3})
    seen: dict[str, object] = {}

    def other() -> None:
        with torch.no_grad():
            seen["out"] = model(**batch)

    with route_tasks(model, ["a", "b", "a", "b"]):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with torch.no_grad():
            assert model(**batch, task="b").logits.shape == (4, 3)  # task= wins over the route around it
    assert type(seen["out"]).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"


def test_the_trainer_routes_by_a_task_column(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    heads(model, {"a": 3, "b": 2})
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(3, 100, (7,), generator=g), "labels": torch.tensor(i % 2), "task": i % 2}
        for i in range(16)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False, report_to=[],
        use_cpu=True, save_strategy="no", learning_rate=1e-2,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    moved = {n.split("task_heads.")[-1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"a.weight", "a.bias", "b.weight", "b.bias"}


# ---------------------------------------------------------------------------- samplers


@pytest.mark.parametrize(
    ("strategy", "want"),
    [
        ("proportional", {"a": 0.8, "b": 0.15, "c": 0.05}),
        ("equal", {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
        ("temperature", None),
    ],
)
def test_sampler_proportions(strategy: str, want: dict[str, float] | None) -> None:
    sizes = {"a": 1600, "b": 300, "c": 100}
    s = TaskSampler(sizes, strategy, temperature=2.0, seed=0)
    if want is None:  # T5's mixing: p ~ n^(1/T)
        roots = {t: n**0.5 for t, n in sizes.items()}
        want = {t: r / sum(roots.values()) for t, r in roots.items()}
    assert s.probs == pytest.approx(want)
    n = 20000
    counts = collections.Counter(s.sample(n))
    for t, p in want.items():
        assert abs(counts[t] / n - p) < 0.012, (t, counts[t] / n, p)


def test_public_spelling() -> None:
    assert (surgery.heads, surgery.route_tasks, surgery.tasks) == (heads, route_tasks, tasks)
    assert (surgery.heads_to_hf, surgery.heads_from_hf, surgery.TaskSampler) == (
        heads_to_hf,
        heads_from_hf,
        TaskSampler,
    )


def test_sampler_resumes_and_caps() -> None:
    s = TaskSampler({"a": 5, "b": 7}, "temperature", temperature=3.0, seed=4)
    s.sample(11)
    state = s.state_dict()
    rest = s.sample(20)
    t = TaskSampler({"a": 5, "b": 7}, "temperature", temperature=3.0, seed=4)
    t.load_state_dict(state)
    assert t.sample(20) == rest
    assert TaskSampler({"a": 10**6, "b": 10}, cap=10).probs == pytest.approx({"a": 0.5, "b": 0.5})
    for kw, says in [
        ({"sizes": {}}, "non-empty"),
        ({"sizes": {"a": 0}}, "integers >= 1"),
        ({"sizes": {"a": 1}, "strategy": "zipf"}, "unknown strategy"),
        ({"sizes": {"a": 1}, "strategy": "temperature", "temperature": 0}, "temperature must be"),
    ]:
        with pytest.raises(surgery.ConfigError, match=says):
            TaskSampler(**kw)
