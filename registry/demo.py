"""The library's main job, end to end, on a small model built from a config.

    surgery demo

inject LoRA -> train a little (the loss falls) -> merge (same outputs, no
overhead) -> unmerge (bit-exact) -> move the delta into a fresh copy -> remove
(the original model, bit for bit).
"""

from __future__ import annotations

import copy
import time

import torch


def _batch(vocab: int, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    # toy task: every sequence counts up by 3 modulo the vocabulary
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    return (start + 3 * torch.arange(length)) % vocab


def main(steps: int = 60) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import surgery

    logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
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
    model.train()
    t0 = time.perf_counter()
    first = last = 0.0
    for step in range(steps):
        x = _batch(cfg.vocab_size, 32, 16, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
        if step % 10 == 0 or step == steps - 1:
            print(f"   step {step:3d}  loss {last:.3f}")
    print(f"   loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.1f} s")
    model.eval()

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
        fresh = copy.deepcopy(model)
        surgery.remove(fresh)
        surgery.apply(fresh, d)
        same = torch.equal(fresh(input_ids=test).logits, out.logits)
        print(f"   applied to a fresh copy: identical outputs: {same}")

        surgery.remove(model)
        restored = model.state_dict().keys() == original.keys() and all(
            torch.equal(original[k], v) for k, v in model.state_dict().items()
        )
        print(f"8. remove: original state_dict bit for bit: {restored}; class {type(model).__name__}")
    ok = last < first * 0.7 and diff < 1e-4 and exact and same and restored
    print("\ndemo", "OK" if ok else "FAILED")
    return 0 if ok else 1
