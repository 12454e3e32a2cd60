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
  ours_nocheck  ours with checksum=False, verify=False (what hashing and verifying cost)
  ours_crc32c   ours with checksum_algorithm="crc32c" (the algorithm before xxh3_64; not run unless
                named in --contenders)
  raw           the machine's limit for the same bytes: each rank's tensors split by bytes over
                one plain thread per core it has (cores / ranks), each writing its tensors' raw
                bytes with os.write to its own file (+ fsync) and reading them back with
                readinto straight into preallocated tensors (no format, no checksums)
  raw_verified  raw, plus what verification must add to it: the save hashes each 1 MiB block
                (xxh3_64) right before writing it, the load reads 1 MiB pieces and hashes each
                right after it lands (still in cache), compared with the digests of the save.
                No format, no DCP: the limit of any design that verifies what it read (not
                run unless named in --contenders)
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

CONTENDERS = ["ours", "stock", "stock_t8", "torch_save", "ours_nocheck", "raw"]
#: contenders run only when named in --contenders
EXTRA_CONTENDERS = ["ours_crc32c", "raw_verified"]
#: the block raw_verified hashes (dcp-ext's blocks of a 32 MiB tensor are 1 MiB too)
RAW_BLOCK = 1 << 20


def make_state(total_bytes: int, rank: int = 0, world: int = 1, seed: int = 0, kind: str = "mixed") -> dict:
    """~total_bytes/world per rank. ``mixed``: 4 large matrices (~90%), 200 small tensors, a few
    objects; ``uniform``: fp32 tensors of 32 MiB each (issue 18's state: 24 of them for 768 MiB)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    per_rank = total_bytes // world
    if kind == "uniform":
        n = max(1, per_rank // (32 << 20))
        return {f"t.{i}": torch.randn(per_rank // n // 4 // 1024, 1024, generator=g) for i in range(n)}
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
    # zero-filled: the pages are faulted in before the timed load, as a model's parameters are
    return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {kk: None for kk in v})
            for k, v in state.items()}


def _writer(kind: str, path: str):
    import torch.distributed.checkpoint as dcp

    import dcp_ext

    if kind == "ours":
        return dcp_ext.storage_writer(path, overwrite=True)
    if kind == "ours_nocheck":
        return dcp_ext.storage_writer(path, overwrite=True, checksum=False)
    if kind == "ours_crc32c":
        return dcp_ext.storage_writer(path, overwrite=True, checksum_algorithm="crc32c")
    return dcp.FileSystemWriter(path, thread_count=8 if kind == "stock_t8" else 1)


def _reader(kind: str, path: str):
    import torch.distributed.checkpoint as dcp

    import dcp_ext

    if kind in ("ours", "ours_crc32c"):  # (the reader follows the manifest's algorithm)
        return dcp_ext.storage_reader(path)
    if kind == "ours_nocheck":
        return dcp_ext.storage_reader(path, verify=False)
    return dcp.FileSystemReader(path)


def _raw_threads() -> int:
    """One plain I/O thread per core this rank has (the cores shared by the ranks)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(1, (os.cpu_count() or 1) // world)


def _raw_groups(state: dict, n: int) -> list[list[str]]:
    """The state's tensors split by bytes over ``n`` files (largest first to the lightest)."""
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    tensors = sorted(((k, v) for k, v in state.items() if isinstance(v, torch.Tensor)),
                     key=lambda kv: -kv[1].numel() * kv[1].element_size())
    for k, v in tensors:
        i = load.index(min(load))
        groups[i].append(k)
        load[i] += v.numel() * v.element_size()
    return groups


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def raw_save(state: dict, path: str, rank: int, digests: dict | None = None) -> None:
    """The raw limit's save: each thread ``os.write``\ s its tensors' bytes to its own file, fsync.
    With ``digests`` (raw_verified): each ``RAW_BLOCK`` is hashed right before it is written, the
    digests stored there by tensor name."""
    from concurrent.futures import ThreadPoolExecutor

    import xxhash

    os.makedirs(path, exist_ok=True)

    def write(i: int, keys: list[str]) -> None:
        fd = os.open(os.path.join(path, f"raw{rank}_{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for k in keys:
                mv = _bytes_of(state[k])
                if digests is not None:
                    digests[k] = out = []
                    for s in range(0, len(mv), RAW_BLOCK):
                        block = mv[s:s + RAW_BLOCK]
                        out.append(xxhash.xxh3_64_intdigest(block))
                        while len(block):
                            block = block[os.write(fd, block):]
                    continue
                while len(mv):
                    mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)

    groups = _raw_groups(state, _raw_threads())
    with ThreadPoolExecutor(len(groups)) as ex:
        list(ex.map(write, range(len(groups)), groups))


def raw_load(state: dict, target: dict, path: str, rank: int, digests: dict | None = None) -> None:
    """The raw limit's load: each thread ``readinto``\ s its file straight into the tensors.
    With ``digests`` (raw_verified): ``RAW_BLOCK`` pieces, each hashed right after it lands and
    compared with the save's digest."""
    from concurrent.futures import ThreadPoolExecutor

    import xxhash

    def read(i: int, keys: list[str]) -> None:
        with open(os.path.join(path, f"raw{rank}_{i}"), "rb", buffering=0) as f:
            for k in keys:
                mv = _bytes_of(target[k])
                got = 0
                if digests is not None:
                    for n, s in enumerate(range(0, len(mv), RAW_BLOCK)):
                        piece = mv[s:s + RAW_BLOCK]
                        have = 0
                        while have < len(piece):
                            have += f.readinto(piece[have:])
                        if xxhash.xxh3_64_intdigest(piece) != digests[k][n]:
                            raise AssertionError(f"raw_verified: block {n} of {k} differs")
                    continue
                while got < len(mv):
                    got += f.readinto(mv[got:])

    groups = _raw_groups(state, _raw_threads())
    with ThreadPoolExecutor(len(groups)) as ex:
        list(ex.map(read, range(len(groups)), groups))


def _cpu_s() -> float:
    """CPU seconds (user + system) this process used so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def run_one(kind: str, state: dict, path: str, check: bool = True) -> tuple[float, float, float, float]:
    """Save then load ``state`` with ``kind``; returns (save_s, load_s, save_cpu_s, load_cpu_s):
    wall seconds, and the CPU seconds this process spent (robust to other jobs on the machine)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    pt_file = os.path.join(path, f"rank{rank}.pt")
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    c0, t0 = _cpu_s(), time.perf_counter()
    if kind == "torch_save":
        os.makedirs(path, exist_ok=True)
        with open(pt_file, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    elif kind in ("raw", "raw_verified"):
        digests: dict | None = {} if kind == "raw_verified" else None
        raw_save(state, path, rank, digests)
    else:
        dcp.save(state, storage_writer=_writer(kind, path))
    save_s, save_cpu = time.perf_counter() - t0, _cpu_s() - c0
    target = None if kind == "torch_save" else _zeros(state)
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    c0, t0 = _cpu_s(), time.perf_counter()
    if kind == "torch_save":
        target = torch.load(pt_file, weights_only=True)
    elif kind in ("raw", "raw_verified"):
        raw_load(state, target, path, rank, digests)
    else:
        dcp.load(target, storage_reader=_reader(kind, path))
    load_s, load_cpu = time.perf_counter() - t0, _cpu_s() - c0
    if check:
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and not torch.equal(v, target[k]):
                raise AssertionError(f"{kind}: {k} differs after load")
    del target
    if dist.is_initialized():
        dist.barrier()  # every rank finished loading before the files go
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    return save_s, load_s, save_cpu, load_cpu


def rank_worker(root: str, total_bytes: int, runs: int, contenders: list[str], kind: str = "mixed") -> dict:
    """Run on each gloo rank: plain per-rank tensors under rank-specific names."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    state = make_state(total_bytes, rank, world, kind=kind)
    state = {f"r{rank}.{k}": v for k, v in state.items()}
    out: dict = {c: {"save": [], "load": [], "save_cpu": [], "load_cpu": []} for c in contenders}
    for rep in range(runs):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            s, l_, sc, lc = run_one(c, state, os.path.join(root, c))
            t = torch.tensor([s, l_], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a save is done when the slowest rank is
            cpu = torch.tensor([sc, lc], dtype=torch.float64)
            dist.all_reduce(cpu)  # CPU seconds of all ranks together
            out[c]["save"].append(t[0].item())
            out[c]["load"].append(t[1].item())
            out[c]["save_cpu"].append(cpu[0].item())
            out[c]["load_cpu"].append(cpu[1].item())
    return out


def summarise(raw: dict, nbytes: int) -> dict:
    res = {}
    for c, d in raw.items():
        res[c] = {"save_s": statistics.median(d["save"]), "load_s": statistics.median(d["load"]),
                  "save_GBps": nbytes / statistics.median(d["save"]) / 1e9,
                  "load_GBps": nbytes / statistics.median(d["load"]) / 1e9,
                  "save_runs": d["save"], "load_runs": d["load"],
                  # CPU seconds per GiB (all ranks): what each contender costs, whatever else runs
                  "save_cpu_s_per_gib": statistics.median(d["save_cpu"]) / (nbytes / 2**30),
                  "load_cpu_s_per_gib": statistics.median(d["load_cpu"]) / (nbytes / 2**30)}
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


def plot(report: dict, path: str) -> None:
    """GB/s of every contender, save and load, per rank count (one PNG)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import Panel, chart

    cats, series, ratios = [], {}, {}
    for key, res in report["results"].items():
        n = key.split("_")[0]
        for op in ("save", "load"):
            cats.append(f"{op}, {n} rank{'s' if n != '1' else ''}")
            for c, r in res.items():
                series.setdefault(c, []).append(r[f"{op}_GBps"])
                if c != "ours":
                    ratios.setdefault(f"ours vs {c}", []).append(r[f"ours_speedup_{op}"])
    note = (f"{report['fs_type']}, {report['size_bytes'] / 2**30:.2f} GiB, median of {report['runs']}; load average "
            f"{report['loadavg_before']} -> {report['loadavg_after']}")
    goals = [(0.9, "issue 18 goal vs raw: >= 0.9x")] if "ours vs raw" in ratios else []
    goals += [(1.5, "issue 18 goal vs stock at 2 ranks: >= 1.5x")] if "ours vs stock" in ratios else []
    chart(path, "Local file system: save and load", [
        Panel(cats, series, "GB/s", "throughput (higher is better)"),
        Panel(cats, ratios, "ours / its speed", "ours vs each contender (> 1: ours is faster)",
              hlines=[(1.0, "level")] + goals, color_offset=1, logy=None)], note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="total state size (all ranks)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under ./bench_out)")
    ap.add_argument("--out", default="bench_out/bench_fs.json")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, 'ours' first")
    ap.add_argument("--plot", default="", help="write a PNG of the table here (needs matplotlib)")
    ap.add_argument("--state", choices=["mixed", "uniform"], default="mixed",
                    help="mixed: 4 large + 200 small tensors; uniform: 32 MiB fp32 tensors")
    args = ap.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    if contenders[0] != "ours" or not set(contenders) <= set(CONTENDERS + EXTRA_CONTENDERS):
        ap.error(f"--contenders: 'ours' first, then any of {CONTENDERS + EXTRA_CONTENDERS}")
    total = args.size_mib * 1024 * 1024
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "fs_tmp")
    os.makedirs(base, exist_ok=True)
    report = {"size_bytes": total, "runs": args.runs, "state": args.state, "torch": torch.__version__, "cpus": os.cpu_count(),
              "dir": base, "fs_type": _fs_type(base), "loadavg_before": _loadavg(), "results": {}}
    print(f"writing under {base} ({report['fs_type']}), load average {report['loadavg_before']}")
    for n in [int(x) for x in args.ranks.split(",")]:
        root = tempfile.mkdtemp(dir=base)
        try:
            if n == 1:
                state = make_state(total, kind=args.state)
                nbytes = _nbytes(state)
                raw = {c: {"save": [], "load": [], "save_cpu": [], "load_cpu": []} for c in contenders}
                for rep in range(args.runs):
                    order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
                    for c in order:
                        for key, v in zip(("save", "load", "save_cpu", "load_cpu"),
                                          run_one(c, state, os.path.join(root, c))):
                            raw[c][key].append(v)
                del state
            else:
                from dcp_ext.testing import run_on_ranks

                raw = run_on_ranks(rank_worker, n, root, total, args.runs, contenders, args.state, timeout=3600)[0]
                nbytes = _nbytes(make_state(total, 0, n, kind=args.state)) * n
            res = summarise(raw, nbytes)
            report["results"][f"{n}_ranks"] = res
            print(f"\n== {n} rank(s), {nbytes / 2**30:.2f} GiB, median of {args.runs} ==")
            print(f"{'contender':12s} {'save GB/s':>10s} {'load GB/s':>10s} {'ours/peer save':>15s} "
                  f"{'ours/peer load':>15s} {'paired save':>12s} {'paired load':>12s} {'CPU s/GiB save':>15s} "
                  f"{'load':>6s}")
            for c, r in res.items():
                cols = [f"{r.get(k, 1.0):.2f}x" for k in ("ours_speedup_save", "ours_speedup_load",
                                                           "ours_speedup_save_paired", "ours_speedup_load_paired")]
                print(f"{c:12s} {r['save_GBps']:10.2f} {r['load_GBps']:10.2f} {cols[0]:>15s} {cols[1]:>15s} "
                      f"{cols[2]:>12s} {cols[3]:>12s} {r['save_cpu_s_per_gib']:15.2f} {r['load_cpu_s_per_gib']:6.2f}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    report["loadavg_after"] = _loadavg()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
