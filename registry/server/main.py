"""`surgery serve`: load a model, give it a slot bank and an adapter pool over the hub, and run
the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import Any

SERVE_EXAMPLES = """\
examples:
  surgery serve --model path/to/model --hub ./hub --slots 32 --port 8000 --keys keys.toml
  surgery serve --model HuggingFaceTB/SmolLM2-135M-Instruct --hub ./hub        (no keys: localhost only)
  curl localhost:8000/v1/completions -H "Authorization: Bearer $KEY" \\
       -d '{"model": "acme/sql@prod", "prompt": "...", "max_tokens": 64, "stream": true}'

keys.toml holds one [[key]] table per API key:
  [[key]]
  name = "acme"
  sha256 = "<hex sha256 of the token>"      # python -c "import hashlib; print(hashlib.sha256(b'TOKEN').hexdigest())"
  namespaces = ["acme/*"]
  admin = false

the model id of the base is --model-id (default: the --model argument); any other "model" of a request
is a hub ref (org/name, org/name@3, org/name@prod) the key's namespaces allow
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server of the model and the hub's adapters (continuous batching)",
        description="Serve a model and the hub's adapters over an OpenAI-compatible HTTP API.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a model folder or Hugging Face id (transformers causal LM)")
    p.add_argument("--model-id", help="the base's name in the API (default: --model)")
    p.add_argument("--gguf-file", help="a GGUF file inside --model to load the weights from")
    p.add_argument("--hub", help="the hub folder (default: $SURGERY_HUB, else ~/.cache/model-surgery/hub)")
    p.add_argument("--slots", type=int, default=32, help="adapters resident at once (default 32)")
    p.add_argument("--max-rank", type=int, default=16, help="the largest adapter rank served (default 16)")
    p.add_argument("--targets", default="@linear", help="the sites the bank covers (default @linear)")
    p.add_argument("--cpu-cache", type=int, default=512, help="prepared adapters kept in host memory (default 512)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per decode step (default 32)")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=2048,
        help="prompt tokens (padded) prefilled in one step, which bounds the pause a burst gives running rows",
    )
    p.add_argument("--host", default=None, help="address to listen on (default 0.0.0.0 with --keys, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", help="keys.toml: API keys (sha256), their namespaces, admin")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-concurrent-per-key", type=int, default=16)
    p.set_defaults(serve_main=main)
    return p


def load_model(path: str, gguf_file: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    return model, tok


def main(args: argparse.Namespace) -> int:
    import uvicorn

    import surgery
    from registry.hub import Hub
    from registry.pool import AdapterPool
    from registry.server.app import create_app
    from registry.server.tenancy import Keys, Limits

    keys = Keys.load(args.keys) if args.keys else None
    host = args.host or ("0.0.0.0" if keys else "127.0.0.1")
    if keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        print("error: without --keys the server listens on localhost only; pass --keys keys.toml", file=sys.stderr)
        return 2
    if keys is None:
        print("no --keys: no authentication, listening on localhost only", file=sys.stderr)
    model, tok = load_model(args.model, args.gguf_file)
    bank = surgery.serve(model, slots=args.slots, max_rank=args.max_rank, targets=args.targets)
    pool = AdapterPool(bank, Hub(args.hub), cpu_cache=args.cpu_cache)
    limits = Limits(
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        max_concurrent_per_key=args.max_concurrent_per_key,
    )
    app = create_app(
        model,
        tok,
        pool=pool,
        keys=keys,
        limits=limits,
        model_id=args.model_id or args.model,
        max_batch=args.max_batch,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    uvicorn.run(app, host=host, port=args.port)
    pool.close()
    return 0
