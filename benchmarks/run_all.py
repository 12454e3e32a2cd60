"""Re-run every benchmark behind the tables of ``docs/benchmarks.md``, one after another.

Each benchmark runs in a process of its own with the parameters the doc states, writes its JSON
into ``--out-dir`` (default ``bench_out/``) and one PNG per table into ``--img-dir`` (default
``docs/img/``). The load average is printed before and after each, since the machine is shared.
The scripts that need object stores start their own test servers on 127.0.0.1 (SeaweedFS,
fake-gcs-server: ``tests/support/servers.py``). One benchmark failing (or running past its
timeout) is reported and the others still run; the exit status is 1 if any failed.

    python benchmarks/run_all.py                            # everything, full size (see the estimates)
    python benchmarks/run_all.py --quick                    # smoke run (minutes) into bench_out/quick/
    python benchmarks/run_all.py --only fs_limit,hash       # some of them
    python benchmarks/run_all.py --skip object_store,gcs_transport
    python benchmarks/run_all.py --list                     # names, commands and time estimates
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("run_all")


@dataclass(frozen=True)
class Bench:
    """One benchmark run behind a table of the doc. In ``args`` / ``quick``: ``{out}`` is the JSON
    path, ``{img}`` the image directory, ``{shm}`` / ``{disk}`` scratch directories on tmpfs and
    on the local disk. ``pngs``: the files it writes into the image directory; ``plot``: the
    options that tell the script where (the scripts that write several PNGs derive the other
    names from one, or take an option per table). ``est_s`` / ``quick_s``: expected seconds on
    the shared 2-core machine (full / ``--quick``)."""

    name: str
    script: str
    args: Sequence[str]
    quick: Sequence[str]
    pngs: Sequence[str]
    est_s: int
    quick_s: int
    section: str = ""
    plot: Sequence[str] = ()


BENCHMARKS: list[Bench] = [
    Bench("hash", "bench_hash.py", ["--mib", "128", "--runs", "5"], ["--mib", "8", "--runs", "1"],
          ["bench_hash.png"], 60, 10, "Against the machine's limit: hashing",
          plot=["--plot", "{img}/bench_hash.png"]),
    Bench("fs_limit", "bench_fs.py",
          ["--size-mib", "768", "--runs", "7", "--ranks", "1,2", "--state", "uniform",
           "--contenders", "ours,stock,ours_nocheck,ours_crc32c,raw,raw_verified", "--dir", "{shm}"],
          ["--size-mib", "48", "--runs", "1", "--ranks", "1,2", "--state", "uniform",
           "--contenders", "ours,stock,ours_nocheck,raw,raw_verified", "--dir", "{shm}"],
          ["bench_fs.png"], 360, 30, "Against the machine's limit: local file system vs raw",
          plot=["--plot", "{img}/bench_fs.png"]),
    Bench("async_limit", "bench_async.py",
          ["--size", "512", "--rounds", "5", "--threads", "1", "--configs", "pooled,pooled_ext,stock_default,bare_copy",
           "--dir", "{shm}"],
          ["--size", "16", "--rounds", "1", "--rss-saves", "2", "--threads", "1",
           "--configs", "pooled,pooled_ext,stock_default,bare_copy", "--dir", "{shm}"],
          ["bench_async.png", "bench_async_rss.png"], 150, 25, "Against the machine's limit: writer memory",
          plot=["--plot", "{img}/bench_async.png"]),
    Bench("object_store_ceiling", "bench_object_store.py",
          ["--stores", "s3", "--size-mib", "256", "--rounds", "5", "--contenders", "dcp_ext,raw_botocore,fsspec"],
          ["--stores", "s3", "--size-mib", "16", "--rounds", "1", "--contenders", "dcp_ext,raw_botocore,fsspec"],
          ["bench_object_store_ceiling_s3.png"], 180, 30, "Against the machine's limit: S3 vs raw botocore",
          plot=["--plot", "{img}/bench_object_store_ceiling_{store}.png"]),
    Bench("fs_tmpfs", "bench_fs.py", ["--size-mib", "1024", "--runs", "5", "--ranks", "1,2", "--dir", "{shm}"],
          ["--size-mib", "48", "--runs", "1", "--ranks", "1,2", "--dir", "{shm}"],
          ["bench_fs_tmpfs.png"], 360, 30, "Local file system: tmpfs",
          plot=["--plot", "{img}/bench_fs_tmpfs.png"]),
    Bench("fs_disk", "bench_fs.py", ["--size-mib", "1024", "--runs", "5", "--ranks", "1,2", "--dir", "{disk}"],
          ["--size-mib", "48", "--runs", "1", "--ranks", "1,2", "--dir", "{disk}"],
          ["bench_fs_disk.png"], 500, 30, "Local file system: disk",
          plot=["--plot", "{img}/bench_fs_disk.png"]),
    Bench("reshard", "bench_reshard.py", [], ["--quick", "--reps", "1", "--ranks", "64"],
          ["bench_reshard_load.png", "bench_reshard_planning.png", "bench_planning.png"], 480, 60,
          "Resharding (loads, planning at scale) and repeat saves at scale",
          plot=["--plot", "{img}/bench_planning.png", "--plot-load", "{img}/bench_reshard_load.png", "--plot-scale", "{img}/bench_reshard_planning.png"]),
    Bench("async", "bench_async.py", ["--size", "1024", "--rounds", "11", "--threads", "1", "--dir", "{shm}"],
          ["--size", "16", "--rounds", "1", "--rss-saves", "2", "--threads", "1", "--dir", "{shm}"],
          ["bench_async_staging.png", "bench_async_staging_rss.png"], 420, 30, "Async staging",
          plot=["--plot", "{img}/bench_async_staging.png"]),
    Bench("async_tiered", "bench_async.py",
          ["--tiered", "--size", "1024", "--rounds", "7", "--threads", "1", "--dir", "{shm}", "--durable-dir", "{disk}"],
          ["--tiered", "--size", "16", "--rounds", "1", "--threads", "1", "--dir", "{shm}", "--durable-dir", "{disk}"],
          ["bench_async_tiered.png"], 240, 20, "Tiered checkpoints: disk",
          plot=["--plot", "{img}/bench_async_tiered.png"]),
    Bench("async_tiered_s3", "bench_async.py",
          ["--tiered", "--durable", "s3", "--size", "512", "--rounds", "5", "--threads", "1", "--dir", "{shm}"],
          ["--tiered", "--durable", "s3", "--size", "16", "--rounds", "1", "--threads", "1", "--dir", "{shm}"],
          ["bench_async_tiered_s3.png"], 200, 30, "Tiered checkpoints: S3",
          plot=["--plot", "{img}/bench_async_tiered_s3.png"]),
    Bench("object_store", "bench_object_store.py", ["--size-mib", "512", "--rounds", "5"],
          ["--size-mib", "16", "--rounds", "1"],
          ["bench_object_store_s3.png", "bench_object_store_gcs.png"], 660, 60, "Object stores: S3 and GCS",
          plot=["--plot", "{img}/bench_object_store_{store}.png"]),
    Bench("gcs_transport", "bench_gcs_transport.py", ["--size-mib", "256", "--rounds", "7"],
          ["--size-mib", "16", "--rounds", "1", "--chunk-mib", "4", "--range-mib", "4"],
          ["bench_gcs_transport.png"], 180, 20, "Object stores: GCS transport",
          plot=["--plot", "{img}/bench_gcs_transport.png"]),
    Bench("tensorstore", "bench_tensorstore.py", ["--hidden", "1024", "--runs", "7", "--dir", "{shm}"],
          ["--quick", "--dir", "{shm}"], ["bench_tensorstore.png"], 240, 60, "TensorStore",
          plot=["--plot", "{img}/bench_tensorstore.png"]),
    Bench("compression", "bench_compression.py",
          ["--size-mib", "256", "--rounds", "2", "--steps", "10", "--bandwidth-mib", "25"], ["--quick"],
          ["bench_compression_kinds.png", "bench_compression_tmpfs.png", "bench_compression_s3.png",
           "bench_compression_reshard.png"], 420, 60, "Compression",
          plot=["--plot", "{img}/bench_compression.png"]),
    Bench("convert", "bench_convert.py", ["--size", "2GiB", "--largest", "256MiB"], ["--size", "32MiB", "--largest", "8MiB"],
          ["bench_convert.png"], 60, 15, "Conversions",
          plot=["--plot", "{img}/bench_convert.png"]),
]



def command(b: Bench, quick: bool, out_dir: str, img_dir: str, shm: str, disk: str) -> list[str]:
    """The command line that runs ``b`` (placeholders filled in)."""
    subst = {"{out}": os.path.join(out_dir, f"bench_{b.name}.json"), "{img}": img_dir, "{shm}": shm, "{disk}": disk}

    def fill(a: str) -> str:
        for k, v in subst.items():
            a = a.replace(k, v)
        return a

    args = list(b.quick if quick else b.args) + ["--out", "{out}"] + list(b.plot)
    return [sys.executable, os.path.join(ROOT, "benchmarks", b.script)] + [fill(a) for a in args]


def select(names_only: str, names_skip: str, benches: Sequence[Bench] = BENCHMARKS) -> list[Bench]:
    """The benchmarks ``--only`` / ``--skip`` ask for, in run order; unknown names are an error."""
    known = [b.name for b in benches]

    def parse(s: str, opt: str) -> set[str]:
        names = {n.strip() for n in s.split(",") if n.strip()}
        bad = sorted(names - set(known))
        if bad:
            raise ValueError(f"{opt}: unknown benchmark(s) {', '.join(bad)}; known: {', '.join(known)}")
        return names

    only, skip = parse(names_only, "--only"), parse(names_skip, "--skip")
    chosen = [b for b in benches if (not only or b.name in only) and b.name not in skip]
    if not chosen:
        raise ValueError("--only/--skip left no benchmark to run")
    return chosen


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_one(b: Bench, cmd: list[str], img_dir: str, log_path: str, timeout: float) -> tuple[bool, str]:
    """Run one benchmark, its output echoed and kept in ``log_path``. Returns (ok, why not)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tail: collections.deque[str] = collections.deque(maxlen=15)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)  # its own group: a timeout ends all it started
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                print(f"  [{b.name}] {line.rstrip()}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # interrupted (e.g. Ctrl-C): do not leave it running
                kill()
                proc.wait()
    if timed_out.is_set():
        return False, f"ran past its timeout of {_fmt_s(timeout)} (killed); log: {log_path}"
    if rc != 0:
        return False, f"exit status {rc}; log: {log_path}; last lines:\n    " + "\n    ".join(tail)
    if _matplotlib():
        missing = [p for p in b.pngs if not os.path.exists(os.path.join(img_dir, p))]
        if missing:
            return False, f"finished but did not write {', '.join(missing)} into {img_dir}; log: {log_path}"
    return True, ""


def run_all(benches: Sequence[Bench], quick: bool, out_dir: str, img_dir: str, timeout_factor: float = 6.0) -> int:
    """Run ``benches`` one after another; returns the number that failed."""
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    scratch = [tempfile.mkdtemp(prefix="dcp_ext_run_all_", dir=d) for d in
               ("/dev/shm" if os.path.isdir("/dev/shm") else None, "/var/tmp" if os.path.isdir("/var/tmp") else None)]
    est = {b.name: b.quick_s if quick else b.est_s for b in benches}
    logger.info("%d benchmark(s)%s, about %s in all (estimates on the shared 2-core machine):", len(benches),
                " (--quick)" if quick else "", _fmt_s(sum(est.values())))
    for b in benches:
        logger.info("  %-22s ~%-8s -> %s", b.name, _fmt_s(est[b.name]), ", ".join(b.pngs))
    if not _matplotlib():
        logger.warning("matplotlib is not installed (pip install -e '.[bench]'): JSON only, no PNGs")
    failed: list[tuple[str, str]] = []
    t_all = time.time()
    try:
        for i, b in enumerate(benches, 1):
            cmd = command(b, quick, out_dir, img_dir, *scratch)
            logger.info("[%d/%d] %s (%s; ~%s): load average before %s", i, len(benches), b.name, b.section,
                        _fmt_s(est[b.name]), _loadavg())
            logger.info("  $ %s", " ".join(cmd[1:]))
            t0 = time.time()
            try:
                ok, why = run_one(b, cmd, img_dir, os.path.join(out_dir, f"bench_{b.name}.log"),
                                  max(timeout_factor * est[b.name], 300))
            except Exception as e:  # noqa: BLE001 - one benchmark's trouble must not stop the others
                ok, why = False, f"could not run: {e!r}"
            if ok:
                logger.info("[%d/%d] %s done in %s: load average after %s", i, len(benches), b.name,
                            _fmt_s(time.time() - t0), _loadavg())
            else:
                failed.append((b.name, why))
                logger.error("[%d/%d] %s FAILED after %s (%s): load average after %s", i, len(benches), b.name,
                             _fmt_s(time.time() - t0), why, _loadavg())
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
    logger.info("%d of %d benchmark(s) ran in %s; JSON and logs in %s, PNGs in %s", len(benches) - len(failed),
                len(benches), _fmt_s(time.time() - t_all), out_dir, img_dir)
    for name, why in failed:
        logger.error("failed: %s: %s", name, why)
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="benchmarks: " + ", ".join(b.name for b in BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round each: a smoke run of everything")
    ap.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated names not to run")
    ap.add_argument("--out-dir", help="JSON and logs (default bench_out/; with --quick bench_out/quick/)")
    ap.add_argument("--img-dir", help="PNGs (default docs/img/; with --quick bench_out/quick/, so that tiny runs "
                    "never replace the doc's figures)")
    ap.add_argument("--timeout-factor", type=float, default=6.0,
                    help="a benchmark is killed after this many times its estimate (at least 5 min)")
    ap.add_argument("--list", action="store_true", help="print the commands and estimates, run nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        benches = select(args.only, args.skip)
    except ValueError as e:
        ap.error(str(e))
    if args.timeout_factor <= 0:
        ap.error("--timeout-factor must be > 0")
    quick_dir = os.path.join(ROOT, "bench_out", "quick")
    out_dir = os.path.abspath(args.out_dir or (quick_dir if args.quick else os.path.join(ROOT, "bench_out")))
    img_dir = os.path.abspath(args.img_dir or (quick_dir if args.quick else os.path.join(ROOT, "docs", "img")))
    if args.list:
        for b in benches:
            cmd = command(b, args.quick, out_dir, img_dir, "<tmpfs scratch>", "<disk scratch>")
            print(f"{b.name:22s} ~{_fmt_s(b.quick_s if args.quick else b.est_s):8s} {' '.join(cmd[1:])}")
        print(f"total: about {_fmt_s(sum(b.quick_s if args.quick else b.est_s for b in benches))}")
        return 0
    return 1 if run_all(benches, args.quick, out_dir, img_dir, args.timeout_factor) else 0


if __name__ == "__main__":
    sys.exit(main())
