"""surgery.recipes.schedule / depth: depths per stack from the graph (checked against the module tree),
lr per group, LR schedulers, requires_grad over steps, resume exactness (plain loop and the HF Trainer),
deltas, explain, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import TinyTransformer, tiny_bert_cls, tiny_clip, tiny_gpt2, tiny_llama, tiny_mlp, tiny_t5

import surgery
from surgery.errors import ConfigError
from surgery.recipes.depth import CHILDREN, depths, layout, module_depths
from surgery.recipes.schedule import Schedule


def _expected(model, stack: str, below: list[str], above: list[str]) -> dict[str, tuple[str, int]]:
    """Depths from the module tree: `stack.i.*` -> i + 1, module prefixes `below` -> 0, `above` -> n + 1."""
    n = len(model.get_submodule(stack))
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(stack + "."):
            out[name] = (stack, int(name[len(stack) + 1 :].split(".")[0]) + 1)
        elif any(name.startswith(b + ".") for b in below):
            out[name] = (stack, 0)
        elif any(name.startswith(a + ".") or name == a for a in above):
            out[name] = (stack, n + 1)
    return out


def _check(model, table: list[tuple[str, list[str], list[str]]]) -> None:
    want: dict[str, tuple[str, int]] = {}
    for stack, below, above in table:
        want |= _expected(model, stack, below, above)
    got = depths(model)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


def test_depths_bert_llama_from_the_graph():
    _check(tiny_bert_cls(), [("bert.encoder.layer", ["bert.embeddings"], ["bert.pooler", "classifier"])])
    _check(tiny_llama(), [("model.layers", ["model.embed_tokens"], ["model.norm", "lm_head"])])


def test_depths_clip_two_towers_each_its_own_axis():
    m = tiny_clip()
    t, v = "text_model.encoder.layers", "vision_model.encoder.layers"
    lay = layout(m)
    assert lay.stacks == {t: 3, v: 3} and lay.found
    # logit_scale combines both towers' outputs: the top of the later one in the forward (the text tower)
    _check(
        m,
        [
            (t, ["text_model.embeddings"], ["text_model.final_layer_norm", "text_projection", "logit_scale"]),
            (v, ["vision_model.embeddings", "vision_model.pre_layrnorm"], ["vision_model.post_layernorm", "visual_projection"]),
        ],
    )  # fmt: skip


def test_depths_t5_encoder_and_decoder_and_tied_embeddings():
    m = tiny_t5()
    e, d = "encoder.block", "decoder.block"
    assert layout(m).stacks == {e: 3, d: 3}  # the inner `block.i.layer` lists are not stacks
    # the shared embedding (tied to both embed_tokens and lm_head) is first used by the encoder
    _check(m, [(e, ["shared"], ["encoder.final_layer_norm"]), (d, [], ["decoder.final_layer_norm"])])
    mods = module_depths(m)  # per module: each use of the tied matrix where that module computes
    assert mods["encoder.embed_tokens"] == (e, 0) and mods["decoder.embed_tokens"] == (d, 0)
    assert mods["lm_head"] == (d, 3)


def test_depths_vlm_vision_tower_and_decoder_apart():
    """The bug of a `.layers.N.` regex (unsloth #7834): a VLM's vision blocks and decoder blocks are two axes."""
    from models import decoder_kw
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(**{**decoder_kw(), "vocab_size": 200})
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=150)
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1] + [150] * 16 + [5, 6, 7]])  # 16 image tokens: (32 / 8) ** 2 patches
    surgery.trace(m, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32), "use_cache": False})
    v, t = "model.vision_tower.encoder.layers", "model.language_model.layers"
    assert layout(m).stacks == {v: 3, t: 3}
    _check(
        m,
        [
            (v, ["model.vision_tower.embeddings", "model.vision_tower.pre_layrnorm"],
             ["model.vision_tower.post_layernorm", "model.multi_modal_projector"]),  # the projector: fed by the tower
            (t, ["model.language_model.embed_tokens"], ["model.language_model.norm", "lm_head"]),
        ],
    )  # fmt: skip


