"""Benchmark the resharding planners.

1. Load time of a resharded load vs a same-layout load of the *same* checkpoint (4 gloo ranks,
   on tmpfs, interleaved repetitions, median; ratio reported), with stock FileSystemReader and
   with dcp_ext's reader (ranged reads; checksum verification on and off).
2. Bytes per rank: bytes the planner asks for (sum of read-item lengths) vs the bytes the rank's
   tensors need, bytes the stock FileSystemReader actually reads (it loads whole stored items)
   and bytes dcp_ext's reader fetches.
3. Planning cost at scale, simulated in one process: the coordinator's global save plan for
   R ranks x T tensors per rank (R = 64, 256, 1024), our byte-balanced dedup vs stock
   ``dedup_save_plans`` on the same local plans, and one rank's local load plan against the
   resulting metadata.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_reshard.py            # full size
    PYTHONPATH=$PWD python benchmarks/bench_reshard.py --quick    # small, for development

Writes ``bench_out/bench_reshard.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402

from dcp_ext.layout import ParallelLayout, ShardSpec  # noqa: E402
from dcp_ext.planner import ReshardLoadPlanner, ReshardSavePlanner  # noqa: E402

logger = logging.getLogger("bench_reshard")


# ------------------------------------------------------------------ 1+2: load time and bytes


class CountingReader(FileSystemReader):
    """Stock FileSystemReader that counts bytes requested by the plan and bytes it reads."""

    def read_data(self, plan, planner):  # type: ignore[override]
        needed = 0
        read = 0
        md = self.storage_data
        for it in plan.items:
            info = md[it.storage_index]
            read += info.length  # the stock reader loads the whole stored item for every request
            if it.type.name == "TENSOR":
                tmd = planner.metadata.state_dict_metadata[it.storage_index.fqn]
                needed += math.prod(it.lengths) * tmd.properties.dtype.itemsize
        self.stats = {"bytes_requested": needed, "bytes_read": read}
        return super().read_data(plan, planner)


def _bench_cfg(scale: int):
    from tests import megatron_gpt as mg

    return mg.Cfg(vocab=1024 * scale, hidden=256 * scale, n_heads=8, n_kv=4, head_dim=32 * scale,
                  ffn=1024 * scale, n_layers=4)


#: readers compared: stock FileSystemReader on a stock-written checkpoint, dcp_ext's reader on a
#: dcp_ext-written one (same model, same planner), with and without checksum verification
READERS = ("stock", "dcp_ext", "dcp_ext verify=False")


def rank_save(path: str, scale: int, topo_args: tuple, writer: str = "stock") -> None:
    import torch.distributed as dist

    import dcp_ext
    from tests import megatron_gpt as mg

    cfg = _bench_cfg(scale)
    topo = mg.Topo(*topo_args)
    rank = dist.get_rank()
    params = mg.local_params(topo, rank, mg.full_params(0, cfg), cfg)
    w = FileSystemWriter(path) if writer == "stock" else dcp_ext.storage_writer(path)
    dcp.save({"model": params}, storage_writer=w, planner=ReshardSavePlanner(topo.layout(rank, cfg)))


def rank_load(path: str, scale: int, topo_args: tuple, reader_name: str = "stock") -> dict:
    import torch.distributed as dist

    import dcp_ext
    from tests import megatron_gpt as mg

    cfg = _bench_cfg(scale)
    topo = mg.Topo(*topo_args)
    rank = dist.get_rank()
    full = mg.full_params(0, cfg)
    expect = mg.local_params(topo, rank, full, cfg)
    sd = {"model": {k: torch.empty_like(v) for k, v in expect.items()}}
    local_bytes = sum(v.numel() * v.element_size() for v in sd["model"].values())
    if reader_name == "stock":
        reader = CountingReader(path)
    else:
        reader = dcp_ext.storage_reader(path, verify=reader_name == "dcp_ext")
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(sd, storage_reader=reader, planner=ReshardLoadPlanner(topo.layout(rank, cfg)))
    dist.barrier()
    seconds = time.perf_counter() - t0
    assert all(torch.equal(sd["model"][k], v) for k, v in expect.items()), "loaded tensors differ"
    if reader_name == "stock":
        stats = reader.stats
    else:
        stats = {"bytes_requested": reader.stats.bytes_needed, "bytes_read": reader.stats.bytes_read}
    return {"seconds": seconds, "local_bytes": local_bytes, **stats}


def bench_load(scale: int, reps: int, root: str) -> dict:
    from dcp_ext.testing import RankPool
    from tests import megatron_gpt as mg

    saved = mg.Topo(2, 1, 2)
    targets = {"same 2x1x2": mg.Topo(2, 1, 2), "reshard 4x1x1": mg.Topo(4, 1, 1),
               "reshard 1x2x2": mg.Topo(1, 2, 2), "reshard 2x2x1": mg.Topo(2, 2, 1)}
    paths = {"stock": os.path.join(root, "ckpt-stock"), "dcp_ext": os.path.join(root, "ckpt-dcp_ext")}
    out: dict = {"saved_layout": saved.name, "scale": scale, "reps": reps}
    with RankPool(4, env={"DCP_EXT_TEST_THREADS": "1"}) as pool:
        for writer, path in paths.items():
            pool.run(rank_save, path, scale, (saved.tp, saved.pp, saved.dp), writer)
        path = paths["stock"]
        total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
        out["checkpoint_bytes"] = total
        times: dict[tuple[str, str], list[float]] = {(r, k): [] for r in READERS for k in targets}
        stats: dict[tuple[str, str], list[dict]] = {}
        for _ in range(reps):  # interleaved
            for name, t in targets.items():
                for rd in READERS:
                    p = paths["stock" if rd == "stock" else "dcp_ext"]
                    res = pool.run(rank_load, p, scale, (t.tp, t.pp, t.dp, t.stages), rd)
                    times[(rd, name)].append(res[0]["seconds"])
                    stats[(rd, name)] = res
    out["readers"] = {}
    for rd in READERS:
        same = statistics.median(times[(rd, "same 2x1x2")])
        loads = out["readers"][rd] = {}
        for name in targets:
            ts, per_rank = times[(rd, name)], stats[(rd, name)]
            loads[name] = {
                "median_s": statistics.median(ts),
                "needed_bytes_per_rank": [r["local_bytes"] for r in per_rank],
                "all_s": ts,
                "ratio_vs_same_layout": statistics.median(ts) / same,
                "requested_over_needed": [r["bytes_requested"] / r["local_bytes"] for r in per_rank],
                "read_over_needed": [r["bytes_read"] / r["local_bytes"] for r in per_rank],
            }
    out["loads"] = out["readers"]["stock"]  # (key kept for older readers of the JSON)
    return out


# ------------------------------------------------------------------ 3: planning at scale


def _layout_for(n_ranks: int) -> tuple[int, int, int]:
    return {64: (4, 4, 4), 256: (8, 4, 8), 1024: (8, 8, 16)}.get(n_ranks) or (1, 1, n_ranks)


def _rank_state(tp: int, tp_rank: int, layers: int, hidden: int = 64) -> dict[str, torch.Tensor]:
    """10 tensors per layer (fused QKV weight/bias, gate/up, norms...), shapes only (no memory)."""
    H, qkv = hidden, (hidden, hidden // 2, hidden // 2)
    sd = {}
    z = torch.zeros(1)
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "attn_norm.weight"] = z.expand(H)
        sd[p + "attn.qkv.weight"] = z.expand(sum(qkv) // tp, H)
        sd[p + "attn.qkv.bias"] = z.expand(sum(qkv) // tp)
        sd[p + "attn.proj.weight"] = z.expand(H, H // tp)
        sd[p + "attn.proj.bias"] = z.expand(H)
        sd[p + "mlp_norm.weight"] = z.expand(H)
        sd[p + "mlp.gate_up.weight"] = z.expand(8 * H // tp, H)
        sd[p + "mlp.down.weight"] = z.expand(H, 4 * H // tp)
        sd[p + "mlp.down.bias"] = z.expand(H)
        sd[p + "mlp.scale"] = z.expand(4 * H // tp)
    return sd


def _rules(hidden: int = 64) -> dict[str, ShardSpec]:
    qkv = (hidden, hidden // 2, hidden // 2)
    return {"*.qkv.weight": ShardSpec(0, qkv), "*.qkv.bias": ShardSpec(0, qkv), "*.proj.weight": ShardSpec(1),
            "*.gate_up.weight": ShardSpec(0, (4 * hidden, 4 * hidden)), "*.down.weight": ShardSpec(1),
            "*.mlp.scale": ShardSpec(0)}


def bench_planning(n_ranks: int, tensors_per_rank: int) -> dict:
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans

    tp, pp, dp = _layout_for(n_ranks)
    layers = tensors_per_rank // 10
    rules = _rules()
    # local plans: one per (tp, pp) coordinate, pickled as the coordinator would receive them
    t0 = time.perf_counter()
    unique: dict[tuple[int, int], bytes] = {}
    for p in range(pp):
        for t in range(tp):
            lay = ParallelLayout(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, dp_size=dp, rules=rules,
                                 layer_offset=p * layers)
            planner = ReshardSavePlanner(lay)
            planner.set_up_planner(_rank_state(tp, t, layers), is_coordinator=False)
            unique[(t, p)] = pickle.dumps(planner.create_local_plan())
    local_plan_s = (time.perf_counter() - t0) / len(unique)
    # every rank's plan as the coordinator sees it (unpickled, distinct objects); DP replicas share (tp, pp)
    import gc

    all_plans = []
    gc.disable()  # the simulation's own unpickling; with GC on it takes ~10x longer (see docs)
    t0 = time.perf_counter()
    for r in range(n_ranks):
        t, d, p = r % tp, (r // tp) % dp, r // (tp * dp)
        all_plans.append(pickle.loads(unique[(t, p)]))
    unpickle_s = time.perf_counter() - t0
    gc.enable()
    n_items = sum(len(p.items) for p in all_plans)
    coord = ReshardSavePlanner(ParallelLayout())
    t0 = time.perf_counter()
    global_plan, metadata = coord.create_global_plan(all_plans)
    global_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dedup_save_plans(all_plans)
    stock_dedup_s = time.perf_counter() - t0
    from dcp_ext.planner import dedup_by_bytes

    t0 = time.perf_counter()
    dedup_by_bytes(all_plans)
    our_dedup_s = time.perf_counter() - t0
    kept = [sum(it.tensor_storage_size() or 0 for it in p.items) for p in global_plan]
    n_unique = sum(len(p.items) for p in global_plan)
    del global_plan
    del all_plans
    gc.collect()
    caching = bench_plan_caching(n_ranks, unique, tp, pp, dp, layers, rules)
    all_plans = None
    # one rank's local LOAD plan against this metadata, at a different TP (reshard)
    lay = ParallelLayout(tp_rank=1, tp_size=max(1, tp // 2), pp_rank=0, pp_size=pp, rules=rules)
    lp = ReshardLoadPlanner(lay)
    gc.collect()
    gc.freeze()  # a real rank does not carry the coordinator's million plan objects in its heap
    t0 = time.perf_counter()
    lp.set_up_planner(_rank_state(max(1, tp // 2), 1, layers), metadata, is_coordinator=False)
    lp.create_local_plan()
    load_local_s = time.perf_counter() - t0
    gc.unfreeze()
    return {
        "ranks": n_ranks, "tp_pp_dp": [tp, pp, dp], "tensors_per_rank": tensors_per_rank,
        "write_items_in": n_items, "unique_chunks": n_unique,
        "local_save_plan_s": local_plan_s, "unpickle_all_local_plans_gc_off_s": unpickle_s, "global_save_plan_s": global_s,
        "our_dedup_s": our_dedup_s, "stock_dedup_save_plans_s": stock_dedup_s,
        "bytes_per_rank_max_over_mean": max(kept) / (sum(kept) / len(kept)),
        "local_load_plan_s": load_local_s,
        **caching,
    }


def _save_planning_round(n_ranks: int, sent: list[bytes], coord: ReshardSavePlanner) -> tuple[float, int]:
    """The coordinator's part of one save's planning, as DCP runs it: unpickle every rank's
    gathered local plan, build the global plan (stock's ``create_global_plan``, with the cache
    when enabled), pickle each rank's part for the scatter. Returns (seconds, scattered bytes)."""
    import gc

    gc.disable()  # as in the gather above: the simulation's own unpickling
    try:
        t0 = time.perf_counter()
        plans = [pickle.loads(b) for b in sent]
        delta, _md = coord.create_global_plan(plans)
        scattered = [pickle.dumps(p) for p in delta]
        return time.perf_counter() - t0, max(len(b) for b in scattered)
    finally:
        gc.enable()


