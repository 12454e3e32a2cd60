"""Training-blocking time of ``dcp.async_save`` on the 2nd and later saves of one state.

Configs, measured interleaved in one process (round-robin, round 0 discarded as warm-up),
median over ``--rounds``:

* ``pooled``         ``dcp_ext.async_save(..., async_stager=PooledStager())`` (stock writer)
* ``pooled_ext``     the same with our writer (``dcp_ext.storage_writer``, fsync off as for the
                     stock writer here): its write buffers count in the peak RSS
* ``stock_default``  ``dcp.async_save(state, storage_writer=FileSystemWriter(...))`` (the
                     writer stages: fresh CPU copy every save)
* ``default_stager_new``     a fresh ``DefaultStager`` per save (what async_save does when the
                     writer is not a stager)
* ``default_stager_reused``  one ``DefaultStager`` kept across saves (caches buffers, but
                     with no ownership: unsafe for back-to-back saves, see tests)
* ``bare_copy``      ``copy_`` of every tensor into preallocated buffers (the floor)

Each save waits for the previous upload before the next one is timed, so only staging is
measured. Uploads go to FileSystemWriter on tmpfs (``--dir``, default /dev/shm).

Peak RSS: each config also runs alone in a fresh subprocess (``--rss-child``) that builds
the state, saves ``--rss-saves`` times and reports VmHWM from /proc/self/status; the
growth over the state itself is compared with the pool budget.

    python benchmarks/bench_async.py --size 1024 --rounds 7

``--tiered``: time until the checkpoint is *safe* vs *durable*, same state, interleaved:

* ``tiered``  ``dcp_ext.async_save`` + ``PooledStager`` into ``storage_writer(disk_url,
              cache=<tmpfs>)``: safe = the fast-tier commit (the save future), durable =
              ``wait_persisted()`` (the background copy to the disk URL committed there)
* ``direct``  the same stager into ``storage_writer(disk_url)``: safe = durable = the future
* ``stock``   ``dcp.async_save`` + ``FileSystemWriter(disk_url)`` (fsync on): safe = durable

All three fsync the durable copy. ``--durable-dir`` must be on a real disk (default
/var/tmp), ``--dir`` (the fast tier) in memory (default /dev/shm).

    python benchmarks/bench_async.py --tiered --size 1024 --rounds 5 --threads 1

``--tiered --durable s3``: the durable tier is an S3 server started on this machine
(SeaweedFS, see ``tests.support.servers``), where a fast tier pays off most; ``stock`` is then
``dcp.async_save`` + stock ``FsspecWriter`` over s3fs.

    python benchmarks/bench_async.py --tiered --durable s3 --size 512 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcp_ext  # noqa: E402
from dcp_ext.staging import PooledStager  # noqa: E402
from tests.support.memory import reset_peak_rss, vm_bytes  # noqa: E402

try:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: E402
except ImportError:  # torch 2.7 has no DefaultStager: its configs are left out
    DefaultStager = None  # type: ignore[assignment,misc]

_FS_EXTRA: dict = json.loads(os.environ.get("BENCH_ASYNC_FS", "{}"))  # e.g. {"write_buffer": "1MiB"}
CONFIGS = ["pooled", "pooled_ext", "stock_default", "default_stager_new", "default_stager_reused", "bare_copy"]


def make_state(size_mib: int, n_tensors: int = 48) -> dict[str, Any]:
    """A model-like state: ``n_tensors`` fp32/bf16 tensors of mixed sizes, ~``size_mib`` MiB."""
    g = torch.Generator().manual_seed(0)
    total = size_mib << 20
    weights = [1 + (i % 7) for i in range(n_tensors)]
    sd: dict[str, Any] = {"step": 100}
    for i, w in enumerate(weights):
        nbytes = total * w // sum(weights)
        dtype = torch.bfloat16 if i % 3 == 2 else torch.float32
        numel = nbytes // dtype.itemsize // 1024 * 1024
        sd[f"layer{i}.w"] = torch.randn(numel // 1024, 1024, generator=g).to(dtype)
    return sd


def state_bytes(sd: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


class Runner:
    """One config: ``save(i)`` returns the blocking seconds; ``wait()`` waits for the upload."""

    def __init__(self, name: str, sd: dict[str, Any], root: str) -> None:
        self.name, self.sd, self.root = name, sd, root
        self.fut: Any = None
        self.stager: Any = None
        if name in ("pooled", "pooled_ext"):
            self.stager = PooledStager()
        elif name == "default_stager_reused":
            self.stager = DefaultStager(StagingOptions(False, False, False, False))
        elif name == "bare_copy":
            self.bufs = {k: torch.empty_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
            for k, b in self.bufs.items():
                b.copy_(sd[k])  # fault the pages in once, like a pool after its first save

    def _writer(self) -> Any:
        path = os.path.join(self.root, self.name)
        if self.name == "pooled_ext":
            return dcp_ext.storage_writer(path, overwrite=True, fs={"fsync": False, **_FS_EXTRA})
        return FileSystemWriter(path, sync_files=False)

    def save(self) -> float:
        sd = self.sd
        if self.name == "bare_copy":
            t0 = time.perf_counter()
            for k, b in self.bufs.items():
                b.copy_(sd[k])
            return time.perf_counter() - t0
        w = self._writer()
        t0 = time.perf_counter()
        if self.name in ("pooled", "pooled_ext"):
            self.fut = dcp_ext.async_save(sd, storage_writer=w, async_stager=self.stager, no_dist=True)
        elif self.name == "stock_default":
            self.fut = dcp.async_save(sd, storage_writer=w, no_dist=True)
        elif self.name == "default_stager_new":
            st = DefaultStager(StagingOptions(False, False, False, False))
            self.fut = dcp.async_save(sd, storage_writer=w, async_stager=st, no_dist=True)
            self.fut.add_done_callback(lambda _f, st=st: st.close())
        else:
            self.fut = dcp.async_save(sd, storage_writer=w, async_stager=self.stager, no_dist=True)
        dt = time.perf_counter() - t0
        return dt

    def wait(self) -> None:
        if self.fut is not None:
            getattr(self.fut, "upload_completion", self.fut).result()
            self.fut = None
            # Keep tmpfs small: at 1 GiB, several configs' checkpoints left in /dev/shm put this
            # shared machine under memory pressure and slowed every copy (even bare_copy) ~5x.
            shutil.rmtree(os.path.join(self.root, self.name), ignore_errors=True)

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()


_vm = vm_bytes
_reset_peak = reset_peak_rss


def rss_child(config: str, size: int, saves: int, root: str) -> dict[str, Any]:
    """Peak RSS of ``saves`` saves; and of the later saves alone (after the first one allocated
    the pool): ``beyond_pool`` = that peak - RSS with the state - the pool's bytes."""
    sd = make_state(size)
    base = _vm("VmRSS")
    r = Runner(config, sd, root)
    r.save()
    r.wait()
    peak_first = _vm("VmHWM")
    later = _reset_peak()
    for _ in range(saves - 1):
        r.save()
        r.wait()
    peak = max(peak_first, _vm("VmHWM")) if not later else _vm("VmHWM")
    pool = r.stager.pool_bytes if isinstance(r.stager, PooledStager) else None
    r.close()
    out = {"config": config, "rss_after_state": base, "vm_hwm": max(peak, peak_first), "growth": max(peak, peak_first) - base,
           "pool_bytes": pool, "state_bytes": state_bytes(sd)}
    if later and saves > 1:
        out["later_saves_peak_growth"] = peak - base
        if pool is not None:
            out["beyond_pool"] = peak - base - pool
            # issue 18's bound: max(2% of the state, 16 MiB)
            out["beyond_pool_limit"] = max(state_bytes(sd) // 50, 16 << 20)
    return out


TIERED_CONFIGS = ["tiered", "direct", "stock"]


def tiered_main(args: argparse.Namespace) -> None:
    """Time until safe (first complete copy anywhere) and until durable, per config (median)."""
    sd = make_state(args.size)
    nbytes = state_bytes(sd)
    fast_root = tempfile.mkdtemp(prefix="bench_tier_fast_", dir=args.dir)
    disk_root = tempfile.mkdtemp(prefix="bench_tier_disk_", dir=args.durable_dir)
    srv = None
    if args.durable == "s3":  # the durable tier is an S3 server on this machine (started here)
        import s3fs
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        from tests.support.servers import S3TestServer

        srv = S3TestServer().start()
        raw = s3fs.S3FileSystem(skip_instance_cache=True, **srv.fsspec_options())
        disk_root = f"s3://{srv.bucket}/bench_tiered"
    stagers = {"tiered": PooledStager(), "direct": PooledStager()}
    rows: dict[str, dict[str, list[float]]] = {c: {"blocked": [], "safe": [], "durable": []} for c in TIERED_CONFIGS}
    try:
        for rnd in range(args.rounds + 1):
            for c in TIERED_CONFIGS:
                url = f"{disk_root}/{c}_{rnd}"
                opts = srv.options() if srv is not None else {}
                if c == "tiered":
                    w: Any = dcp_ext.storage_writer(url, cache=fast_root, **opts)
                elif c == "direct":
                    w = dcp_ext.storage_writer(url, **opts)
                elif srv is not None:  # stock on S3: FsspecWriter (s3fs)
                    w = FsspecWriter(url, **srv.fsspec_options())
                else:
                    w = FileSystemWriter(url, sync_files=True)
                t0 = time.perf_counter()
                if c == "stock":
                    fut = dcp.async_save(sd, storage_writer=w, no_dist=True)
                else:
                    fut = dcp_ext.async_save(sd, storage_writer=w, async_stager=stagers[c], no_dist=True)
                t_blocked = time.perf_counter() - t0
                fut.result()
                t_safe = time.perf_counter() - t0
                if c == "tiered":
                    w.wait_persisted()
                t_durable = time.perf_counter() - t0
                if rnd > 0:  # round 0: pool allocation, warm-up
                    for k, v in (("blocked", t_blocked), ("safe", t_safe), ("durable", t_durable)):
                        rows[c][k].append(v)
                if srv is not None:
                    raw.rm(url.split("://", 1)[1], recursive=True)
                    raw.invalidate_cache()
                else:
                    shutil.rmtree(url, ignore_errors=True)
                if c == "tiered":
                    shutil.rmtree(w.fast_dir, ignore_errors=True)
            print(f"round {rnd}: " + ", ".join(
                f"{c} safe={rows[c]['safe'][-1] * 1e3:.0f}ms durable={rows[c]['durable'][-1] * 1e3:.0f}ms"
                for c in TIERED_CONFIGS if rows[c]["safe"]), flush=True)
    finally:
        for st in stagers.values():
            st.close()
        shutil.rmtree(fast_root, ignore_errors=True)
        if srv is not None:
            srv.stop()
        else:
            shutil.rmtree(disk_root, ignore_errors=True)
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in rows.items()}
    ratios = {
        "tiered_safe_vs_direct_durable": med["tiered"]["safe"] / med["direct"]["durable"],
        "tiered_safe_vs_stock_durable": med["tiered"]["safe"] / med["stock"]["durable"],
        "tiered_durable_vs_direct_durable": med["tiered"]["durable"] / med["direct"]["durable"],
        "tiered_safe_vs_tiered_durable": med["tiered"]["safe"] / med["tiered"]["durable"],
    }
    result = {"torch": torch.__version__, "size_mib": args.size, "state_bytes": nbytes, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "fast_dir": args.dir,
              "durable": args.durable if args.durable == "s3" else args.durable_dir,
              "seconds": rows, "median_s": med, "ratios": ratios, "load_avg_at_end": os.getloadavg()}
    out = args.out if args.out != "bench_out/bench_async.json" else \
        f"bench_out/bench_async_tiered{'_s3' if args.durable == 's3' else ''}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"median_ms": {c: {k: round(v * 1e3) for k, v in m.items()} for c, m in med.items()},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}, "state_mib": round(nbytes / 2**20)},
                     indent=1))
    if args.plot:
        plot_tiered(result, args.plot)