def test_depths_fallback_overrides_and_deltas():
    m = tiny_mlp()
    lay = layout(m)
    assert not lay.found and lay.stacks == {CHILDREN: 2}
    assert depths(m) == {
        f"{c}.{w}": (CHILDREN, i) for i, c in enumerate(["fc1", "fc2", "head"]) for w in ("weight", "bias")
    }
    assert "no block stack found" in str(Schedule(m, lr=0.1).explain())

    m = tiny_bert_cls()
    s = "bert.encoder.layer"
    got = depths(m, overrides={"pooler": 1, "bert.embeddings.LayerNorm": (s, 2)})
    assert got["bert.pooler.dense.weight"] == (s, 1) and got["bert.embeddings.LayerNorm.bias"] == (s, 2)
    assert got["classifier.weight"] == (s, 3)
    for bad in ({"pooler": ("nope", 1)}, {"pooler": 9}, {"no_such_module": 1}, {"pooler": "x"}):
        with pytest.raises(ConfigError):
            depths(m, overrides=bad)

    m = tiny_llama()
    surgery.inject(m, "lora", targets=["q_proj", "lm_head"], r=2)
    got = depths(m)
    lora = {n: w for n, w in got.items() if ".surgery." in n}
    assert lora and all(w == ("model.layers", int(n.split(".")[2]) + 1) for n, w in lora.items() if "layers" in n)
    assert [w for n, w in lora.items() if n.startswith("lm_head")] == [("model.layers", 3)] * 2

    from surgery.recipes.heads import heads  # task heads sit at the backbone, their depth is its stack's top

    m = tiny_bert_cls()
    heads(m, {"a": 3, "b": 1})
    task = {n: w for n, w in depths(m).items() if ".task_heads." in n}
    assert len(task) == 4 and set(task.values()) == {("bert.encoder.layer", 3)}


def _bert_plan(m=None, **kw):
    m = m or tiny_bert_cls()  # a model's graph is built once: reuse it where a test needs several plans
    return m, Schedule(m, lr=1e-3, layer_decay=0.5, weight_decay=0.01, **kw)


def test_param_groups_lr_per_depth_weight_decay_and_every_parameter_once():
    m, plan = _bert_plan()
    groups = plan.param_groups()
    want = _expected(m, "bert.encoder.layer", ["bert.embeddings"], ["bert.pooler", "classifier"])
    names = {id(p): n for n, p in m.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter, once
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["lr"] == g["initial_lr"] == pytest.approx(1e-3 * 0.5 ** (3 - want[n][1]))
            assert g["weight_decay"] == (0.0 if n.endswith("bias") or "LayerNorm" in n else 0.01)
    assert len({g["name"] for g in groups}) == len(groups)
    opt = torch.optim.AdamW(groups)
    plan.check(opt)

    # groups: an lr multiplier for the head, its own weight decay
    m, plan = _bert_plan(groups={"classifier": {"lr_scale": 10, "weight_decay": 0.5}})
    (g,) = [g for g in plan.param_groups() if any(p is m.classifier.weight for p in g["params"])]
    assert g["lr"] == pytest.approx(1e-2) and g["weight_decay"] == 0.5


def test_lr_schedulers_multiply_the_depth_scale():
    _, plan = _bert_plan()
    opt = plan.optimizer(torch.optim.AdamW)
    base = [g["lr"] for g in opt.param_groups]
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    for k in range(1, 4):
        opt.step()
        lam.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * (1 - k / 10) for b in base])
    _, plan = _bert_plan(plan.model)
    opt = plan.optimizer(torch.optim.SGD)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    for k in range(1, 5):
        opt.step()
        cos.step()
        f = (1 + math.cos(math.pi * k / 8)) / 2
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * f for b in base])


