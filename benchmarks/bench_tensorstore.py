"""Benchmark the TensorStore (zarr3) backend against dcp-ext's local backend and stock
``FileSystemWriter``/``FileSystemReader``, side by side in one run, on real-looking weights.

Contenders: ``tensorstore`` (zarr3, crc32c per chunk; on local files uncompressed chunks go
through dcp-ext's own code, ``tensorstore.native_file_io``), ``tensorstore-lib`` (the same
checkpoint written and read by the TensorStore library: ``native_file_io = false``),
``tensorstore+zstd`` (zstd level 3 too: always the library), ``dcp_ext`` (our local byte backend),
``stock`` (``FileSystemWriter``/``FileSystemReader``).
For each dtype (bf16, fp32) a Megatron-like stack of layers (QKV, proj, MLP up/down, norms;
``randn * 0.02``: weights do not compress much, which the zstd column shows):

1. **save** of the whole state by one process (GB/s, median of ``--runs``, contenders interleaved
   in a rotating order after one discarded warm-up round), and the bytes on disk; beside each
   ratio to ``dcp_ext``, the ratio of CPU seconds (this process, all threads), steadier when
   other work shares the cores;
2. **full load** into preallocated tensors, zeroed first (their pages exist, as a model's do:
   a load into fresh ``empty`` tensors mostly measures page faults) (GB/s);
3. **1 -> 4 resharded partial load**: the 1-rank checkpoint loaded by 4 gloo ranks at TP=4
   (column-parallel weights split by rows, row-parallel ones by columns) with
   ``ReshardLoadPlanner``; per rank: bytes read from storage / bytes the rank needs (stock reads
   whole items; TensorStore's own counter for the zarr3 backend), and the load time.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_tensorstore.py --quick            # smoke run (small)
    PYTHONPATH=$PWD python benchmarks/bench_tensorstore.py --hidden 2048 --runs 5 --dir /dev/shm
    PYTHONPATH=$PWD python benchmarks/bench_tensorstore.py --contenders tensorstore,dcp_ext --runs 7

Writes ``bench_out/bench_tensorstore.json``; prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402

from dcp_ext.layout import ParallelLayout, ShardSpec  # noqa: E402
from dcp_ext.planner import ReshardLoadPlanner, ReshardSavePlanner  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

CONTENDERS = ("tensorstore", "tensorstore-lib", "tensorstore+zstd", "dcp_ext", "stock")
RULES = {"*.qkv.weight": ShardSpec(0), "*.up.weight": ShardSpec(0), "*.proj.weight": ShardSpec(1),
         "*.down.weight": ShardSpec(1)}


def make_state(hidden: int, layers: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Global weights of ``layers`` transformer layers (``randn * 0.02``, like trained weights)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for name, shape in (("qkv", (3 * hidden, hidden)), ("proj", (hidden, hidden)), ("up", (4 * hidden, hidden)),
                            ("down", (hidden, 4 * hidden)), ("norm", (hidden,))):
            sd[f"layers.{i}.{name}.weight"] = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    return sd


def nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def writer_for(c: str, path: str):
    import dcp_ext

    if c == "stock":
        return FileSystemWriter(path)
    if c == "dcp_ext":
        return dcp_ext.storage_writer(path)
    return dcp_ext.storage_writer(path, backend="tensorstore", tensorstore=ts_options(c))


def ts_options(c: str) -> dict:
    """The ``[tensorstore]`` options of contender ``c``."""
    if c.endswith("+zstd"):
        return {"compression": "zstd", "compression_level": 3}
    return {"native_file_io": False} if c.endswith("-lib") else {}


def reader_for(c: str, path: str):
    import dcp_ext

    if c == "stock":
        return FileSystemReader(path)
    if c == "dcp_ext":
        return dcp_ext.storage_reader(path)
    return dcp_ext.storage_reader(path, backend="tensorstore", tensorstore=ts_options(c))


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def save_and_load(c: str, sd: dict, path: str) -> tuple[float, float, float, float]:
    """Seconds of the save and of the load, then CPU seconds of each (this process, all threads:
    the steadier measure on a shared machine, where other work takes the cores away at random)."""
    shutil.rmtree(path, ignore_errors=True)
    cpu = time.process_time()
    t = time.perf_counter()
    dcp.save({"model": sd}, storage_writer=writer_for(c, path), planner=ReshardSavePlanner(ParallelLayout(rules=RULES)))
    ts = time.perf_counter() - t
    cs = time.process_time() - cpu
    out = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}}  # touched, like a model's tensors
    cpu = time.process_time()
    t = time.perf_counter()
    dcp.load(out, storage_reader=reader_for(c, path), planner=ReshardLoadPlanner(ParallelLayout(rules=RULES)))
    tl = time.perf_counter() - t
    cl = time.process_time() - cpu
    assert all(torch.equal(out["model"][k], v) for k, v in sd.items()), f"{c}: loaded values differ"
    return ts, tl, cs, cl


def rank_partial_load(path: str, c: str, hidden: int, layers: int, dtype_name: str) -> dict:
    """One rank of the 1 -> 4 load: its TP=4 shards, bytes read vs needed, seconds."""
    import torch.distributed as dist

    rank, ws = dist.get_rank(), dist.get_world_size()
    lay = ParallelLayout(tp_rank=rank, tp_size=ws, rules=RULES)
    full = make_state(hidden, layers, getattr(torch, dtype_name))
    expect = {k: lay.shard(k, v) for k, v in full.items()}
    out = {"model": {k: torch.empty_like(v) for k, v in expect.items()}}
    needed = nbytes(expect)
    reader = reader_for(c, path)
    dist.barrier()
    t = time.perf_counter()
    dcp.load(out, storage_reader=reader, planner=ReshardLoadPlanner(lay))
    dt = time.perf_counter() - t
    assert all(torch.equal(out["model"][k], v) for k, v in expect.items()), f"{c}: rank {rank} loaded wrong values"
    if c == "stock":  # it torch.loads every stored item it touches, whole
        read = sum(full[k].numel() * full[k].element_size() for k in expect)
    else:
        read = reader.stats.bytes_read
    return {"needed": needed, "read": read, "seconds": dt}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke test)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {','.join(CONTENDERS)} (dcp_ext is always included)")
    ap.add_argument("--no-partial", action="store_true", help="skip the 1 -> 4 resharded partial load")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_tensorstore.json"))
    ap.add_argument("--plot", default="", help="write a PNG of the table here (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.runs = 256, 2, 1
    contenders = [c for c in CONTENDERS if c in args.contenders.split(",") or c == "dcp_ext"]
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    from dcp_ext.testing import RankPool

    base = tempfile.mkdtemp(prefix="bench_ts_", dir=args.dir)
    report = {"args": vars(args), "loadavg_before": loadavg(), "results": {}}
    print(f"under {base}; load average {report['loadavg_before']}")
    pool = None if args.no_partial else RankPool(4)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            dname = str(dtype).removeprefix("torch.")
            sd = make_state(args.hidden, args.layers, dtype)
            total = nbytes(sd)
            times = {c: {"save": [], "load": [], "save_cpu": [], "load_cpu": []} for c in contenders}
            k = len(contenders)
            for rep in range(-1, args.runs):  # round -1 warms up (imports, TensorStore start-up)
                for c in contenders[rep % k:] + contenders[:rep % k]:  # interleaved, rotating order
                    measured = save_and_load(c, sd, os.path.join(base, c))
                    if rep >= 0:
                        for key, x in zip(("save", "load", "save_cpu", "load_cpu"), measured):
                            times[c][key].append(x)
            res = {}
            for c in contenders:
                path = os.path.join(base, c)
                res[c] = {"save_GBps": total / statistics.median(times[c]["save"]) / 1e9,
                          "load_GBps": total / statistics.median(times[c]["load"]) / 1e9,
                          "save_s": [round(x, 4) for x in times[c]["save"]],
                          "load_s": [round(x, 4) for x in times[c]["load"]],
                          "save_cpu_s": [round(x, 4) for x in times[c]["save_cpu"]],
                          "load_cpu_s": [round(x, 4) for x in times[c]["load_cpu"]],
                          "disk_MiB": disk_bytes(path) / 2**20,
                          "partial_read_over_needed": [], "partial_load_s": float("nan")}
                if pool is not None:
                    part = pool.run(rank_partial_load, path, c, args.hidden, args.layers, dname, timeout=3600)
                    res[c]["partial_read_over_needed"] = [round(p["read"] / p["needed"], 3) for p in part]
                    res[c]["partial_load_s"] = round(max(p["seconds"] for p in part), 3)
            for c in contenders:
                for k in ("save", "load"):
                    res[c][f"{k}_vs_dcp_ext"] = res[c][f"{k}_GBps"] / res["dcp_ext"][f"{k}_GBps"]
                    res[c][f"{k}_cpu_vs_dcp_ext"] = (statistics.median(times["dcp_ext"][f"{k}_cpu"])
                                                     / statistics.median(times[c][f"{k}_cpu"]))
            report["results"][dname] = {"MiB": total / 2**20, "contenders": res}
            print(f"\n== {dname}: {total / 2**20:.0f} MiB, hidden {args.hidden}, {args.layers} layers, "
                  f"median of {args.runs} ==")
            print(f"{'contender':18s} {'save GB/s':>9s} {'vs ours':>7s} {'cpu':>6s} {'load GB/s':>9s} {'vs ours':>7s} "
                  f"{'cpu':>6s} "
                  f"{'disk MiB':>8s} {'1->4 read/needed per rank':>28s} {'1->4 s':>7s}")
            for c, r in res.items():
                print(f"{c:18s} {r['save_GBps']:9.2f} {r['save_vs_dcp_ext']:6.2f}x {r['save_cpu_vs_dcp_ext']:5.2f}x "
                      f"{r['load_GBps']:9.2f} {r['load_vs_dcp_ext']:6.2f}x {r['load_cpu_vs_dcp_ext']:5.2f}x "
                      f"{r['disk_MiB']:8.1f} "
                      f"{str(r['partial_read_over_needed']):>28s} {r['partial_load_s']:7.3f}")
    finally:
        if pool is not None:
            pool.close()
        shutil.rmtree(base, ignore_errors=True)
    report["loadavg_after"] = loadavg()
    print(f"\nload average after: {report['loadavg_after']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report: dict, path: str) -> None:
    """The table as one PNG: save/load speed vs dcp_ext per dtype, and the 1 -> 4 load's read/needed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import Panel, chart

    res = report["results"]
    dtypes = list(res)
    names = list(next(iter(res.values()))["contenders"])
    panels = [Panel([f"{d} {op}" for d in dtypes for op in ("save", "load")],
                    {c: [res[d]["contenders"][c][f"{op}_vs_dcp_ext"] for d in dtypes for op in ("save", "load")]
                     for c in names}, "speed / dcp_ext's", "throughput vs dcp_ext (higher is better)",
                    hline=0.8, hline_label="goal: >= 0.8x")]
    if any(res[d]["contenders"][c]["partial_read_over_needed"] for d in dtypes for c in names):
        panels.append(Panel(dtypes, {c: [max(res[d]["contenders"][c]["partial_read_over_needed"] or [float("nan")])
                                          for d in dtypes] for c in names},
                            "bytes read / needed (max over ranks)", "1 -> 4 ranks, TP=4: read vs needed (lower is better)",
                            hline=1.1, hline_label="goal: <= 1.1x"))
    a = report["args"]
    sizes = ", ".join(f"{d} {res[d]['MiB']:.0f} MiB" for d in dtypes)
    chart(path, f"TensorStore (zarr3) vs dcp_ext on tmpfs: hidden {a['hidden']}, {a['layers']} layers", panels,
          f"median of {a['runs']}; {sizes}; load average {report['loadavg_before']} -> {report['loadavg_after']}")


if __name__ == "__main__":
    sys.exit(main())
