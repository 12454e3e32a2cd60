"""Compression, side by side in one run (issue 17): dcp-ext uncompressed, dcp-ext
``compression="zstd"`` (per-block frames, ranged reads kept), the same with
``compression_shuffle=True`` (bytes grouped by position in the element first) and stock DCP's
``ZStandard()`` extension (one stream per item).

The state is real-looking: a small GPT (``dcp_ext.demo.TinyGPT``, scaled to ``--size-mib``)
trained for a few AdamW steps on random tokens; saved as bf16 weights, fp32 Adam moments, int64
step counters and an int64 data-sampler permutation.

Measured, interleaved round-robin over ``--rounds`` rounds (median; the order rotates):

1. size ratio (state bytes / stored bytes) and save/load throughput on tmpfs (``/dev/shm``);
2. the same through the S3 test server behind the fault proxy with its bandwidth limited to
   ``--bandwidth-mib`` MiB/s each way (a token bucket: a remote store's link, without ``tc``);
3. bytes read by a 1 -> 4 rank resharded load (row shards of every tensor, 4 gloo ranks) of
   the compressed checkpoints: ours (only the frames of the blocks each rank needs) vs stock's
   ``ZStandard`` read by stock ``FileSystemReader`` (every needed item whole).

    PYTHONPATH=$PWD python benchmarks/bench_compression.py --quick          # smoke run
    PYTHONPATH=$PWD python benchmarks/bench_compression.py --size-mib 256 --rounds 3

Writes ``bench_out/bench_compression.json`` and prints markdown tables (with the load average:
client, server and proxy share this machine's cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402

import dcp_ext  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MiB = 1024 * 1024
VOCAB = 4096


# ------------------------------------------------------------------------------------- state
def model_dims(size_mib: float) -> tuple[int, int]:
    """(d, layers) of a 2-layer TinyGPT whose saved state (bf16 weights + 2 fp32 moments: ~10
    bytes per parameter) is about ``size_mib``: few, wide layers, so each tensor spans many
    checksum blocks, as in a real model."""
    params = size_mib * MiB / 10
    layers = 2
    a, b = 12 * layers, 2 * VOCAB + 64  # 12 d^2 per block; token + position embeddings and the head
    d = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return max(64, int(d) // 64 * 64), layers


def trained_state(size_mib: float, steps: int, seed: int = 0) -> dict:
    """A TinyGPT trained ``steps`` AdamW steps; its state as a real checkpoint holds it."""
    from dcp_ext.demo import TinyGPT

    d, layers = model_dims(size_mib)
    torch.manual_seed(seed)
    model = TinyGPT(vocab=VOCAB, d=d, layers=layers, heads=max(1, d // 64), ctx=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (4, 65), generator=g)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    state: dict = {f"model.{k}": v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        n = names[id(p)]
        state[f"optim.{n}.exp_avg"] = st["exp_avg"].clone()
        state[f"optim.{n}.exp_avg_sq"] = st["exp_avg_sq"].clone()
        state[f"optim.{n}.step"] = torch.tensor(int(st["step"]), dtype=torch.int64)
    samples = max(1024, int(size_mib * MiB * 0.02) // 8)  # a data sampler's shuffled order: 2% of the state
    state["data.sampler_perm"] = torch.randperm(samples, generator=g)
    return state


def kind_of(key: str, t: torch.Tensor) -> str:
    if key.endswith(".exp_avg"):
        return "fp32 exp_avg"
    if key.endswith(".exp_avg_sq"):
        return "fp32 exp_avg_sq"
    return "bf16 weights" if t.dtype == torch.bfloat16 else str(t.dtype).removeprefix("torch.")


def kind_ratios(state: dict, level: int = 3, block: int = MiB) -> dict:
    """Per kind of tensor: bytes and the zstd ratio of its 1 MiB blocks, plain and byte-shuffled
    (computed here with ``zstandard`` directly, for context)."""
    import zstandard

    from dcp_ext.storage.compression import shuffle

    c = zstandard.ZstdCompressor(level=level)
    out: dict = {}
    for k, v in state.items():
        mv = memoryview(v.contiguous().reshape(-1).view(torch.uint8).numpy())
        es = v.element_size()
        d = out.setdefault(kind_of(k, v), {"bytes": 0, "plain": 0, "shuffled": 0})
        for s in range(0, len(mv), block):
            piece = mv[s:s + block]
            d["bytes"] += len(piece)
            d["plain"] += len(c.compress(piece))
            d["shuffled"] += len(c.compress(memoryview(shuffle(piece, es)) if es > 1 else piece))
    return {k: {"bytes": d["bytes"], "ratio": d["bytes"] / d["plain"], "ratio_shuffled": d["bytes"] / d["shuffled"]}
            for k, d in out.items()}


def nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


# ------------------------------------------------------------------------------------ configs
CONFIGS = ("ours", "ours_zstd", "ours_zstd_shuffle", "stock_zstd")


def make_writer(cfg: str, url: str, threads: int, ours: dict, stock: dict | None):
    from torch.distributed.checkpoint._extension import ZStandard

    if cfg == "ours":
        return dcp_ext.storage_writer(url, io_threads=threads, **ours)
    if cfg.startswith("ours_zstd"):
        return dcp_ext.storage_writer(url, io_threads=threads, compression="zstd",
                                      compression_shuffle=cfg.endswith("shuffle"), **ours)
    if stock is None:
        return FileSystemWriter(url, thread_count=threads, _extensions=[ZStandard()])
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, thread_count=threads, _extensions=[ZStandard()], **stock)


def make_reader(cfg: str, url: str, threads: int, ours: dict, stock: dict | None):
    if cfg.startswith("ours"):
        return dcp_ext.storage_reader(url, io_threads=threads, **ours)
    if stock is None:
        return FileSystemReader(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **stock)


def stored_bytes(url: str, ours: dict) -> int:
    """Bytes of the data files at ``url`` (through our store: any backend)."""
    store = dcp_ext.storage_reader(url, **ours).store
    return sum(store.size(f) for f in store.list() if f.endswith(".distcp"))


def remove(url: str, ours: dict) -> None:
    store = dcp_ext.storage_reader(url, **ours).store
    store.remove(store.list())
    if "://" not in url:
        shutil.rmtree(url, ignore_errors=True)


def run_matrix(label: str, root: str, state: dict, rounds: int, threads: int, ours: dict,
               stock: dict | None) -> dict:
    size = nbytes(state)
    times = {c: {"save": [], "load": []} for c in CONFIGS}
    stored: dict[str, int] = {}
    target = {k: torch.empty_like(v) for k, v in state.items()}
    for rnd in range(rounds + 1):  # round 0 warms caches and connections: checked, not counted
        order = CONFIGS[rnd % len(CONFIGS):] + CONFIGS[:rnd % len(CONFIGS)]
        for c in order:
            url = f"{root}/{c}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            dcp.save(state, storage_writer=make_writer(c, url, threads, ours, stock))
            t1 = time.perf_counter()
            dcp.load(target, storage_reader=make_reader(c, url, threads, ours, stock))
            t2 = time.perf_counter()
            stored[c] = stored_bytes(url, ours)
            if rnd == 0:
                bad = [k for k, v in state.items() if not torch.equal(v, target[k])]
                if bad:
                    raise AssertionError(f"{label}/{c}: loaded tensors differ: {bad[:5]}")
            else:
                times[c]["save"].append(t1 - t0)
                times[c]["load"].append(t2 - t1)
            remove(url, ours)
            print(f"  {label} round {rnd} {c:11s} save {t1 - t0:6.2f}s  load {t2 - t1:6.2f}s  "
                  f"stored {stored[c] / MiB:7.1f} MiB", flush=True)
    out = {"bytes": size, "rounds": rounds, "configs": {}}
    for c in CONFIGS:
        s, ld = statistics.median(times[c]["save"]), statistics.median(times[c]["load"])
        out["configs"][c] = {"stored_bytes": stored[c], "ratio": size / stored[c], "save_s": s, "load_s": ld,
                             "save_mib_s": size / MiB / s, "load_mib_s": size / MiB / ld,
                             "save_all": times[c]["save"], "load_all": times[c]["load"]}
    return out


# ------------------------------------------------------------------- 1 -> 4 resharded load
class CountingReader(FileSystemReader):
    """Stock ``FileSystemReader`` that counts the stored bytes it reads (every needed item whole)."""

    def read_data(self, plan, planner):  # type: ignore[override]
        self.bytes_read = sum(self.storage_data[it.storage_index].length for it in plan.items)
        return super().read_data(plan, planner)


def rank_reshard_load(url: str, ref: str, reader_name: str) -> dict:
    """A rank of 4 loads its row shard of every tensor; exact check against the saved state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    full = torch.load(ref, mmap=True, weights_only=True)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ws, rank = dist.get_world_size(), dist.get_rank()
    target, want = {}, {}
    for k, v in full.items():
        if v.dim() == 0 or v.shape[0] < ws:
            continue
        local = v.chunk(ws, 0)[rank]
        want[k] = local
        target[k] = DTensor.from_local(torch.zeros_like(local), mesh, [Shard(0)], run_check=False,
                                       shape=v.shape, stride=v.stride())
    reader = CountingReader(url) if reader_name == "stock" else dcp_ext.storage_reader(url)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    seconds = time.perf_counter() - t0
    bad = [k for k in want if not torch.equal(target[k].to_local(), want[k])]
    if bad:
        raise AssertionError(f"rank {rank}: {reader_name} loaded wrong values for {bad[:5]}")
    needed = sum(w.numel() * w.element_size() for w in want.values())
    if reader_name == "stock":
        return {"seconds": seconds, "bytes_read": reader.bytes_read, "needed": needed}
    s = reader.stats
    return {"seconds": seconds, "bytes_read": s.bytes_read, "needed": needed, "stored_needed": s.stored_bytes_needed}