def test_gradual_unfreezing_and_lp_ft_requires_grad_over_steps():
    m = tiny_llama()
    plan = Schedule(m, lr=1e-3).unfreeze("head", at=0).unfreeze("top", at=2, every=3)
    d = depths(m)
    # head (depth 3) at 0; top block (2) at 2; block 1 at 5; embeddings (0) at 8
    start = {0: 8, 1: 5, 2: 2, 3: 0}
    for step in (0, 1, 2, 4, 5, 7, 8, 20):
        plan.step(step)
        for n, p in m.named_parameters():
            assert p.requires_grad == (start[d[n][1]] <= step), (step, n)
    rows = plan.explain().rows
    assert {r["depth"]: r["trains from"] for r in rows} == start

    m = tiny_bert_cls()
    plan = Schedule(m, lr=1e-3).unfreeze("head").unfreeze("all", at=4)  # LP-FT
    plan.step(3)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n in depths(m) if n.startswith(("bert.pooler", "classifier"))
    }
    plan.step(4)
    assert all(p.requires_grad for p in m.parameters())
    plan.step(0)  # a pure function of the step: going back re-freezes
    assert not m.bert.embeddings.word_embeddings.weight.requires_grad

    # a selector; parameters never unfrozen stay frozen
    m = tiny_llama()
    plan = Schedule(m, lr=1e-3).unfreeze("@attn", at=1)
    plan.step(5)
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trains and all("self_attn" in n for n in trains)
    assert {r["trains from"] for r in plan.explain().rows} == {1, None}


def _loop(model, plan, opt, sched, steps: range) -> None:
    for s in steps:
        plan.step(s)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s))
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _setup():
    model = TinyTransformer()
    plan = Schedule(model, lr=1e-2, layer_decay=0.7, weight_decay=0.1).unfreeze("head").unfreeze("top", at=2, every=2)
    opt = plan.optimizer(torch.optim.AdamW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, plan, opt, sched


def test_frozen_parameters_do_not_move_and_resume_is_exact(tmp_path):
    model, plan, opt, sched = _setup()
    emb = model.embed.weight.detach().clone()
    _loop(model, plan, opt, sched, range(6))  # embeddings start at step 6: no weight decay drift, no moments
    assert torch.equal(model.embed.weight, emb) and model.embed.weight not in opt.state
    assert not torch.equal(model.blocks[0].fc1.weight, TinyTransformer().blocks[0].fc1.weight)
    _loop(model, plan, opt, sched, range(6, 8))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(full["embed.weight"], emb)

    model, plan, opt, sched = _setup()
    _loop(model, plan, opt, sched, range(5))
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "plan": plan.state_dict()},
        tmp_path / "ckpt.pt",
    )
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, plan, opt, sched = _setup()  # a fresh process would do the same
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    plan.load_state_dict(ckpt["plan"])
    assert plan.last_step == 4
    _loop(model, plan, opt, sched, range(5, 8))
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def test_state_from_another_model_or_config_is_refused():
    m, plan = _bert_plan()
    state = plan.state_dict()
    for other in (
        Schedule(m, lr=1e-3, layer_decay=0.6, weight_decay=0.01),
        Schedule(m, lr=1e-3, layer_decay=0.5, weight_decay=0.01).unfreeze("head"),
        Schedule(tiny_gpt2(), lr=1e-3, layer_decay=0.5, weight_decay=0.01),
    ):
        with pytest.raises(ConfigError, match="another model or configuration"):
            other.load_state_dict(state)
        assert other.last_step is None
    with pytest.raises(ConfigError, match="not a Schedule state"):
        plan.load_state_dict({"step": 3})


def test_deltas_only_trainable_ones_at_their_sites_depths():
    m = tiny_llama()
    surgery.inject(m, "lora", targets=["q_proj", "v_proj"], r=2)
    plan = Schedule(m, lr=1e-3, layer_decay=0.5)
    assert set(plan.params) == {n for n, p in m.named_parameters() if ".surgery." in n}
    for g in plan.param_groups():
        for p in g["params"]:
            n = next(k for k, q in m.named_parameters() if q is p)
            assert g["lr"] == pytest.approx(1e-3 * 0.5 ** (3 - (int(n.split(".")[2]) + 1)))
    plan = Schedule(m, lr=1e-3).unfreeze("top", every=1)
    plan.step(0)
    assert {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad} == {"1"}
    assert not m.model.layers[1].mlp.down_proj.weight.requires_grad  # the base stays frozen


