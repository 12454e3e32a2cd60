"""Full loads only, TensorStore vs dcp-ext's byte backend: a second harness beside
``bench_tensorstore.py`` for issue 15's load goal (>= 0.8x our local backend on tmpfs).

One process builds the Megatron-like state of ``bench_tensorstore.py`` (``--hidden``,
``--layers``, ``--dtype``), saves it once per contender with ``ReshardSavePlanner`` (or, for
``tensorstore-square``, stock ``DefaultSavePlanner``: no layout record, so the TensorStore grid
falls back to the square chunks used before the chunk shapes followed the layout), then loads it
``--loads`` times per contender into the same tensors, zeroed before each load (``--no-zero``:
left as the previous load filled them), contenders alternating in a fixed order. With ``--save-each`` every load follows a fresh save of that contender (as in
``bench_tensorstore.py``). Prints the median wall and CPU seconds (this process, all threads)
and the ratios to ``dcp_ext``; every load is checked exactly.

    PYTHONPATH=$PWD python benchmarks/bench_ts_loads.py --hidden 2048 --layers 4 --dtype bfloat16 --save-each
    PYTHONPATH=$PWD python benchmarks/bench_ts_loads.py --contenders tensorstore,tensorstore-square,dcp_ext
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import DefaultSavePlanner  # noqa: E402

import bench_tensorstore as bt  # noqa: E402
from dcp_ext.layout import ParallelLayout  # noqa: E402
from dcp_ext.planner import ReshardLoadPlanner, ReshardSavePlanner  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
CONTENDERS = ("tensorstore", "tensorstore-square", "dcp_ext")


def save(c: str, sd: dict, path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    planner = DefaultSavePlanner() if c == "tensorstore-square" else ReshardSavePlanner(ParallelLayout(rules=bt.RULES))
    dcp.save({"model": sd}, storage_writer=bt.writer_for("tensorstore" if c.startswith("tensorstore") else c, path),
             planner=planner)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--loads", type=int, default=11)
    ap.add_argument("--save-each", action="store_true", help="save that contender again before each load")
    ap.add_argument("--no-zero", action="store_true",
                    help="load into the tensors as the previous load left them (default: zeroed before each load)")
    ap.add_argument("--contenders", default="tensorstore,dcp_ext",
                    help=f"comma-separated subset of {','.join(CONTENDERS)} (dcp_ext is always included)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args(argv)
    names = args.contenders.split(",")
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    contenders = [c for c in CONTENDERS if c in names or c == "dcp_ext"]
    sd = bt.make_state(args.hidden, args.layers, getattr(torch, args.dtype))
    base = tempfile.mkdtemp(prefix="bench_ts_loads_", dir=args.dir)
    print(f"{bt.nbytes(sd) / 2**20:.0f} MiB {args.dtype}, hidden {args.hidden}, {args.layers} layers, under {base}; "
          f"load average {[round(x, 2) for x in os.getloadavg()]}")
    try:
        for c in contenders:
            save(c, sd, os.path.join(base, c))
        out = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}}
        times: dict[str, list[tuple[float, float]]] = {c: [] for c in contenders}
        for _ in range(args.loads):
            for c in contenders:
                path = os.path.join(base, c)
                if args.save_each:
                    save(c, sd, path)
                reader = bt.reader_for("tensorstore" if c.startswith("tensorstore") else c, path)
                cpu, t = time.process_time(), time.perf_counter()
                dcp.load(out, storage_reader=reader, planner=ReshardLoadPlanner(ParallelLayout(rules=bt.RULES)))
                times[c].append((time.perf_counter() - t, time.process_time() - cpu))
                assert all(torch.equal(out["model"][k], v) for k, v in sd.items()), f"{c}: loaded values differ"
                if not args.no_zero:
                    for v in out["model"].values():
                        v.zero_()
        wall = {c: statistics.median(w for w, _ in ts) for c, ts in times.items()}
        cpu = {c: statistics.median(p for _, p in ts) for c, ts in times.items()}
        for c in contenders:
            print(f"{c:20s} load {wall[c]:.3f} s (CPU {cpu[c]:.3f} s): {wall['dcp_ext'] / wall[c]:.2f}x dcp_ext "
                  f"(CPU {cpu['dcp_ext'] / cpu[c]:.2f}x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average after: {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