def plot_tiered(result: dict, path: str) -> None:
    """The tiered table as one PNG: seconds until blocked / safe / durable per config."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import bar_chart, loadavg_note

    med = result["median_s"]
    names = {"tiered": "tiered (fast tier + durable)", "direct": "dcp-ext direct", "stock": "stock async_save"}
    durable = "S3" if result["durable"] == "s3" else "disk"
    bar_chart(path, f"Tiered async_save of {result['state_bytes'] / 2**20:.0f} MiB, durable tier {durable} "
              "(lower is better)", ["blocked", "safe (first complete copy)", "durable"],
              {names.get(c, c): [m["blocked"], m["safe"], m["durable"]] for c, m in med.items()}, "seconds",
              f"median of {result['rounds']} interleaved rounds; safe: tiered {result['ratios']['tiered_safe_vs_direct_durable']:.2f}x"
              f" direct durable, {result['ratios']['tiered_safe_vs_stock_durable']:.2f}x stock; {loadavg_note()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="state size in MiB (default 128; the issue asks >= 1024)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per config after one warm-up round")
    ap.add_argument("--rss-saves", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--out", default="bench_out/bench_async.json")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). On a small shared machine, 1 "
                         "avoids a parallel copy waiting for a descheduled worker thread")
    ap.add_argument("--tiered", action="store_true",
                    help="measure time until safe (fast tier) vs durable instead of the blocking time")
    ap.add_argument("--durable-dir", default="/var/tmp", help="a directory on a real disk (--tiered)")
    ap.add_argument("--durable", choices=["disk", "s3"], default="disk",
                    help="--tiered: the durable tier on local disk (--durable-dir) or on a local S3 server "
                         "(started here; stock = FsspecWriter over s3fs)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plot", default="", help="write a PNG (blocking ms, RSS beyond the pool; "
                    "with --tiered: blocked/safe/durable seconds) here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiered:
        tiered_main(args)
        return
    configs = [c for c in args.configs.split(",") if c]
    if DefaultStager is None:
        configs = [c for c in configs if not c.startswith("default_stager")]
    root = tempfile.mkdtemp(prefix="bench_async_", dir=args.dir)
    try:
        if args.rss_child:
            print(json.dumps(rss_child(args.rss_child, args.size, args.rss_saves, root)))
            return
        sd = make_state(args.size)
        nbytes = state_bytes(sd)
        runners = {c: Runner(c, sd, root) for c in configs}
        times: dict[str, list[float]] = {c: [] for c in configs}
        for rnd in range(args.rounds + 1):
            for c in configs:
                dt = runners[c].save()
                runners[c].wait()
                if rnd > 0:  # round 0 is each config's first save (pool allocation, warm-up)
                    times[c].append(dt)
            print(f"round {rnd}: " + ", ".join(f"{c}={times[c][-1] * 1e3:.1f}ms" for c in configs if times[c]),
                  flush=True)
        for r in runners.values():
            r.close()
        del runners
        med = {c: statistics.median(v) for c, v in times.items()}
        rss = {}
        for c in configs:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", c, "--size",
                                  str(args.size), "--rss-saves", str(args.rss_saves), "--dir", args.dir,
                                  "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            rss[c] = json.loads(out.stdout.strip().splitlines()[-1])
        result = {
            "torch": torch.__version__, "size_mib": args.size, "state_bytes": nbytes, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "dir": args.dir,
            "blocking_s": times, "median_s": med, "min_s": {c: min(v) for c, v in times.items()},
            "load_avg_at_end": os.getloadavg(),
            "gb_per_s": {c: nbytes / med[c] / 1e9 for c in configs},
            "ratios": {
                "pooled_vs_stock_default": med["pooled"] / med["stock_default"] if "stock_default" in med else None,
                "pooled_vs_bare_copy": med["pooled"] / med["bare_copy"] if "bare_copy" in med else None,
                "pooled_vs_default_stager_new": (med["pooled"] / med["default_stager_new"]
                                                 if "default_stager_new" in med else None),
            },
            "peak_rss": rss,
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        if args.plot:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from plots import Panel, bar_chart, chart, loadavg_note

            pooled = [c for c in configs if "beyond_pool" in rss[c]]
            goals = ([(0.3 * med["stock_default"] * 1e3, "goal: <= 0.3x stock default")] if "stock_default" in med else []) \
                + ([(2 * med["bare_copy"] * 1e3, "goal: <= 2x the bare copy")] if "bare_copy" in med else [])
            chart(args.plot, f"async_save of {nbytes / 2**20:.0f} MiB: training blocked (lower is better)",
                  [Panel(configs, {"median blocking ms": [med[c] * 1e3 for c in configs]}, "ms", hlines=goals)],
                  loadavg_note())
            if pooled:
                limit = rss[pooled[0]]["beyond_pool_limit"] / 2**20
                bar_chart(args.plot.replace(".png", "_rss.png"),
                          "Peak RSS beyond the staging pool on later saves (lower is better)", pooled,
                          {"MiB": [rss[c]["beyond_pool"] / 2**20 for c in pooled]}, "MiB", loadavg_note(),
                          hline=limit, hline_label=f"goal: max(2% of state, 16 MiB) = {limit:.0f} MiB")
        print(json.dumps({"median_ms": {c: round(v * 1e3, 1) for c, v in med.items()},
                          "min_ms": {c: round(min(v) * 1e3, 1) for c, v in times.items()},
                          "ratios": result["ratios"],
                          "rss_growth_mib": {c: round(v["growth"] / 2**20) for c, v in rss.items()},
                          "beyond_pool_mib": {c: round(v["beyond_pool"] / 2**20, 1) for c, v in rss.items()
                                              if "beyond_pool" in v},
                          "state_mib": round(nbytes / 2**20)}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