def _trainer_run(tmp_path, steps: int, resume: str | None = None, via_hook: bool = True, plan_kw=None):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    plan = Schedule(model, lr=5e-3, layer_decay=0.8, **(plan_kw or {})).unfreeze("head").unfreeze("all", at=2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(12):
        ids = torch.randint(3, 128, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=2,
        save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if via_hook:
            trainer = plan.trainer(Trainer)(model=model, args=args, train_dataset=rows)
        else:
            opt = plan.optimizer(torch.optim.AdamW)
            trainer = Trainer(
                model=model, args=args, train_dataset=rows, optimizers=(opt, None), callbacks=[plan.callback()]
            )
        trainer.train(resume_from_checkpoint=resume)
    return model, plan, trainer


def test_trainer_hook_and_callback_resume_mid_schedule(tmp_path):
    start = tiny_llama()
    model, plan, trainer = _trainer_run(tmp_path / "a", steps=4)
    assert plan.last_step == 3 and all(p.requires_grad for p in model.parameters())
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(opt).__name__ == "AdamW"
    assert [g["initial_lr"] for g in opt.param_groups] == [g["lr"] for g in plan.param_groups()]
    assert len({g["initial_lr"] for g in opt.param_groups}) == 4  # depths 0..3 of the one stack
    # frozen until step 2: the embeddings after 2 steps are the initial ones
    from safetensors.torch import load_file

    at2 = load_file(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"))
    assert torch.equal(at2["model.embed_tokens.weight"], start.model.embed_tokens.weight)
    assert not torch.equal(at2["lm_head.weight"], start.lm_head.weight)
    assert not torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert (tmp_path / "a" / "checkpoint-2" / "schedule.json").is_file()

    # resume in a fresh model / Trainer from checkpoint-2 (the optimizer route): the same weights
    resumed, _, _ = _trainer_run(tmp_path / "a", steps=4, resume=str(tmp_path / "a" / "checkpoint-2"), via_hook=False)
    full = model.state_dict()
    assert all(torch.equal(full[k], v) for k, v in resumed.state_dict().items())
    # a different schedule refuses the checkpoint's
    with pytest.raises(ConfigError, match="another model or configuration"):
        _trainer_run(
            tmp_path / "a", steps=4, resume=str(tmp_path / "a" / "checkpoint-2"), plan_kw={"weight_decay": 0.1}
        )


def test_bad_input_is_refused_and_nothing_half_applied():
    m = tiny_bert_cls()
    for kw in ({"layer_decay": 0}, {"layer_decay": 1.5}, {"lr": -1}, {"weight_decay": -0.1}, {"no_decay": "bias"}):
        with pytest.raises(ConfigError):
            Schedule(m, **{"lr": 1e-3, **kw})
    with pytest.raises(ConfigError, match="groups"):
        Schedule(m, lr=1e-3, groups={"classifier": -2})
    plan = Schedule(m, lr=1e-3).unfreeze("head")
    before = dict(plan.until)
    for args, kw in [
        (("top",), {}),
        (("head",), {"every": 2}),
        (("all",), {"at": -1}),
        (("top",), {"every": 0}),
        (("no_such_module",), {}),
    ]:
        with pytest.raises(ConfigError):
            plan.unfreeze(*args, **kw)
        assert plan.until == before
    with pytest.raises(ConfigError, match="step must be"):
        plan.step(-1)
    params = list(m.parameters())
    with pytest.raises(ConfigError, match="misses"):
        plan.check(torch.optim.SGD(params[:-1], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch itself only warns about a duplicate
        twice = torch.optim.SGD([{"params": params + params[:1]}], lr=0.1)
    with pytest.raises(ConfigError, match="twice"):
        plan.check(twice)
    plan.param_groups()
    with pytest.raises(ConfigError, match="before building the optimizer|then build the optimizer"):
        plan.unfreeze("all", at=3)
    surgery.freeze(m)
    with pytest.raises(ConfigError, match="nothing to schedule"):
        Schedule(m, lr=1e-3)
