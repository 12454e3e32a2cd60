"""The ``dcp-ext`` command line: ``ls``, ``inspect``, ``verify``, ``convert``, ``diff``, ``gc``,
``rm`` and ``demo``. Every command has ``--help``; see ``docs/cli.md``.

Exit codes: 0 success; 1 the command ran and found a problem (``verify``: damage, ``diff``:
differences); 2 bad usage or input (unknown checkpoint, bad option, missing dependency); 3 an
unexpected error (a bug: run with ``-v`` for the traceback); 130 interrupted (Ctrl-C); 141 the
output pipe was closed (``dcp-ext ls ROOT | head -1``), silently.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import DcpExtError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 3, 130, 141

_EPILOG = """exit codes: 0 ok; 1 a problem was found (verify: damage, diff: differences);
2 bad usage or input; 3 unexpected error (use -v for the traceback); 130 interrupted.
Backend options (S3 endpoint, credentials, ...) come from DCP_EXT_* variables or --config FILE;
see docs/config.md."""


def build_parser() -> argparse.ArgumentParser:
    from . import cli_commands as c
    from . import demo

    ap = argparse.ArgumentParser(prog="dcp-ext", description="Tools for torch.distributed.checkpoint "
                                 "checkpoints on local disk, fsspec, S3 and GCS.", epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr; show tracebacks")
    ap.add_argument("--config", metavar="FILE", help="a TOML/YAML dcp-ext config (backend options, ...)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, fn, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    p = cmd("ls", c.cmd_ls, "list the steps of a checkpoint root (complete or not, size, metrics)",
            "List the step directories under ROOT (a CheckpointManager root): complete or incomplete, "
            "size, commit time, metrics; '*' marks the one the 'latest' pointer names.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--cache", metavar="DIR", help="also show this node's fast-tier copy of each step (tiered saves)")
    json_flag(p)

    p = cmd("inspect", c.cmd_inspect, "summarise a checkpoint: tensors, shapes, dtypes, chunks, bytes, layout",
            "Summarise the checkpoint CKPT from its metadata only (nothing is unpickled); with FQN globs, "
            "list every stored chunk of the matching keys.")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("fqns", metavar="FQN", nargs="*", help="keys (globs) to show in detail")
    json_flag(p)

    p = cmd("verify", c.cmd_verify, "check that a checkpoint is complete and every stored byte matches its checksum",
            "Check that CKPT is committed and re-read every byte against its block checksums; exit 1 on any "
            "problem (every damaged item is listed).")
    p.add_argument("ckpt", metavar="CKPT")
    json_flag(p)

    p = cmd("convert", c.cmd_convert, "export a checkpoint to safetensors / torch.save, or import one",
            "Export:  dcp-ext convert CKPT OUT [--to safetensors|torch]\n"
            "Import:  dcp-ext convert --from safetensors|torch|hf SRC CKPT\n\n"
            "Streamed: memory holds about the largest tensor plus --buffer. A safetensors OUT ending in\n"
            ".safetensors is one file; otherwise a directory with model.safetensors, or above\n"
            "--max-shard-size Hugging Face-style shards and model.safetensors.index.json.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--to", choices=["safetensors", "torch"], help="export format (default: safetensors)")
    g.add_argument("--from", dest="from_fmt", choices=["safetensors", "torch", "hf"],
                   help="import: SRC is in this format, OUT is the DCP checkpoint to write")
    p.add_argument("--dtype", help="convert floating tensors, e.g. bf16, fp16, fp32")
    p.add_argument("--keys", nargs="+", metavar="GLOB", help="only keys matching these globs (e.g. 'model.*')")
    p.add_argument("--strip-prefix", metavar="P", help="remove this prefix from key names (e.g. 'model.')")
    p.add_argument("--add-prefix", metavar="P", help="prepend this to key names")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="safetensors export: shard above this size (default 5GB)")
    p.add_argument("--buffer", default="128MiB", metavar="SIZE",
                   help="bytes of small tensors handled together (default 128MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    json_flag(p)

    p = cmd("diff", c.cmd_diff, "compare two checkpoints tensor by tensor",
            "Compare checkpoints A and B: keys only in one, shape/dtype changes, and for each tensor the "
            "number of elements that differ by more than --atol and the largest difference. Exit 1 if any differ.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: exact)")
    p.add_argument("--keys", nargs="+", metavar="GLOB", help="only keys matching these globs")
    json_flag(p)

    p = cmd("gc", c.cmd_gc, "delete old steps of a root by retention rules (dry run unless --yes)",
            "Apply retention to ROOT like a CheckpointManager would: only steps a manager created, never the "
            "newest complete step or the one 'latest' names. Prints what it would delete; --yes deletes.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N complete steps")
    p.add_argument("--keep-every", type=int, metavar="K", help="keep steps that are multiples of K")
    p.add_argument("--keep-best", type=int, metavar="N", help="keep the N best by --metric")
    p.add_argument("--metric", help="metric name for --keep-best")
    p.add_argument("--mode", choices=["min", "max"], default="min", help="lower (min) or higher (max) is better")
    p.add_argument("--incomplete", action="store_true",
                   help="also delete incomplete steps (leftovers of dead saves) older than --grace")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="leave incomplete steps younger than this (a save may still run; default 3600)")
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    json_flag(p)

    p = cmd("rm", c.cmd_rm, "delete given steps of a root (dry run unless --yes)",
            "Delete the named steps of ROOT (numbers or directory names). The newest complete step needs "
            "--allow-newest. Prints what it would delete; --yes deletes.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("steps", metavar="STEP", nargs="+")
    p.add_argument("--allow-newest", action="store_true", help="allow deleting the newest complete step")
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    json_flag(p)

    d = cmd("demo", None, "train a small GPT on 4 gloo ranks, save, reload resharded, check")
    demo.add_arguments(d)
    d.set_defaults(fn=lambda args: demo.run_from_args(args))
    return ap


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.config:
        os.environ["DCP_EXT_CONFIG"] = args.config
    # the commands read and write checkpoints in this one process on purpose
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        rc = args.fn(args)
    except DcpExtError as e:
        print(f"dcp-ext {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, BrokenPipeError, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        msg = _root_cause(e)
        if isinstance(msg, DcpExtError):
            print(f"dcp-ext {args.cmd}: {msg}", file=sys.stderr)
            return EXIT_USAGE
        if args.verbose:
            raise
        print(f"dcp-ext {args.cmd}: unexpected error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
              f" (run with -v for the traceback)", file=sys.stderr)
        return EXIT_BUG
    sys.stdout.flush()
    return rc


def _root_cause(e: BaseException) -> BaseException:
    """The dcp-ext error inside DCP's ``CheckpointException`` (one per failed rank), if any."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            f = f[0] if isinstance(f, tuple) and f else f
            if isinstance(f, DcpExtError):
                return f
    cause = e.__cause__ or e.__context__
    return cause if isinstance(cause, DcpExtError) else e


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dcp-ext`` console script; returns the exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("dcp-ext: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
