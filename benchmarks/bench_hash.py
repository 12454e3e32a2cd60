"""Block checksums: the algorithms manifests can record (``dcp_ext.integrity.ALGORITHMS``: crc32c,
xxh3_64, the default for new saves), per block.

For each block size: GB/s over a large buffer hashed block by block from memory ("cold": each
block comes from RAM, as a separate hashing pass over a tensor would), the same block hashed
again right after it was touched ("hot": in cache, what hashing fused with the copy/write costs),
on one thread and on one thread per core (both libraries release the GIL). Medians of
``--runs``; contenders interleaved.

    python benchmarks/bench_hash.py --mib 256 --runs 5 --plot docs/img/bench_hash.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plots import bar_chart, loadavg_note  # noqa: E402


def algorithms() -> dict:
    """The one-shot digest of every block checksum algorithm, by name (what the writer calls)."""
    from dcp_ext.integrity import ALGORITHMS

    return {name: a.digest for name, a in ALGORITHMS.items()}


def run(fn, bufs: list[memoryview], block: int, hot: bool) -> float:
    """GB/s of hashing every block of every buffer (one thread per buffer). ``hot``: each block
    is hashed once untimed (bringing it into cache), then the timed hash runs on it."""
    spent = [0.0] * len(bufs)

    def work(i: int, mv: memoryview) -> None:
        clock = time.perf_counter
        if not hot:
            t0 = clock()
            for o in range(0, len(mv), block):
                fn(mv[o:o + block])
            spent[i] = clock() - t0
            return
        for o in range(0, len(mv), block):
            b = mv[o:o + block]
            fn(b)
            t0 = clock()
            fn(b)
            spent[i] += clock() - t0

    ts = [threading.Thread(target=work, args=(i, mv)) for i, mv in enumerate(bufs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(len(mv) for mv in bufs) / max(spent) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="buffer per thread")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blocks", default="256KiB,1MiB,4MiB")
    ap.add_argument("--out", default="bench_out/bench_hash.json")
    ap.add_argument("--plot", default="", help="write a PNG here")
    args = ap.parse_args()
    sizes = {s: int(s[:-3]) * (1024 if s.endswith("KiB") else 1024 * 1024) for s in args.blocks.split(",")}
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    bufs = [memoryview(rng.integers(0, 255, args.mib << 20, dtype=np.uint8)).cast("B") for _ in range(cores)]
    algs = algorithms()
    res: dict = {"loadavg_before": list(os.getloadavg()), "cores": cores, "mib_per_thread": args.mib, "gbps": {}}
    for name in algs:
        for bname in sizes:
            for mode in ("cold", "hot"):
                for threads in (1, cores):
                    res["gbps"][f"{name}|{bname}|{mode}|{threads}"] = []
    for _ in range(args.runs):
        for bname, bs in sizes.items():
            for mode in ("cold", "hot"):
                for threads in (1, cores):
                    for name, fn in algs.items():
                        res["gbps"][f"{name}|{bname}|{mode}|{threads}"].append(run(fn, bufs[:threads], bs, mode == "hot"))
    res["median_gbps"] = {k: statistics.median(v) for k, v in res["gbps"].items()}
    res["loadavg_after"] = list(os.getloadavg())
    print(f"{'algorithm':10s} {'block':>7s} {'mode':>5s} {'threads':>7s} {'GB/s':>7s}")
    for k, v in res["median_gbps"].items():
        a, b, m, t = k.split("|")
        print(f"{a:10s} {b:>7s} {m:>5s} {t:>7s} {v:7.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.plot:
        cats = [f"{b} {m}" for b in sizes for m in ("cold", "hot")]
        series = {f"{a}, 1 thread": [res["median_gbps"][f"{a}|{c.split()[0]}|{c.split()[1]}|1"] for c in cats]
                  for a in algs}
        series.update({f"{a}, {cores} threads": [res["median_gbps"][f"{a}|{c.split()[0]}|{c.split()[1]}|{cores}"]
                                                 for c in cats] for a in algs})
        bar_chart(args.plot, "Block checksum speed (higher is better)", cats, series, "GB/s", loadavg_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())
