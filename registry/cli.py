"""The `surgery` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="surgery", description="model-surgery command line")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd")
    demo = sub.add_parser("demo", help="inject LoRA into a small model, train, merge, move the delta, remove")
    demo.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from registry.demo import main as demo_main

        return demo_main(args.steps)
    if args.version:
        import surgery

        print(surgery.__version__)
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
