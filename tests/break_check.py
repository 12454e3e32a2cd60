"""Deliberate breaks: proof that the test suite catches real bugs.

For each break below, this script copies the package and its tests to a temporary directory,
applies the break to the copy (a small source edit, the kind of bug a refactor could bring),
and runs the tests that should catch it against the copy. A break that no test catches makes
the script fail: the suite would have passed on a broken implementation.

    python tests/break_check.py              # every break (about 1-3 minutes)
    python tests/break_check.py --list       # what each break does and which tests run
    python tests/break_check.py --only verify_block0 fused_as_one
    python tests/break_check.py --baseline   # first check the same tests pass unbroken

CI runs it after the test suite (``.ci/run``), which is its baseline. ``tests/test_break_check.py``
checks on every test run that each break still applies to the current sources (an edit that
moves the code a break targets must update the break here).

Exit status: 0 every break caught; 1 a break was not caught; 2 a break could not be applied
or its tests could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Break:
    """One deliberate bug: ``edits`` (file, exact old text, new text) and the tests that must catch it."""

    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


BREAKS = [
    Break("verify_block0", "verification checks only checksum block 0 of what is read",
          (("dcp_ext/integrity.py",
            "if k >= len(checks.blocks) or digest(mv[lo:hi]) != checks.blocks[k]:",
            "if k == 0 and digest(mv[lo:hi]) != checks.blocks[k]:"),),
          ("tests/test_corruption.py", "-k", "in_a_block and local")),
    Break("fused_as_one", "fused tensors (QKV, gate/up) are split over TP ranks as one block, not part by part",
          (("dcp_ext/layout.py",
            "segments = spec.segments if spec.segments is not None else (local_len * tp_size,)",
            "segments = (local_len * tp_size,)"),),
          ("tests/test_reshard.py", "tests/test_optim_pure.py", "-k",
           "load_at_one_rank or stock_default_load_planner or flat_state_pieces")),
    Break("stager_reuses_leased_pool", "the stager hands out a pool whose previous upload has not finished",
          (("dcp_ext/staging.py",
            "if p.lease is None and p.signature == signature:",
            "if p.signature == signature:"),),
          # (the single-process control first: with the break, the multi-rank test hangs until its timeout)
          ("tests/test_staging.py::test_control_reused_default_stager_corrupts",
           "tests/test_staging.py::test_back_to_back_slow_upload_waits_never_overwrites")),
    Break("reader_ignores_data_offset", "ranged reads start at the record instead of its raw tensor data",
          (("dcp_ext/storage/reader.py",
            "data_base = loc.offset + loc.data_offset",
            "data_base = loc.offset"),),
          ("tests/test_dtypes_ranged.py", "-k", "ranged_and_whole and local")),
    Break("dedup_drops_a_chunk", "save-plan dedup never assigns the smallest replicated chunk to a writer",
          (("dcp_ext/save_dedup.py",
            "for nbytes, _, _, hs in dups:",
            "for nbytes, _, _, hs in dups[:-1]:"),),
          ("tests/test_reshard.py", "-k", "load_at_one_rank or dedup")),
    Break("s3_parts_below_minimum", "multipart parts are cut 64 KiB short of part_size (under S3's 5 MiB "
          "minimum at part_size=5MiB): both S3 test servers must refuse them (EntityTooSmall)",
          (("dcp_ext/storage/uploads.py",
            "        self.part_size = store.part_size\n",
            "        self.part_size = store.part_size - 65536\n"),),
          ("tests/test_object_stores.py", "-k", "test_round_trip and s3")),
    Break("rowio_read_unchecked", "a chunk read in place by dcp_ext.storage.tensorstore._rowio is taken as its stored crc32c, unchecked",
          (("dcp_ext/storage/tensorstore/native.py",
            "value = _rowio.crc32c_rows(addr, row, counts, strides)",
            "value = int.from_bytes(crc, \"little\")"),),
          ("tests/test_tensorstore_rowio.py", "-k", "flipped_byte")),
]


class CheckError(Exception):
    """A break could not be applied, or its tests could not run."""


def _copy_tree(dst: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for d in ("dcp_ext", "tests", "examples"):  # tests import examples.zero_adam
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dst, d), ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, f)):
            shutil.copy2(os.path.join(ROOT, f), dst)


def apply(brk: Break, root: str) -> None:
    """Apply ``brk``'s edits under ``root``; each old text must occur exactly once."""
    for rel, old, new in brk.edits:
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            src = f.read()
        n = src.count(old)
        if n != 1:
            raise CheckError(f"break {brk.name} does not apply: {rel} holds {n} copies of {old!r} (expected 1); "
                             f"the code moved: update tests/break_check.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src.replace(old, new))


def _env(root: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_tests(root: str, tests: tuple[str, ...], stop_at_first: bool, timeout: float) -> tuple[int, list[str], str]:
    """Run pytest on ``tests`` in ``root``: (exit code, failed test ids, output tail)."""
    probe = subprocess.run([sys.executable, "-c", "import dcp_ext; print(dcp_ext.__file__)"], cwd=root,
                           env=_env(root), capture_output=True, text=True, timeout=300)
    if probe.returncode or not os.path.realpath(probe.stdout.strip()).startswith(os.path.realpath(root)):
        raise CheckError(f"the copy's dcp_ext is not the one imported: {probe.stdout.strip()} {probe.stderr[-500:]}")
    argv = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *(["-x"] if stop_at_first else []),
            *tests]
    try:
        r = subprocess.run(argv, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"pytest {' '.join(tests)} did not finish within {timeout:.0f}s") from e
    out = r.stdout + r.stderr
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    return r.returncode, failed, out[-3000:]


def check(brk: Break, baseline: bool, timeout: float) -> bool:
    """True when ``brk`` makes at least one of its tests fail (and, with ``baseline``, the
    same tests pass on an unbroken copy)."""
    with tempfile.TemporaryDirectory(prefix=f"dcp_ext_break_{brk.name}_") as root:
        _copy_tree(root)
        if baseline:
            rc, failed, out = run_tests(root, brk.tests, stop_at_first=False, timeout=timeout)
            if rc != 0:
                raise CheckError(f"{brk.name}: the tests fail without the break (exit {rc}, {failed}):\n{out}")
        apply(brk, root)
        rc, failed, out = run_tests(root, brk.tests, stop_at_first=True, timeout=timeout)
    if rc == 1 and failed:
        print(f"  caught by {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
        return True
    if rc == 0:
        print(f"  NOT CAUGHT: every test passed with the break applied:\n{out}")
        return False
    raise CheckError(f"{brk.name}: pytest exited {rc} (not a test failure):\n{out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Apply deliberate breaks to a copy of dcp_ext and prove the tests "
                                             "catch each one.")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these breaks")
    ap.add_argument("--baseline", action="store_true", help="first run each break's tests unbroken (they must pass)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    args = ap.parse_args(argv)
    chosen = BREAKS
    if args.only:
        unknown = set(args.only) - {b.name for b in BREAKS}
        if unknown:
            ap.error(f"unknown breaks {sorted(unknown)}; known: {[b.name for b in BREAKS]}")
        chosen = [b for b in BREAKS if b.name in args.only]
    if args.list:
        for b in chosen:
            print(f"{b.name}: {b.what}\n    edits: {', '.join(sorted({e[0] for e in b.edits}))}\n"
                  f"    tests: {' '.join(b.tests)}")
        return 0
    missed, t0 = [], time.monotonic()
    try:
        for b in chosen:
            t = time.monotonic()
            print(f"break {b.name}: {b.what}", flush=True)
            if not check(b, args.baseline, args.timeout):
                missed.append(b.name)
            print(f"  ({time.monotonic() - t:.0f}s)", flush=True)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(chosen) - len(missed)} of {len(chosen)} breaks caught in {time.monotonic() - t0:.0f}s"
          + (f"; NOT caught: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
