"""The library's main job, end to end, on a small model built from a config.

    surgery demo

inject LoRA -> train a little (the loss falls) -> merge (same outputs, no
overhead) -> unmerge (bit-exact) -> push to the local hub -> train more, push
version 2 -> a serving copy of the base loads version 1 and hot-swaps to
version 2 -> move the alias -> remove (the original model, bit for bit).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch


def _batch(vocab: int, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    # toy task: every sequence counts up by 3 modulo the vocabulary
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    return (start + 3 * torch.arange(length)) % vocab


def _train(model, opt, vocab: int, steps: int, gen: torch.Generator) -> tuple[float, float]:
    model.train()
    first = last = 0.0
    for step in range(steps):
        x = _batch(vocab, 32, 16, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
        if step % 10 == 0 or step == steps - 1:
            print(f"   step {step:3d}  loss {last:.3f}")
    model.eval()
    return first, last


def main(steps: int = 60, hub_path: str | None = None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import registry
    import surgery

    logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")

    print("\n1. find: what 'attn.*' hits")
    for site in surgery.find(model, "attn.*")[:4]:
        print("  ", site)
    inj = surgery.inject(model, "lora", targets="attn.*", r=8, alpha=16, name="count3")
    print(f"\n2. inject: {inj}")
    print(surgery.summary(model))

    print(f"\n3. train {steps} steps (AdamW, lr 3e-3) on 'count up by 3'")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    test = _batch(cfg.vocab_size, 32, 16, torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    first, last = _train(model, opt, cfg.vocab_size, steps, gen)
    print(f"   loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        with surgery.disable(model):
            base_loss = model(input_ids=test, labels=test).loss.item()
        out = model(input_ids=test, labels=test)
        print(f"\n4. held-out loss: base alone {base_loss:.3f}, with the delta {out.loss.item():.3f}")

        surgery.merge(model, "count3")
        merged = model(input_ids=test).logits
        diff = (merged - out.logits).abs().max().item()
        print(f"5. merge: max |merged - unmerged| = {diff:.2e}")
        surgery.unmerge(model, "count3")
        exact = all(torch.equal(original[k], v) for k, v in model.state_dict().items() if k in original)
        print(f"6. unmerge: base weights bit-identical: {exact}")

        d = surgery.delta(model, "count3")
        print(f"7. delta: {d}")

    tmp = None if hub_path else tempfile.TemporaryDirectory(prefix="surgery-demo-hub-")
    hub = registry.Hub(Path(hub_path) if hub_path else Path(tmp.name))  # type: ignore[union-attr]
    print(f"\n8. push to the local hub at {hub.root}")
    v1 = hub.push(model, "demo/count3", adapter="count3", alias="prod", meta={"task": "count by 3", "loss": last})
    print(f"   {v1}")
    print(f"   train {steps // 2} more steps, push version 2")
    _train(model, opt, cfg.vocab_size, steps // 2, gen)
    v2 = hub.push(model, "demo/count3", adapter="count3", meta={"task": "count by 3"}, parent=v1.version)
    print(f"   {v2}")
    with torch.no_grad():
        want2 = model(input_ids=test).logits
        serving = copy.deepcopy(model)
        surgery.remove(serving)  # a clean base, as a server holds it
        hub.load(serving, "demo/count3@prod", as_name="tenant")
        same1 = torch.equal(serving(input_ids=test).logits, out.logits)
        t = time.perf_counter()
        hub.load(serving, "demo/count3@2", as_name="tenant")  # same shapes: tensors copied in place
        swap_ms = (time.perf_counter() - t) * 1e3
        same2 = torch.equal(serving(input_ids=test).logits, want2)
    print(
        f"9. serving copy: loaded @prod (v1) identical: {same1}; hot-swap to v2 in {swap_ms:.1f} ms, identical: {same2}"
    )
    hub.alias("demo/count3", "prod", version=v2.version)
    print("   alias history:", [(h.get("alias"), h.get("version")) for h in hub.history("demo/count3@prod")])
    problems = hub.verify()
    print(f"   hub.verify(): {'clean' if not problems else problems}")
    same = same1 and same2 and not problems
    if tmp is not None:
        tmp.cleanup()

    with torch.no_grad():
        surgery.remove(model)
        restored = model.state_dict().keys() == original.keys() and all(
            torch.equal(original[k], v) for k, v in model.state_dict().items()
        )
        print(f"10. remove: original state_dict bit for bit: {restored}; class {type(model).__name__}")
    ok = last < first * 0.7 and diff < 1e-4 and exact and same and restored
    print("\ndemo", "OK" if ok else "FAILED")
    return 0 if ok else 1
