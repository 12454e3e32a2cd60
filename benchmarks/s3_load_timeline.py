"""Where the time of one S3 load goes: a per-phase timeline of ``dcp.load`` with our reader, and
the GET timeline of the raw botocore contender of ``bench_object_store.py`` beside it.

For each load it prints the phases (``read_metadata``, DCP's planning, our per-item read
planning, the first GET sent, the first data byte, the last byte, finishing the items, the end of
``dcp.load``) in milliseconds from the start, then every GET: its thread, when it was sent, when
its headers came back (``open``), when its last byte landed, and its size. Loads alternate
between ours and raw (``--rounds`` each, a fresh save before every load, as in the benchmark).

    PYTHONPATH=$PWD python benchmarks/s3_load_timeline.py --size-mib 256 --rounds 3

Instrumentation only (wrappers around the store's and botocore's calls): it changes no code path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
import warnings

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dcp_ext  # noqa: E402
from bench_object_store import MiB, RawBotocore, make_state, nbytes, zeros_like  # noqa: E402
from dcp_ext.storage import object_store as object_store_mod  # noqa: E402
from dcp_ext.storage import reader as reader_mod  # noqa: E402
from dcp_ext.storage.s3 import S3Store  # noqa: E402
from tests.support.servers import S3TestServer  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Timeline:
    """Named marks and GET records, in seconds since ``start``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[str, float]] = []
        self.gets: list[dict] = []
        self.gcs: list[tuple[int, float, float, int]] = []  # (generation, start, end, collected)
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self, name: str) -> None:
        with self.lock:
            self.marks.append((name, self.now()))

    def get(self, key: str, nbytes: int) -> dict:
        g = {"thread": threading.current_thread().name, "key": key.rsplit("/", 1)[-1], "bytes": nbytes,
             "sent": self.now()}
        with self.lock:
            self.gets.append(g)
        return g


CURRENT: dict[str, Timeline | None] = {"tl": None}
_GC_START: dict[str, float] = {}


def _gc_callback(phase: str, info: dict) -> None:
    """Record every garbage collection during a load (a full one holds the GIL for a while)."""
    tl = CURRENT["tl"]
    if tl is None:
        return
    if phase == "start":
        _GC_START["t"] = tl.now()
    elif "t" in _GC_START:
        tl.gcs.append((info["generation"], _GC_START.pop("t"), tl.now(), info.get("collected", 0)))


def _wrap(obj, name: str, before: str | None = None, after: str | None = None) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        tl = CURRENT["tl"]
        if tl is not None and before:
            tl.mark(before)
        try:
            return fn(*a, **kw)
        finally:
            if tl is not None and after:
                tl.mark(after)

    setattr(obj, name, wrapped)


def instrument() -> None:
    """Wrap our reader's phases and the store's GETs (class attributes: every instance)."""
    R = reader_mod.ExtStorageReader
    _wrap(R, "read_metadata", "read_metadata start", "read_metadata end")
    _wrap(R, "set_up_storage_reader", None, "set_up_storage_reader end")
    _wrap(R, "prepare_local_plan", "prepare_local_plan (DCP local plan made)", None)
    _wrap(R, "prepare_global_plan", None, "prepare_global_plan end")
    _wrap(R, "read_data", "read_data start", "read_data end")
    _wrap(reader_mod, "coalesce_small", "item read plans made", None)
    run_all = reader_mod.run_all

    def run_all_marked(purpose, workers, fn, calls):
        tl = CURRENT["tl"]
        if tl is not None:
            tl.mark(f"GET tasks start ({len(calls)} tasks, {workers} workers)")
        try:
            return run_all(purpose, workers, fn, calls)
        finally:
            if tl is not None:
                tl.mark("GET tasks end (finishing items next)")

    reader_mod.run_all = run_all_marked
    open_range = S3Store._open_range

    def open_range_timed(self, key, start, end):
        tl = CURRENT["tl"]
        g = tl.get(key, (end - start) if end is not None else -1) if tl is not None else None
        try:
            return open_range(self, key, start, end)
        finally:
            if g is not None:
                g["open"] = tl.now()

    S3Store._open_range = open_range_timed
    finish = object_store_mod._finish

    def finish_timed(stream):
        tl = CURRENT["tl"]
        if tl is not None:
            with tl.lock:
                mine = [g for g in tl.gets if g["thread"] == threading.current_thread().name and "end" not in g]
            if mine:
                mine[-1]["end"] = tl.now()
        return finish(stream)

    object_store_mod._finish = finish_timed


def raw_load_timed(rawb: RawBotocore, target: dict, url: str) -> None:
    """``RawBotocore.load`` with each GET timed (same requests, same threads)."""
    client = rawb.client
    get_object = client.get_object

    def timed(**kw):
        tl = CURRENT["tl"]
        a, b = kw["Range"].split("=")[1].split("-")
        g = tl.get(kw["Key"], int(b) - int(a) + 1)
        r = get_object(**kw)
        g["open"] = tl.now()
        raw = r["Body"]._raw_stream
        rel = raw.release_conn

        def release():
            g["end"] = tl.now()
            rel()

        raw.release_conn = release
        return r

    client.get_object = timed
    try:
        rawb.load(target, url)
    finally:
        client.get_object = get_object


