"""Save/load throughput on local disk: dcp-ext vs stock DCP vs torch.save/torch.load.

Same state dict for every contender (a mix of large and small tensors, >= 1 GiB by
default), 1 and 2 ranks, contenders interleaved round-robin in each repetition so machine
noise hits all of them alike; the median of ``--runs`` repetitions is reported, with ratios
ours/peer (> 1 means we are faster): the ratio of the medians, and the median of the ratios
taken within each repetition ("paired", more robust when the machine's load drifts). Results go to stdout and to a JSON file.

    python benchmarks/bench_fs.py --size-mib 1024 --runs 5 --out bench_out/bench_fs.json

Contenders (save / load):
  ours          dcp_ext.storage_writer / storage_reader (defaults: checksums on, verify on, fsync)
  stock         FileSystemWriter / FileSystemReader with their defaults (thread_count=1)
  stock_t8      FileSystemWriter(thread_count=8) / FileSystemReader   (stock, tuned)
  torch_save    torch.save + fsync / torch.load of each rank's own state to / from its own
                file (no DCP: no plan, no metadata, no resharding; the floor for one file)
Loads are measured with a warm page cache (the files were just written): they measure the
CPU efficiency of each reader, not the disk. Before every timed save and load the garbage
collector runs (untimed), so no contender pays for a full collection of another's garbage;
each contender's files are deleted after its load (on tmpfs they are memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONTENDERS = ["ours", "stock", "stock_t8", "torch_save"]


def make_state(total_bytes: int, rank: int = 0, world: int = 1, seed: int = 0) -> dict:
    """~total_bytes/world per rank: 4 large matrices (~90%), 200 small tensors, a few objects."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    per_rank = total_bytes // world
    big = int(per_rank * 0.9) // 4 // 4  # fp32 elements per big tensor
    cols = 4096
    rows = max(1, big // cols)
    state: dict = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(4)}
    small = int(per_rank * 0.1) // 200 // 4
    for i in range(200):
        state[f"small.{i}"] = torch.randn(max(1, small), generator=g)
    state["meta"] = {"step": 100, "rank": rank}
    return state


def _nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def _zeros(state: dict) -> dict:
    return {k: (torch.empty_like(v) if isinstance(v, torch.Tensor) else {kk: None for kk in v})
            for k, v in state.items()}


def _writer(kind: str, path: str):
    import torch.distributed.checkpoint as dcp

    import dcp_ext

    if kind == "ours":
        return dcp_ext.storage_writer(path, overwrite=True)
    return dcp.FileSystemWriter(path, thread_count=8 if kind == "stock_t8" else 1)


def _reader(kind: str, path: str):
    import torch.distributed.checkpoint as dcp

    import dcp_ext

    if kind == "ours":
        return dcp_ext.storage_reader(path)
    return dcp.FileSystemReader(path)


