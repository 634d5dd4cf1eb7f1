"""The `surgery` console script: `surgery demo` and `surgery hub <cmd>` (the hub from a shell).

Every `hub` command prints an aligned plain-text table (or key: value lines) by default and
JSON with `--json`. A `surgery.SurgeryError` prints one line ``error: ...`` to stderr and exits 2;
`surgery hub verify` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

PROGRESS_DELAY_S = 1.0  # a bar appears only once an operation has run this long

EXAMPLES = """\
examples:
  surgery demo                                    inject, train, merge, move and remove a LoRA
  surgery hub list                                every name and its latest version
  surgery hub versions acme/sql                   every version of a name
  surgery hub show acme/sql@prod                  a version's manifest and tensors
  surgery hub alias acme/sql prod --version 3     point acme/sql@prod at version 3
  surgery hub --json history acme/sql@prod        every move of an alias, as JSON
  surgery hub verify                              hash everything; exit 1 on any problem
  surgery hub push-hf acme/sql@3 --repo-id acme/sql-lora
  surgery serve --model path/to/model --hub ./hub --slots 32 --port 8000 --keys keys.toml

the hub is --hub PATH, else $SURGERY_HUB, else ~/.cache/model-surgery/hub
(see `surgery hub --help` for every hub command)
"""

HUB_EXAMPLES = """\
refs: acme/sql (latest), acme/sql@3, acme/sql@prod (alias), acme/sql@sha256:9f2c1e (digest prefix)

examples:
  surgery hub list
  surgery hub versions acme/sql
  surgery hub show acme/sql@3
  surgery hub --json show acme/sql@prod
  surgery hub alias acme/sql prod --version 3      (default: the latest version)
  surgery hub alias acme/sql prod --delete
  surgery hub history acme/sql@prod                every move of the alias
  surgery hub history acme/sql@3                   the lineage: parent, its parent, ...
  surgery hub history acme/sql                     every push and alias move
  surgery hub verify                               exit 0 when clean, 1 with every problem listed
  surgery hub gc                                   remove unreferenced blobs and temp files
  surgery hub import-peft path/to/peft_adapter acme/x
  surgery hub export-peft acme/sql@3 out/sql        readable by peft.PeftModel.from_pretrained
  surgery hub push-hf acme/sql@3 --repo-id acme/sql-lora [--private] [--token TOKEN]
  surgery hub pull-hf acme/sql-lora --revision v3 --name acme/sql
  surgery hub --hub /data/hub list                 another hub (else $SURGERY_HUB, else the default)

exit status: 0 ok, 1 verify found problems, 2 error (one line "error: ..." on stderr)
"""


# ----------------------------------------------------------------------------- progress


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(desc: str, delay: float | None = None, stream: TextIO | None = None) -> Iterator[None]:
    """Show a tqdm bar (elapsed time) for the body only if it is still running after `delay`
    seconds (default PROGRESS_DELAY_S), and only when `stream` (default stderr) is a terminal.
    A timer thread starts the bar late; fast operations print nothing."""
    out = sys.stderr if stream is None else stream
    if not _is_tty(out):
        yield
        return
    done = threading.Event()

    def show() -> None:
        if done.wait(PROGRESS_DELAY_S if delay is None else delay):
            return
        from tqdm import tqdm

        bar = tqdm(
            desc=desc, total=None, file=out, leave=False, dynamic_ncols=True, bar_format="{desc}: {elapsed} elapsed"
        )
        try:
            while not done.wait(0.2):
                bar.refresh()
        finally:
            bar.close()

    thread = threading.Thread(target=show, name="surgery-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def _quiet_hf_bars() -> Iterator[None]:
    """registry.hf shows its own delayed bars; in the CLI `progress` is the one bar (and none at
    all when stderr is not a terminal), so theirs are switched off for the call."""
    from tqdm import tqdm

    from registry import hf

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    saved = hf.tqdm, hf.DelayedTqdm
    hf.tqdm, hf.DelayedTqdm = Quiet, Quiet  # type: ignore[misc]  # deliberately swaps the classes for the call
    try:
        yield
    finally:
        hf.tqdm, hf.DelayedTqdm = saved  # type: ignore[misc]  # puts the classes back


# ----------------------------------------------------------------------------- output


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _short(digest: Any, n: int = 12) -> str:
    d = str(digest or "")
    return d[: len("sha256:") + n] if d.startswith("sha256:") else d


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _compact(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(", ", ": "), default=str)


def _emit(args: argparse.Namespace, obj: Any, text: str = "") -> int:
    """Print `obj` as JSON with --json, else `text`; the exit status 0."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str) if args.json else text)
    return 0