def report(name: str, tl: Timeline, total: float) -> dict:
    gets = sorted(tl.gets, key=lambda g: g["sent"])
    print(f"\n== {name}: {total * 1000:.0f} ms")
    for m, t in tl.marks:
        print(f"  {t * 1000:7.1f}  {m}")
    for gen, a, b, n in tl.gcs:
        if gen > 0 or b - a > 0.001:
            print(f"  {a * 1000:7.1f}  gc generation {gen}: {(b - a) * 1000:.1f} ms ({n} collected)")
    threads = {g["thread"] for g in gets}
    print(f"  GETs: {len(gets)} on {len(threads)} threads")
    print("  thread                    sent    open     end   MiB  MiB/s  key")
    for g in gets:
        dur = g.get("end", float("nan")) - g["open"]
        print(f"  {g['thread'][-24:]:24s} {g['sent'] * 1000:7.1f} {g['open'] * 1000:7.1f} {g.get('end', float('nan')) * 1000:7.1f}"
              f" {g['bytes'] / MiB:5.1f} {g['bytes'] / MiB / dur if dur > 0 else 0:6.0f}  {g['key']}")
    data = [g for g in gets if g["bytes"] > 1024 * 1024]
    out = {"total": total, "gc": sum(b - a for _, a, b, _ in tl.gcs)}
    if data:
        first_sent = min(g["sent"] for g in data)
        first_open = min(g["open"] for g in data)
        last_end = max(g.get("end", 0) for g in data)
        out.update(first_sent=first_sent, first_open=first_open, last_end=last_end, after=total - last_end,
                   transfer=last_end - first_sent)
        ends = sorted(g.get("end", 0) for g in data)
        busy = {}
        for g in data:
            busy.setdefault(g["thread"], 0.0)
            busy[g["thread"]] += g.get("end", 0) - g["sent"]
        print(f"  first data GET sent {first_sent * 1000:.1f} ms, first headers {first_open * 1000:.1f}, "
              f"last byte {last_end * 1000:.1f}, after it {(total - last_end) * 1000:.1f} ms; "
              f"transfer {1000 * (last_end - first_sent):.1f} ms; thread busy ms: "
              f"{sorted(round(v * 1000) for v in busy.values())}; last 3 GET ends {[round(e * 1000) for e in ends[-3:]]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--quiet", action="store_true", help="only the summary lines")
    ap.add_argument("--with-fsspec", action="store_true",
                    help="also save, load and delete with stock FsspecWriter/Reader in every round (as the "
                         "benchmark's fsspec contender does)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    instrument()
    import gc

    gc.callbacks.append(_gc_callback)
    state = make_state(args.size_mib)
    target = zeros_like(state)
    print(f"state: {nbytes(state) / MiB:.0f} MiB; load average {os.getloadavg()}", flush=True)
    sums: dict[str, list[dict]] = {"dcp_ext": [], "raw_botocore": []}
    with S3TestServer() as srv:
        rawb = RawBotocore(srv, args.threads)
        opts = srv.options()
        names = ["dcp_ext", "raw_botocore"] + (["fsspec"] if args.with_fsspec else [])
        if args.with_fsspec:
            import s3fs
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

            so = srv.fsspec_options()
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **so)
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                url = f"s3://{srv.bucket}/tl/{name}-{uuid.uuid4().hex[:8]}"
                if name == "fsspec":
                    dcp.save(state, storage_writer=FsspecWriter(url, **so))
                    dcp.load(target, storage_reader=FsspecReader(url, **so))
                    fs.rm(url.split("://", 1)[1], recursive=True)
                    continue
                if name == "dcp_ext":
                    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, io_threads=args.threads, **opts))
                else:
                    rawb.save(state, url)
                tl = Timeline()
                CURRENT["tl"] = tl
                if name == "dcp_ext":
                    dcp.load(target, storage_reader=dcp_ext.storage_reader(url, io_threads=args.threads, **opts))
                else:
                    raw_load_timed(rawb, target, url)
                total = tl.now()
                CURRENT["tl"] = None
                if rnd == 0:
                    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not torch.equal(v, target[k])]
                    assert not bad, f"{name}: loaded tensors differ: {bad[:5]}"
                    continue
                if args.quiet:
                    import contextlib
                    import io
                    with contextlib.redirect_stdout(io.StringIO()):
                        s = report(name, tl, total)
                    print(f"{name:13s} total {s['total'] * 1000:6.1f}  first GET {s['first_sent'] * 1000:5.1f}  "
                          f"first byte {s['first_open'] * 1000:5.1f}  last byte {s['last_end'] * 1000:6.1f}  "
                          f"after {s['after'] * 1000:5.1f}  gc {s['gc'] * 1000:5.1f} ({len(tl.gcs)}, gens {sorted({g[0] for g in tl.gcs})})", flush=True)
                else:
                    s = report(name, tl, total)
                sums[name].append(s)
    print(f"\nmedians over {args.rounds} rounds (ms); load average now {os.getloadavg()}")
    for name, rows in sums.items():
        if rows:
            print(f"  {name:13s} " + "  ".join(f"{k} {1000 * statistics.median(r[k] for r in rows):.1f}"
                                              for k in ("total", "first_sent", "first_open", "last_end", "after",
                                                        "transfer", "gc")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