def bench_plan_caching(n_ranks: int, unique: dict, tp: int, pp: int, dp: int, layers: int, rules: dict) -> dict:
    """First vs repeat save planning with ``ReshardSavePlanner(enable_plan_caching=True)``.

    Planning time on the critical path = one rank's local plan (ranks plan in parallel) + the
    coordinator's gather (unpickling), global plan and scatter (pickling) + one rank's
    ``finish_plan``. The repeat save has the same structure: every rank's local plan equals its
    cached one, so it sends an empty plan and the coordinator reuses the cached global plan.
    (The stock cache is class-level: one process holds the coordinator's caches and rank 0's.)
    """
    import gc

    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

    key = ReshardSavePlanner.__name__
    for d in (SavePlanner._cached_save_plan, SavePlanner._cached_final_save_plan, SavePlanner._cached_all_plans,
              SavePlanner._cached_global_plan, SavePlanner._cached_metadata):
        d.pop(key, None)

    def rank0_planner() -> ReshardSavePlanner:
        lay = ParallelLayout(tp_rank=0, tp_size=tp, pp_rank=0, pp_size=pp, dp_size=dp, rules=rules, layer_offset=0)
        pl = ReshardSavePlanner(lay, enable_plan_caching=True)
        pl.set_up_planner(_rank_state(tp, 0, layers), is_coordinator=True)
        return pl

    out: dict = {}
    coord = ReshardSavePlanner(ParallelLayout(), enable_plan_caching=True)
    for phase in ("first", "repeat"):
        if phase == "repeat":
            # between two saves the first save's writes and training ran: the garbage collector
            # has long since walked the first plan's objects (the cached plans stay alive)
            gc.collect()
        r0 = rank0_planner()
        t0 = time.perf_counter()
        own = pickle.dumps(r0.create_local_plan())
        local_s = time.perf_counter() - t0
        if phase == "first":
            sent = [unique[(r % tp, r // (tp * dp))] for r in range(n_ranks)]
            sent[0] = own
        else:
            sent = [own] * n_ranks  # every rank's plan is unchanged: all send the same empty plan
        coord_s, scattered = _save_planning_round(n_ranks, sent, coord)
        t0 = time.perf_counter()
        delta0 = coord.global_plan[0] if phase == "first" else pickle.loads(pickle.dumps(SavePlan([], usable=False)))
        final = r0.finish_plan(delta0)
        finish_s = time.perf_counter() - t0
        assert final.items, "rank 0 has items to write"
        out[f"{phase}_save_planning_s"] = local_s + coord_s + finish_s
        out[f"{phase}_local_plan_s"] = local_s
        out[f"{phase}_coordinator_s"] = coord_s
        out[f"{phase}_gathered_bytes_per_rank_max"] = max(len(b) for b in sent)
        out[f"{phase}_scattered_bytes_per_rank_max"] = scattered
    for d in (SavePlanner._cached_save_plan, SavePlanner._cached_final_save_plan, SavePlanner._cached_all_plans,
              SavePlanner._cached_global_plan, SavePlanner._cached_metadata):
        d.pop(key, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for development")
    ap.add_argument("--ranks", type=int, nargs="*", help="rank counts for the planning part")
    ap.add_argument("--skip-load", action="store_true", help="only the planning part")
    ap.add_argument("--skip-planning", action="store_true", help="only the load part")
    ap.add_argument("--reps", type=int, help="load repetitions (default 7, quick 3)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_reshard.json"))
    ap.add_argument("--plot", default="", help="write a PNG of the first vs repeat save planning table here")
    ap.add_argument("--plot-load", default="", help="write a PNG of the resharded-load table (all readers) here")
    ap.add_argument("--plot-scale", default="", help="write a PNG of the planning-at-scale table here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scale, reps = (1, 3) if args.quick else (2, 7)
    reps = args.reps or reps
    ranks_list = args.ranks or ([64, 256] if args.quick else [64, 256, 1024])
    tensors = 200 if args.quick else 1000
    result: dict = {"torch": torch.__version__, "cpus": os.cpu_count(), "loadavg_before": list(os.getloadavg())}
    root = tempfile.mkdtemp(prefix="bench_reshard_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        if not args.skip_load:
            result["load"] = bench_load(scale, reps, root)
            for rd, loads in result["load"]["readers"].items():
                for name, r in loads.items():
                    logger.info("load %-22s %-14s median %.3f s  %.2fx same layout  read/needed max %.3f  "
                                "requested/needed max %.3f", rd, name, r["median_s"], r["ratio_vs_same_layout"],
                                max(r["read_over_needed"]), max(r["requested_over_needed"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["planning"] = []
    for n in ([] if args.skip_planning else ranks_list):
        r = bench_planning(n, tensors)
        logger.info("planning: %s", r)
        result["planning"].append(r)
    if args.skip_load and os.path.exists(args.out):  # keep the load figures of an earlier full run
        with open(args.out) as f:
            prev = json.load(f)
        if "load" in prev:
            result["load"] = prev["load"]
    if args.skip_planning and os.path.exists(args.out):
        with open(args.out) as f:
            result["planning"] = json.load(f).get("planning", [])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.plot, args.plot_load, args.plot_scale)
    logger.info("wrote %s", args.out)


def plot(result: dict, repeat_path: str, load_path: str, scale_path: str) -> None:
    """One PNG per table of ``docs/benchmarks.md`` (each only when its path is given and its part ran)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import Panel, bar_chart, chart, loadavg_note

    note = loadavg_note(result.get("loadavg_before"))
    pl = [r for r in result.get("planning", []) if "repeat_save_planning_s" in r]
    if repeat_path and pl:
        bar_chart(repeat_path, "Save planning, first vs repeat save (plan caching; lower is better)",
                  [f"{r['ranks']} ranks" for r in pl],
                  {"first save": [r["first_save_planning_s"] for r in pl],
                   "repeat save": [r["repeat_save_planning_s"] for r in pl],
                   "stock dedup_save_plans alone": [r["stock_dedup_save_plans_s"] for r in pl]},
                  "seconds", note, hline=0.2, hline_label="goal for repeat saves: 0.2 s")
    if scale_path and result.get("planning"):
        pl = result["planning"]
        cats = [f"{r['ranks']} ranks ({'x'.join(map(str, r['tp_pp_dp']))})" for r in pl]
        chart(scale_path, "Planning at scale (one process simulates the coordinator; lower is better)", [
            Panel(cats, {"global save plan": [r["global_save_plan_s"] for r in pl],
                         "our dedup alone": [r["our_dedup_s"] for r in pl],
                         "stock dedup_save_plans": [r["stock_dedup_save_plans_s"] for r in pl],
                         "local save plan (1 rank)": [r["local_save_plan_s"] for r in pl],
                         "local load plan (1 rank)": [r["local_load_plan_s"] for r in pl]},
                  "seconds (log scale)", logy=True)], note)
    if load_path and result.get("load", {}).get("readers"):
        readers = result["load"]["readers"]
        targets = [t for t in next(iter(readers.values())) if not t.startswith("same")]
        cats = [t.removeprefix("reshard ") for t in targets]
        same = {rd: loads[next(t for t in loads if t.startswith("same"))]["median_s"] for rd, loads in readers.items()}
        chart(load_path, f"Resharded loads of a checkpoint saved at {result['load']['saved_layout']} (4 ranks)", [
            Panel(cats, {f"{rd} (same layout {same[rd]:.2f} s)": [loads[t]["ratio_vs_same_layout"] for t in targets]
                         for rd, loads in readers.items()},
                  "load time / same-layout load", "time vs the same-layout load (lower is better)",
                  hline=1.1, hline_label="goal: <= 1.1x"),
            Panel(cats, {rd: [max(loads[t]["read_over_needed"]) for t in targets] for rd, loads in readers.items()},
                  "bytes read / bytes needed (max over ranks)", "bytes read vs needed (lower is better)",
                  hline=1.05, hline_label="goal: <= 1.05"),
        ], f"medians of {result['load']['reps']} interleaved repetitions; {note}")


if __name__ == "__main__":
    main()
