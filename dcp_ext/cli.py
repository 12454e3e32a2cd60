"""The ``dcp-ext`` command: ``demo``, ``inspect`` and ``verify``.

Exit codes: 0 success, 1 the checkpoint is bad / the demo failed, 2 usage or input errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import DcpExtError

__all__ = ["main"]


def _cmd_inspect(args) -> int:
    from .verify import inspect_checkpoint

    info = inspect_checkpoint(args.url)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['url']}: {len(info['tensors'])} tensors, {len(info['objects'])} objects, "
          f"{info['bytes'] / 2**20:.1f} MiB in {len(info['files'])} files; saved by "
          f"{info['world_size'] or '?'} ranks; checksums: {'yes' if info['checksummed'] else 'no'}")
    for fqn, t in info["tensors"].items():
        print(f"  {fqn:50s} {t['dtype']:9s} {str(t['size']):22s} {t['chunks']} chunk(s)")
    for fqn in info["objects"]:
        print(f"  {fqn:50s} (object)")
    return 0


def _cmd_verify(args) -> int:
    from .verify import verify_checkpoint

    rep = verify_checkpoint(args.url, progress=None)
    for e in rep.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    status = "OK" if rep.ok else "CORRUPT"
    print(f"{status}: {rep.url}: {rep.items} items, {rep.bytes_checked / 2**20:.1f} MiB checked"
          + (f", {rep.unchecked_items} items without checksums" if rep.unchecked_items else ""))
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dcp-ext", description="dcp-ext tools for torch.distributed.checkpoint")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = ap.add_subparsers(dest="cmd", required=True)
    from . import demo

    d = sub.add_parser("demo", help="train a small GPT on 4 gloo ranks, save, reload resharded, check")
    demo.add_arguments(d)
    i = sub.add_parser("inspect", help="summarise a checkpoint (tensors, sizes, files)")
    i.add_argument("url")
    i.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="check every stored byte against its checksums")
    v.add_argument("url")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        if args.cmd == "demo":
            return demo.run_from_args(args)
        if args.cmd == "inspect":
            return _cmd_inspect(args)
        return _cmd_verify(args)
    except DcpExtError as e:
        print(f"dcp-ext {args.cmd}: {e}", file=sys.stderr)
        return 1 if args.cmd == "verify" else 2


if __name__ == "__main__":
    sys.exit(main())