def run_one(kind: str, state: dict, path: str, check: bool = True) -> tuple[float, float]:
    """Save then load ``state`` with ``kind``; returns (save_s, load_s)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    pt_file = os.path.join(path, f"rank{rank}.pt")
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    if kind == "torch_save":
        os.makedirs(path, exist_ok=True)
        with open(pt_file, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    else:
        dcp.save(state, storage_writer=_writer(kind, path))
    save_s = time.perf_counter() - t0
    target = None if kind == "torch_save" else _zeros(state)
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    if kind == "torch_save":
        target = torch.load(pt_file, weights_only=True)
    else:
        dcp.load(target, storage_reader=_reader(kind, path))
    load_s = time.perf_counter() - t0
    if check:
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and not torch.equal(v, target[k]):
                raise AssertionError(f"{kind}: {k} differs after load")
    del target
    if dist.is_initialized():
        dist.barrier()  # every rank finished loading before the files go
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    return save_s, load_s


def rank_worker(root: str, total_bytes: int, runs: int, contenders: list[str]) -> dict:
    """Run on each gloo rank: plain per-rank tensors under rank-specific names."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    state = make_state(total_bytes, rank, world)
    state = {f"r{rank}.{k}": v for k, v in state.items()}
    out: dict = {c: {"save": [], "load": []} for c in contenders}
    for rep in range(runs):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            s, l_ = run_one(c, state, os.path.join(root, c))
            t = torch.tensor([s, l_], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a save is done when the slowest rank is
            out[c]["save"].append(t[0].item())
            out[c]["load"].append(t[1].item())
    return out


def summarise(raw: dict, nbytes: int) -> dict:
    res = {}
    for c, d in raw.items():
        res[c] = {"save_s": statistics.median(d["save"]), "load_s": statistics.median(d["load"]),
                  "save_GBps": nbytes / statistics.median(d["save"]) / 1e9,
                  "load_GBps": nbytes / statistics.median(d["load"]) / 1e9,
                  "save_runs": d["save"], "load_runs": d["load"]}
    ours = res["ours"]
    for c in res:
        if c != "ours":
            res[c]["ours_speedup_save"] = res[c]["save_s"] / ours["save_s"]
            res[c]["ours_speedup_load"] = res[c]["load_s"] / ours["load_s"]
            # the same ratio taken within each repetition (contenders ran back to back), then the
            # median: robust to load that drifts between repetitions on a shared machine
            for op in ("save", "load"):
                res[c][f"ours_speedup_{op}_paired"] = statistics.median(
                    p / o for p, o in zip(raw[c][op], raw["ours"][op]))
    return res


def _fs_type(path: str) -> str:
    """The file system type of ``path`` (from /proc/mounts: tmpfs, ext4, xfs, nfs, ...)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if os.path.abspath(path).startswith(mnt.rstrip("/") + "/") or os.path.abspath(path) == mnt:
                    if len(mnt) > len(best):
                        best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="total state size (all ranks)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under ./bench_out)")
    ap.add_argument("--out", default="bench_out/bench_fs.json")
    args = ap.parse_args(argv)
    total = args.size_mib * 1024 * 1024
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "fs_tmp")
    os.makedirs(base, exist_ok=True)
    report = {"size_bytes": total, "runs": args.runs, "torch": torch.__version__, "cpus": os.cpu_count(),
              "dir": base, "fs_type": _fs_type(base), "loadavg_before": _loadavg(), "results": {}}
    print(f"writing under {base} ({report['fs_type']}), load average {report['loadavg_before']}")
    for n in [int(x) for x in args.ranks.split(",")]:
        root = tempfile.mkdtemp(dir=base)
        try:
            if n == 1:
                state = make_state(total)
                nbytes = _nbytes(state)
                raw = {c: {"save": [], "load": []} for c in CONTENDERS}
                for rep in range(args.runs):
                    order = CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)]
                    for c in order:
                        s, l_ = run_one(c, state, os.path.join(root, c))
                        raw[c]["save"].append(s)
                        raw[c]["load"].append(l_)
                del state
            else:
                from dcp_ext.testing import run_on_ranks

                raw = run_on_ranks(rank_worker, n, root, total, args.runs, CONTENDERS, timeout=3600)[0]
                nbytes = _nbytes(make_state(total, 0, n)) * n
            res = summarise(raw, nbytes)
            report["results"][f"{n}_ranks"] = res
            print(f"\n== {n} rank(s), {nbytes / 2**30:.2f} GiB, median of {args.runs} ==")
            print(f"{'contender':12s} {'save GB/s':>10s} {'load GB/s':>10s} {'ours/peer save':>15s} "
                  f"{'ours/peer load':>15s} {'paired save':>12s} {'paired load':>12s}")
            for c, r in res.items():
                cols = [f"{r.get(k, 1.0):.2f}x" for k in ("ours_speedup_save", "ours_speedup_load",
                                                           "ours_speedup_save_paired", "ours_speedup_load_paired")]
                print(f"{c:12s} {r['save_GBps']:10.2f} {r['load_GBps']:10.2f} {cols[0]:>15s} {cols[1]:>15s} "
                      f"{cols[2]:>12s} {cols[3]:>12s}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    report["loadavg_after"] = _loadavg()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