def run_reshard(root: str, state: dict, threads: int, blocks: list[str]) -> dict:
    import bench_compression as me  # by module name: the ranks import it from sys.path

    from dcp_ext.config import parse_size
    from dcp_ext.testing import RankPool

    flat = {k: v for k, v in state.items() if v.dim() > 0}
    ref = os.path.join(root, "reference.pt")
    torch.save(flat, ref)
    runs = {f"ours_zstd, {b} blocks": ("ours_zstd", {"checksum_block_size": parse_size(b)}) for b in blocks}
    runs["stock_zstd"] = ("stock_zstd", {})
    out: dict = {}
    with RankPool(4) as pool:
        for name, (cfg, opts) in runs.items():
            path = os.path.join(root, f"r-{uuid.uuid4().hex[:8]}")
            dcp.save(flat, storage_writer=make_writer(cfg, path, threads, opts, None))
            total = stored_bytes(path, {})
            res = pool.run(me.rank_reshard_load, path, ref, "ours" if cfg == "ours_zstd" else "stock", timeout=1800)
            read = [r["bytes_read"] for r in res]
            # what a rank needs, compressed: its share of every tensor's stored bytes
            share = [r.get("stored_needed", r["needed"] * total / nbytes(flat)) for r in res]
            out[name] = {"stored_bytes": total, "bytes_read_per_rank": read, "stored_needed_per_rank": share,
                         "read_over_needed_max": max(a / b for a, b in zip(read, share)),
                         "read_total_over_stored": sum(read) / total, "seconds": max(r["seconds"] for r in res)}
            shutil.rmtree(path, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ output
def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def print_tables(res: dict) -> None:
    print(f"\nstate: {res['state_bytes'] / MiB:.0f} MiB in {res['tensors']} tensors (TinyGPT d, layers = "
          f"{res['model_dims']}); load average before {res['loadavg_before']}, after {res['loadavg_after']}")
    print("| kind | MiB | zstd ratio (1 MiB blocks) | byte-shuffled |")
    print("|---|---|---|---|")
    for k, v in res["kinds"].items():
        print(f"| {k} | {v['bytes'] / MiB:.1f} | {v['ratio']:.3f} | {v['ratio_shuffled']:.3f} |")
    for where in ("tmpfs", "s3_limited"):
        if where not in res:
            continue
        r = res[where]
        extra = f", link {res['bandwidth_mib']} MiB/s each way" if where == "s3_limited" else ""
        print(f"\n{where}: median of {r['rounds']} interleaved rounds{extra}")
        print("| config | size ratio | save s | save MiB/s | load s | load MiB/s |")
        print("|---|---|---|---|---|---|")
        for c, v in r["configs"].items():
            print(f"| {c} | {v['ratio']:.3f} | {v['save_s']:.2f} | {v['save_mib_s']:.0f} | {v['load_s']:.2f} | "
                  f"{v['load_mib_s']:.0f} |")
    if "reshard" in res:
        print("\n1 -> 4 ranks, row shards: bytes read vs the compressed bytes each rank needs")
        print("| checkpoint | stored MiB | read per rank MiB | max read / needed | all ranks read / stored | load s |")
        print("|---|---|---|---|---|---|")
        for c, v in res["reshard"].items():
            per = ", ".join(f"{b / MiB:.1f}" for b in v["bytes_read_per_rank"])
            print(f"| {c} | {v['stored_bytes'] / MiB:.1f} | {per} | {v['read_over_needed_max']:.3f} | "
                  f"{v['read_total_over_stored']:.3f} | {v['seconds']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=256, help="state size (MiB)")
    ap.add_argument("--steps", type=int, default=10, help="training steps before saving")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=8, help="I/O threads (ours and stock)")
    ap.add_argument("--bandwidth-mib", type=float, default=50, help="S3 link each way (MiB/s)")
    ap.add_argument("--parts", default="tmpfs,s3,reshard", help="comma-separated: tmpfs, s3, reshard")
    ap.add_argument("--reshard-blocks", default="1MiB,128KiB",
                    help="checksum_block_size values (frame sizes) of the resharded-load runs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_compression.json"))
    ap.add_argument("--plot", default="", help="write one PNG per table: PATH with _kinds, _tmpfs, _s3, _reshard "
                    "before .png (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mib, args.steps, args.rounds = 8, 2, 1
    logging.basicConfig(level=logging.WARNING)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    res: dict = {"loadavg_before": load_average(), "size_mib": args.size_mib, "threads": args.threads,
                 "bandwidth_mib": args.bandwidth_mib, "torch": torch.__version__, "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    state = trained_state(args.size_mib, args.steps)
    res.update(state_bytes=nbytes(state), kinds=kind_ratios(state), tensors=len(state),
               model_dims=model_dims(args.size_mib))
    print(f"state: {nbytes(state) / MiB:.0f} MiB in {len(state)} tensors (trained {args.steps} steps in "
          f"{time.perf_counter() - t0:.0f}s); load average {res['loadavg_before']}", flush=True)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="dcp_ext_bench_compression_", dir=base)
    try:
        if "tmpfs" in parts:
            res["tmpfs"] = run_matrix("tmpfs", tmp, state, args.rounds, args.threads, {}, None)
        if "s3" in parts:
            from tests.support.fault_proxy import FaultProxy
            from tests.support.servers import S3TestServer

            with S3TestServer() as srv:
                host, port = srv.endpoint.split("//", 1)[1].rsplit(":", 1)
                with FaultProxy(host, int(port), bandwidth=args.bandwidth_mib * MiB) as proxy:
                    stock = {"key": srv.access_key, "secret": srv.secret_key,
                             "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": srv.region}}
                    res["s3_limited"] = run_matrix("s3", f"s3://{srv.bucket}/bench", state, args.rounds,
                                                   args.threads, srv.options(endpoint=proxy.endpoint), stock)
                    res["s3_limited"]["server"] = srv.kind
        if "reshard" in parts:
            res["reshard"] = run_reshard(tmp, state, args.threads, args.reshard_blocks.split(","))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_after"] = load_average()
    print_tables(res)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.out}")
    if args.plot:
        plot(res, args.plot)
    return 0


