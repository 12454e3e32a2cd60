"""How long training is blocked when a GPU-resident state is checkpointed asynchronously,
against a bare device-to-host copy of the same bytes. Needs a CUDA device.

Configs, measured interleaved (round-robin; round 0 discarded as warm-up), median over
``--rounds``; every timing starts and ends with the GPU idle (``torch.cuda.synchronize``):

* ``bare_pinned``      ``copy_(non_blocking=True)`` of every tensor into preallocated pinned
                       host buffers, then a synchronize: the floor for a D2H copy
* ``bare_pageable``    the same into preallocated pageable buffers (synchronous copies)
* ``pooled_stage``     ``PooledStager.stage(state)`` alone (2nd and later calls: the pool is
                       reused; page-locked with ``cudaHostRegister``)
* ``pooled_async``     ``dcp_ext.async_save(state, async_stager=PooledStager())`` until it
                       returns (what a training loop waits for)
* ``stock_async``      ``dcp.async_save(state, storage_writer=FileSystemWriter(...))``: stock
                       staging (a fresh CPU copy per save)

Uploads go to ``FileSystemWriter`` / ``dcp_ext.storage_writer`` under ``--dir`` (default
/dev/shm) and are waited for (outside the timing) before the next round. The staged copy is
checked against the GPU tensors once per config.

    python benchmarks/bench_cuda_staging.py                 # 1 GiB state, 7 rounds
    python benchmarks/bench_cuda_staging.py --gib 4 --rounds 9 --out bench_out/cuda_staging.json
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
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcp_ext  # noqa: E402
from dcp_ext.staging import PooledStager  # noqa: E402

CONFIGS = ["bare_pinned", "bare_pageable", "pooled_stage", "pooled_async", "stock_async"]


def make_state(gib: float, n_tensors: int, dtype: torch.dtype) -> dict[str, Any]:
    """A model-like state on the GPU: ``n_tensors`` tensors of mixed sizes, about ``gib`` GiB."""
    total = int(gib * (1 << 30))
    weights = [1 + (i % 7) for i in range(n_tensors)]
    g = torch.Generator(device="cuda").manual_seed(0)
    sd: dict[str, Any] = {"step": 100}
    for i, w in enumerate(weights):
        numel = max(1, total * w // sum(weights) // dtype.itemsize)
        sd[f"layer{i}.weight"] = torch.randn(numel, generator=g, device="cuda").to(dtype)
    return sd


def state_bytes(sd: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


class Runner:
    """One callable per config; each returns the blocking seconds of one checkpoint."""

    def __init__(self, state: dict[str, Any], root: str):
        self.state, self.root, self.n = state, root, 0
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
        self.pageable = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in tensors.items()}
        self.stager = PooledStager()
        self.async_stager = PooledStager()
        self.pending: Any = None

    def _dir(self) -> str:
        self.n += 1
        return os.path.join(self.root, f"ck{self.n}")

    def _timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        t = time.perf_counter() - t0
        torch.cuda.synchronize()
        return t, out

    def bare_pinned(self) -> float:
        def copy():
            for k, v in self.pinned.items():
                v.copy_(self.state[k], non_blocking=True)
            torch.cuda.synchronize()
        return self._timed(copy)[0]

    def bare_pageable(self) -> float:
        def copy():
            for k, v in self.pageable.items():
                v.copy_(self.state[k])
        return self._timed(copy)[0]

    def pooled_stage(self) -> float:
        t, staged = self._timed(lambda: self.stager.stage(self.state))
        del staged  # the untracked lease ends once nothing references the staged tensors
        return t

    def pooled_async(self) -> float:
        path = self._dir()
        t, fut = self._timed(lambda: dcp_ext.async_save(self.state, async_stager=self.async_stager, no_dist=True,
                                                        storage_writer=dcp_ext.storage_writer(path)))
        fut.result()
        shutil.rmtree(path, ignore_errors=True)
        return t

    def stock_async(self) -> float:
        path = self._dir()
        t, fut = self._timed(lambda: dcp.async_save(self.state, storage_writer=FileSystemWriter(path),
                                                    no_dist=True))
        fut.result()
        shutil.rmtree(path, ignore_errors=True)
        return t

    def check(self) -> list[str]:
        """Configs whose copy differs from the GPU tensors (checked once, outside the timing)."""
        bad = []
        staged = self.stager.stage(self.state)
        for k, v in self.state.items():
            if isinstance(v, torch.Tensor):
                ref = v.cpu()
                if not torch.equal(staged[k], ref):
                    bad.append(f"pooled_stage:{k}")
                if not torch.equal(self.pinned[k], ref) or not torch.equal(self.pageable[k], ref):
                    bad.append(f"bare:{k}")
        del staged
        if not self.stager._pools[0].pinned:
            bad.append("pooled_stage: pool not page-locked")
        return bad

    def close(self) -> None:
        self.stager.close()
        self.async_stager.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--tensors", type=int, default=64, help="number of tensors (default 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up (default 7)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where uploads go (default /dev/shm)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_staging.py needs a CUDA device, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run it on a GPU machine:\n"
              "    python benchmarks/bench_cuda_staging.py", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")

    state = make_state(args.gib, args.tensors, getattr(torch, args.dtype))
    nbytes = state_bytes(state)
    root = tempfile.mkdtemp(prefix="dcp_ext_bench_cuda_", dir=args.dir)
    runner = Runner(state, root)
    times: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for r in range(args.rounds + 1):
            for c in configs:
                t = getattr(runner, c)()
                if r > 0:
                    times[c].append(t)
        bad = runner.check()
    finally:
        runner.close()
        shutil.rmtree(root, ignore_errors=True)

    floor = statistics.median(times["bare_pinned"]) if "bare_pinned" in times else None
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
          f"load average {' '.join(load)}")
    print(f"state: {nbytes / 2**30:.2f} GiB in {args.tensors} {args.dtype} tensors; median of {args.rounds} "
          f"rounds (after 1 warm-up)\n")
    print(f"{'config':<16}{'blocking ms':>12}{'GB/s':>8}{'x bare pinned':>15}")
    results = {}
    for c in configs:
        med = statistics.median(times[c])
        results[c] = {"median_s": med, "all_s": times[c], "gb_per_s": nbytes / med / 1e9}
        ratio = f"{med / floor:.2f}x" if floor else "-"
        print(f"{c:<16}{med * 1e3:>12.1f}{nbytes / med / 1e9:>8.2f}{ratio:>15}")
    print("\ncopies checked against the GPU tensors: " + ("OK" if not bad else f"MISMATCH {bad}"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bytes": nbytes,
                       "rounds": args.rounds, "load_average": load, "results": results, "mismatches": bad}, f,
                      indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