def _ref_dict(r: Any) -> dict[str, Any]:
    return {"ref": str(r), "name": r.name, "version": r.version, "digest": r.digest}


# ----------------------------------------------------------------------------- hub commands


def _cmd_list(hub: Any, args: argparse.Namespace) -> int:
    rows = [
        {**_ref_dict(r), "versions": len(hub.versions(r.name)), "aliases": dict(sorted(hub.aliases(r.name).items()))}
        for r in hub.list()
    ]
    text = table(
        [
            [
                d["name"],
                d["version"],
                d["versions"],
                _short(d["digest"]),
                " ".join(f"{a}->{v}" for a, v in d["aliases"].items()),
            ]
            for d in rows
        ],
        ["NAME", "LATEST", "VERSIONS", "DIGEST", "ALIASES"],
    )
    return _emit(args, rows, text if rows else f"no deltas in the hub at {hub.root}")


def _cmd_versions(hub: Any, args: argparse.Namespace) -> int:
    from registry.errors import RegistryError

    aliases = hub.aliases(args.name)
    rows = []
    for r in hub.versions(args.name):
        d = {**_ref_dict(r), "aliases": sorted(a for a, v in aliases.items() if v == r.version)}
        try:
            man = hub.show(r)
            d.update(created=man["created"], nbytes=man["nbytes"], parent=man["parent"])
        except RegistryError as e:
            d.update(created=None, nbytes=None, parent=None, error=str(e))
        rows.append(d)
    text = table(
        [
            [
                d["version"],
                _short(d["digest"]),
                d["created"] or "unreadable",
                _size(d["nbytes"]),
                " ".join(d["aliases"]),
            ]
            for d in rows
        ],
        ["VERSION", "DIGEST", "CREATED", "SIZE", "ALIASES"],
    )
    return _emit(args, rows, text)


def _cmd_show(hub: Any, args: argparse.Namespace) -> int:
    man = hub.show(args.ref)
    if args.json:
        return _emit(args, man)
    p = man["parent"]
    fields = [
        ("ref", man["ref"]),
        ("digest", man["digest"]),
        ("method", man["method"]),
        ("delta_name", man["delta_name"]),
        ("base", man["base"]),
        ("parent", f"{p['name']}@{p['version']} ({_short(p['digest'])})" if p else "-"),
        ("created", man["created"]),
        ("user", man.get("user", "")),
        ("aliases", " ".join(man["aliases"]) or "-"),
        ("size", f"{_size(man['nbytes'])} ({man['nbytes']} bytes), blob {man['blob']['digest']}"),
        ("config", _compact(man["config"])),
        ("meta", _compact(man["meta"])),
        ("lineage", _compact(man["lineage"])),
    ]
    if "extra" in man:  # tensors stored next to the delta (hub.push(..., extra=)), read by hub.extra(ref)
        x = man["extra"]
        fields.append(("extra", f"{len(x['tensors'])} tensors, {_size(x['blob']['size'])}, blob {x['blob']['digest']}"))
        fields.append(("extra meta", _compact(x["meta"])))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k + ':':<{width + 1}} {v}")
    print(f"tensors ({len(man['tensors'])}):")
    print(
        table(
            [["  " + k, info["dtype"], "x".join(map(str, info["shape"])) or "scalar"] for k, info in man["tensors"]],
            ["  KEY", "DTYPE", "SHAPE"],
        )
    )
    return 0


def _cmd_alias(hub: Any, args: argparse.Namespace) -> int:
    if args.delete:
        if args.target is not None:
            raise _UsageError("alias --delete takes no --version")
        was = hub.unalias(args.name, args.alias)
        obj = {"name": args.name, "alias": args.alias, "deleted": True, "version": was}
        return _emit(args, obj, f"{args.name}@{args.alias} deleted (it pointed at version {was})")
    version: int | str | None = args.target
    if isinstance(version, str):
        if version.isdigit():
            version = int(version)
        elif "/" not in version:
            version = f"{args.name}@{version}"  # another alias or a digest of the same name
    r = hub.alias(args.name, args.alias, version=version)
    obj = {"name": args.name, "alias": args.alias, **_ref_dict(r)}
    return _emit(args, obj, f"{args.name}@{args.alias} -> {r.version} ({_short(r.digest)})")