def plot(res: dict, path: str) -> None:
    """One PNG per table: ``PATH_kinds.png``, ``_tmpfs``, ``_s3``, ``_reshard`` (the parts that ran)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import Panel, chart

    def at(suffix: str) -> str:
        return path[:-4] + suffix + ".png" if path.endswith(".png") else path + suffix + ".png"

    note = (f"{res['state_bytes'] / MiB:.0f} MiB trained TinyGPT state; load average {res['loadavg_before']} -> "
            f"{res['loadavg_after']}")
    kinds = list(res["kinds"])
    chart(at("_kinds"), "What the state is made of: zstd level 3 ratio per kind (higher compresses better)",
          [Panel(kinds, {"zstd": [res["kinds"][k]["ratio"] for k in kinds],
                         "byte-shuffled + zstd": [res["kinds"][k]["ratio_shuffled"] for k in kinds]},
                 "state bytes / stored bytes")], note)
    for where, suffix, title in (("tmpfs", "_tmpfs", "tmpfs (CPU cost)"),
                                 ("s3_limited", "_s3", f"S3 through a {res['bandwidth_mib']:g} MiB/s link each way")):
        if where not in res:
            continue
        cfg = res[where]["configs"]
        names = list(cfg)
        base = cfg[names[0]]
        chart(at(suffix), f"Compression, {title}: median of {res[where]['rounds']} interleaved rounds", [
            Panel(["save", "load"], {n: [cfg[n]["save_mib_s"], cfg[n]["load_mib_s"]] for n in names},
                  "MiB/s of state", "throughput (higher is better)"),
            Panel(["save", "load"], {n: [cfg[n]["save_mib_s"] / base["save_mib_s"],
                                         cfg[n]["load_mib_s"] / base["load_mib_s"]] for n in names[1:]},
                  f"speed / {names[0]}'s", f"vs {names[0]} (higher is better)", hline=1.0,
                  hline_label=f"{names[0]} (level)", color_offset=1, logy=None),
        ], note)
    if "reshard" in res:
        rs = res["reshard"]
        names = list(rs)
        chart(at("_reshard"), "1 -> 4 ranks, resharded load of compressed checkpoints", [
            Panel(["max over ranks: read / needed", "all ranks: read / stored"],
                  {n: [rs[n]["read_over_needed_max"], rs[n]["read_total_over_stored"]] for n in names},
                  "ratio", "bytes read (lower is better)", hline=1.1, hline_label="goal: <= 1.1x needed"),
            Panel(["load"], {n: [rs[n]["seconds"]] for n in names}, "seconds", "load time (lower is better)"),
        ], note)


if __name__ == "__main__":
    sys.exit(main())
