"""Peak memory and throughput of ``dcp-ext convert`` (export to safetensors, import back).

Writes a checkpoint of ``--size`` bytes (fp32 tensors, the largest ``--largest`` bytes) with
dcp-ext, then in a fresh process per direction measures the peak resident memory *growth* of the
conversion (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the resident size
just before) next to the largest tensor. Goal: growth <= largest tensor + 256 MiB.

    python benchmarks/bench_convert.py --size 2GiB --largest 256MiB [--dir /tmp/x] [--json]

Report ``cat /proc/loadavg`` with the figures (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(direction: str, src: str, out: str) -> None:
    """Run one conversion and print its memory figures as JSON (in a process of its own)."""
    import torch  # noqa: F401 - imported before the baseline, as in real use

    import dcp_ext

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if direction == "export":
        rep = dcp_ext.export_checkpoint(src, out, max_shard_size="1GiB")
    else:
        rep = dcp_ext.import_checkpoint(src, out, fmt="safetensors")
    dt = time.perf_counter() - t0
    print(json.dumps({"direction": direction, "peak_growth": _status("VmHWM") - base, "baseline": base,
                      "largest": rep.largest_tensor, "bytes": rep.bytes, "seconds": dt,
                      "files": len(rep.files)}))


def make_checkpoint(path: str, size: int, largest: int) -> None:
    import warnings

    import torch

    import dcp_ext
    import torch.distributed.checkpoint as dcp

    n_large = largest // 4
    state, left, i = {}, size, 0
    while left > 0:
        n = min(n_large if i == 0 else max(n_large // 4, 1), left // 4 or 1)
        state[f"layers.{i}.weight"] = torch.full((n,), float(i))
        left -= n * 4
        i += 1
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    dcp.save(state, storage_writer=dcp_ext.storage_writer(path))


def _parse_size(s: str) -> int:
    sys.path.insert(0, ROOT)
    from dcp_ext.config import parse_size

    return parse_size(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--largest", default="256MiB")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--plot", default="", help="write a PNG of the table here (needs matplotlib)")
    ap.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        ck, st, back = (os.path.join(work, n) for n in ("ckpt", "st", "back"))
        for p in (ck, st, back):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        f"from benchmarks.bench_convert import make_checkpoint; "
                        f"make_checkpoint({ck!r}, {_parse_size(args.size)}, {_parse_size(args.largest)})"],
                       check=True, env=env)
        results = []
        for direction, src, out in (("export", ck, st), ("import", st, back)):
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", direction, src, out],
                               check=True, env=env, capture_output=True, text=True)
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        doc = {"size": _parse_size(args.size), "loadavg": load, "results": results}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
        if args.plot:
            plot(doc, args.plot)  # before the JSON line, which --json prints last
        if args.json:
            print(json.dumps(doc))
        else:
            for r in results:
                print(f"{r['direction']:6s}: {r['bytes'] / 2**20:8.1f} MiB in {r['seconds']:.2f}s; peak RSS growth "
                      f"{r['peak_growth'] / 2**20:.1f} MiB, largest tensor {r['largest'] / 2**20:.1f} MiB "
                      f"(growth - largest = {(r['peak_growth'] - r['largest']) / 2**20:.1f} MiB)")
            print(f"load average: {' '.join(load)}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def plot(doc: dict, path: str) -> None:
    """Peak RSS growth per direction next to the largest tensor and the goal (largest + 256 MiB)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import bar_chart

    res = doc["results"]
    largest = max(r["largest"] for r in res) / 2**20
    bar_chart(path, f"dcp-ext convert of {doc['size'] / 2**30:.2f} GiB: peak RSS growth (lower is better)",
              [f"{r['direction']} ({r['seconds']:.1f} s)" for r in res],
              {"peak RSS growth": [r["peak_growth"] / 2**20 for r in res],
               "largest tensor": [r["largest"] / 2**20 for r in res]}, "MiB",
              f"load average {' '.join(doc['loadavg'])}", hline=largest + 256,
              hline_label=f"goal: largest tensor + 256 MiB = {largest + 256:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