def _cmd_history(hub: Any, args: argparse.Namespace) -> int:
    from registry.refs import parse

    events = hub.history(args.ref)
    if args.json:
        return _emit(args, events)
    kind = parse(args.ref).kind
    if kind == "alias":
        rows = [
            [
                e.get("time", ""),
                e.get("user", ""),
                "deleted" if e["version"] is None else e["version"],
                "-" if e.get("previous") is None else e["previous"],
            ]
            for e in events
        ]
        print(table(rows, ["TIME", "USER", "VERSION", "PREVIOUS"]))
    elif kind == "latest":
        rows = []
        for e in events:
            if e["event"] == "push":
                p = e.get("parent")
                what = f"version {e['version']} {_short(e.get('digest'))}"
                if p:
                    what += f" (parent {p['name']}@{p['version']})"
                if e.get("error"):
                    what += f" [{e['error']}]"
            else:
                what = f"@{e['alias']} deleted" if e["version"] is None else f"@{e['alias']} -> {e['version']}"
                if e.get("previous") is not None:
                    what += f" (was {e['previous']})"
            rows.append([e.get("time", ""), e["event"], e.get("user", ""), what])
        print(table(rows, ["TIME", "EVENT", "USER", "WHAT"]))
    else:
        rows = [
            [e["ref"], _short(e.get("digest")), e.get("created", ""), e.get("error") or _short(e.get("base"), 16)]
            for e in events
        ]
        print(table(rows, ["REF", "DIGEST", "CREATED", "BASE"]))
    return 0


