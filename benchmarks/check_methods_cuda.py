"""The five PEFT-format methods on a GPU: outputs equal PEFT's for the same tensors, merge equal to
unmerged, unmerge bit-exact, in fp32 and bf16. Not a timing; a check of the CUDA paths the CPU
suite cannot reach. Run: python benchmarks/check_methods_cuda.py [--out results.md]."""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import surgery  # noqa: E402
from registry.peft_format import save_peft  # noqa: E402

CASES = {
    "lora": {"r": 8},
    "dora": {"r": 8},
    "ia3": {},
    "vera": {"r": 16},
    "loha": {"r": 4},
    "lokr": {"r": 4},
}


def llama(dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check(method: str, kw: dict, dtype: torch.dtype, device: str, tmp: Path) -> dict:
    import peft

    model = llama(dtype, device)
    base = copy.deepcopy(model)
    ids = torch.randint(0, 256, (4, 32), device=device)
    surgery.inject(model, method, name="t", **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, "t").values():
            for t in ad.parameters():
                t.add_((torch.randn(t.shape, generator=g) * 0.1).to(t.device, t.dtype))
    ours = logits(model, ids)
    folder = tmp / f"{method}_{str(dtype)[6:]}"
    save_peft(model, folder, adapter="t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).to(device).eval()
    theirs = logits(pm, ids)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    surgery.merge(model, "t")
    merged = logits(model, ids)
    surgery.unmerge(model, "t")
    exact = all(torch.equal(v, surgery.base_state_dict(model)[k]) for k, v in before.items())
    scale = ours.abs().max().item()
    return {
        "method": method,
        "dtype": str(dtype)[6:],
        "ours vs PEFT, max abs diff": (ours - theirs).abs().max().item(),
        "merged vs unmerged, max abs diff": (merged - ours).abs().max().item(),
        "logit scale": scale,
        "unmerge bit-exact": exact,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="docs/results/check_methods_cuda.md")
    opt = ap.parse_args()
    tmp = Path("/tmp/check_methods_cuda")
    rows = [check(m, kw, dt, opt.device, tmp) for dt in (torch.float32, torch.bfloat16) for m, kw in CASES.items()]
    name = torch.cuda.get_device_name() if opt.device == "cuda" else opt.device
    import peft
    import transformers

    lines = [
        "# The PEFT-format methods on a GPU",
        "",
        f"`benchmarks/check_methods_cuda.py` on {name}: torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}. A 2-layer, 128-wide Llama, random non-zero "
        "delta tensors, batch 4 x 32; PEFT reads our `save_peft` folder.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + " --- |" * len(rows[0]),
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opt.out).write_text(text)


if __name__ == "__main__":
    main()