def _cmd_verify(hub: Any, args: argparse.Namespace) -> int:
    problems = hub.verify()
    if args.json:
        _emit(args, {"hub": str(hub.root), "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s) in the hub at {hub.root}", file=sys.stderr)
    else:
        print(f"ok: no problems in the hub at {hub.root}")
    return 1 if problems else 0


def _cmd_gc(hub: Any, args: argparse.Namespace) -> int:
    out = hub.gc()
    if args.json:
        return _emit(args, out)
    print(f"removed {len(out['blobs'])} blob(s) and {len(out['temp'])} temp file(s), {_size(out['bytes'])} freed")
    for d in out["blobs"]:
        print(f"  blob {d}")
    for s in out.get("skipped") or []:
        print(f"warning: {s}", file=sys.stderr)
    return 0


def _cmd_import_peft(hub: Any, args: argparse.Namespace) -> int:
    with progress(f"import {args.dir}"):
        r = hub.import_peft(args.dir, args.name, alias=args.alias)
    return _emit(args, _ref_dict(r), f"{r} {r.digest}")


def _cmd_export_peft(hub: Any, args: argparse.Namespace) -> int:
    with progress(f"export {args.ref}"):
        r = hub.resolve(args.ref)
        path = hub.export_peft(r, args.dir)
    return _emit(args, {**_ref_dict(r), "path": str(path)}, f"{r} -> {path}")


def _cmd_push_hf(hub: Any, args: argparse.Namespace) -> int:
    r = hub.resolve(args.ref)
    with progress(f"push {r} to {args.repo_id}"), _quiet_hf_bars():
        sha = hub.push_hf(r, repo_id=args.repo_id, token=args.token, private=True if args.private else None)
    obj = {**_ref_dict(r), "repo_id": args.repo_id, "commit": sha, "tag": f"v{r.version}"}
    return _emit(args, obj, f"{r} -> {args.repo_id} commit {sha} tag v{r.version}")


def _cmd_pull_hf(hub: Any, args: argparse.Namespace) -> int:
    with progress(f"pull {args.repo_id}@{args.revision}"), _quiet_hf_bars():
        r = hub.pull_hf(args.repo_id, revision=args.revision, name=args.name, token=args.token)
    return _emit(args, _ref_dict(r), f"{args.repo_id}@{args.revision} -> {r} {r.digest}")


class _UsageError(Exception):
    pass


# ----------------------------------------------------------------------------- parser


def _common() -> argparse.ArgumentParser:
    """--hub and --json, accepted before or after the command (SUPPRESS: a later parser's
    default never overwrites a value given earlier)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--hub",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the hub folder (default: $SURGERY_HUB, else ~/.cache/model-surgery/hub)",
    )
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="surgery", description="model-surgery command line", epilog=EXAMPLES, formatter_class=raw, parents=[common]
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", metavar="{demo,hub,serve}")
    demo = sub.add_parser("demo", help="inject LoRA into a small model, train, merge, move the delta, remove")
    demo.add_argument("--steps", type=int, default=60)

    hub = sub.add_parser(
        "hub",
        parents=[common],
        formatter_class=raw,
        epilog=HUB_EXAMPLES,
        help="the local hub of versioned deltas: list, show, alias, verify, PEFT, Hugging Face",
        description="The local hub of versioned deltas (registry.Hub).",
    )
    hs = hub.add_subparsers(dest="hub_cmd", metavar="COMMAND")

    def add(
        name: str, fn: Callable[[Any, argparse.Namespace], int], help: str, *positional: str
    ) -> argparse.ArgumentParser:
        p = hs.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn)
        for arg in positional:
            p.add_argument(arg, metavar=arg.upper())
        return p

    add("list", _cmd_list, "every name and its latest version")
    add("versions", _cmd_versions, "every version of a name, oldest first", "name")
    add("show", _cmd_show, "a version's manifest and tensors", "ref")
    p = add("alias", _cmd_alias, "point NAME@ALIAS at a version (default: the latest), or --delete it", "name", "alias")
    p.add_argument("--version", dest="target", metavar="N", help="a version number, or an alias / ref of the same name")
    p.add_argument("--delete", action="store_true", help="remove the alias (recorded in its history)")
    add("history", _cmd_history, "alias moves (NAME@ALIAS), lineage (NAME@N) or every event (NAME)", "ref")
    add("verify", _cmd_verify, "hash every blob and manifest; exit 1 and list every problem")
    add("gc", _cmd_gc, "remove unreferenced blobs and leftover temp files")
    p = add(
        "import-peft", _cmd_import_peft, "push a PEFT LoRA adapter folder as the next version of NAME", "dir", "name"
    )
    p.add_argument("--alias", help="also move this alias to the new version")
    export_help = "write a version in PEFT's layout (adapter_config.json + adapter_model.safetensors)"
    add("export-peft", _cmd_export_peft, export_help, "ref", "dir")
    p = add(
        "push-hf", _cmd_push_hf, "upload a version to the Hugging Face Hub (PEFT layout + manifest), tag v{N}", "ref"
    )
    p.add_argument("--repo-id", required=True, metavar="ID", help="the model repo, e.g. acme/sql-lora")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN or the saved login)")
    p = add("pull-hf", _cmd_pull_hf, "download a LoRA adapter from the Hugging Face Hub into the hub", "repo_id")
    p.add_argument("--revision", default="main", help="branch, tag (e.g. v3) or commit sha (default: main)")
    p.add_argument("--name", help="the hub name to push it as (default: from the repo id)")
    p.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN or the saved login)")
    from registry.server.main import add_parser as add_serve

    add_serve(sub)
    parser._hub_parser = hub  # type: ignore[attr-defined]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from registry.demo import main as demo_main

        return demo_main(args.steps)
    if args.cmd == "hub":
        if getattr(args, "func", None) is None:
            parser._hub_parser.print_help()  # type: ignore[attr-defined]
            return 0
        args.json = getattr(args, "json", False)
        return _run_hub(args)
    if args.cmd == "serve":
        try:
            return int(args.serve_main(args))
        except Exception as e:  # a SurgeryError, a missing model or keys file: one line, exit 2
            import surgery

            if not isinstance(e, (surgery.SurgeryError, OSError, ValueError, ImportError)):
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
    if args.version:
        import surgery

        print(surgery.__version__)
        return 0
    parser.print_help()
    return 0


def _run_hub(args: argparse.Namespace) -> int:
    import surgery
    from registry import Hub

    try:
        hub = Hub(getattr(args, "hub", None))
        return int(args.func(hub, args))
    except BrokenPipeError:  # `surgery hub list | head`: the reader left; stay quiet
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        return 0
    except (surgery.SurgeryError, _UsageError, OSError) as e:  # OSError: a folder that cannot be written or read
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
