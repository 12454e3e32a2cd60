"""Functions run on gloo ranks by tests/test_reshard.py (module-level so spawned ranks import them)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from dcp_ext.layout import GlobalPieces, ParallelLayout, Piece, ShardSpec
from dcp_ext.planner import ReshardLoadPlanner, ReshardSavePlanner

from . import megatron_gpt as mg
from . import reference as ref

IDS = torch.tensor([3, 17, 40, 60, 0, 25, 33, 8])  # token ids < mg.CFG.true_vocab
SEED = 1234


def state_for(topo: mg.Topo, rank: int, full: dict[str, torch.Tensor] | None = None) -> dict:
    """The state a rank saves: nested model params + non-tensor objects."""
    params = mg.local_params(topo, rank, full if full is not None else mg.full_params(SEED))
    return {"model": params, "step": 7, "extra": {"note": f"saved at {topo.name}"}}


_SINGLETONS: list = []


def singleton_group():
    """A gloo group holding only this rank (every rank creates all of them, in the same order), so a
    rank of a larger pool can save or load as a real one-rank job (world size 1)."""
    if not _SINGLETONS:
        _SINGLETONS.extend(dist.new_group([r]) for r in range(dist.get_world_size()))
    return _SINGLETONS[dist.get_rank()]


def save_topos(root: str, topos: list[mg.Topo]) -> list[str]:
    """Save the seeded model at every topology; world-size-1 topologies are saved by rank 0 alone
    on its one-rank group. Returns the paths."""
    rank = dist.get_rank()
    full = mg.full_params(SEED)
    paths = []
    group = singleton_group()
    for topo in topos:
        path = os.path.join(root, topo.name)
        if topo.world == 1:
            if rank == 0:
                dcp.save(state_for(topo, 0, full), storage_writer=FileSystemWriter(path),
                         planner=ReshardSavePlanner(topo.layout(0)), process_group=group)
            dist.barrier()
        else:
            sd = state_for(topo, rank, full)
            dcp.save(sd, storage_writer=FileSystemWriter(path), planner=ReshardSavePlanner(topo.layout(rank)))
        paths.append(path)
    return paths


def check_loaded(topo: mg.Topo, rank: int, params: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> list[str]:
    expect = mg.local_params(topo, rank, full)
    bad = [k for k in expect if not torch.equal(params[k], expect[k])]
    return bad


def load_matrix(root: str, sources: list[str], targets: list[mg.Topo]) -> list[tuple[str, str, str]]:
    """Load every saved layout at every target topology; compare params exactly and the forward.

    A world-size-1 target is loaded by every rank on its own one-rank group (a real 1-rank job).
    Returns ``(source, target, problem)`` triples, ``problem == ""`` when all matched.
    """
    rank = dist.get_rank()
    full = mg.full_params(SEED)
    ref_logits = mg.reference_forward(full, IDS)
    group = singleton_group()
    results = []
    for src in sources:
        for topo in targets:
            problem = ""
            try:
                alone = topo.world == 1
                trank = 0 if alone else rank
                params = mg.empty_like_local(topo, trank)
                sd = {"model": params, "step": -1, "extra": {"note": ""}}
                planner = ReshardLoadPlanner(topo.layout(trank))
                dcp.load(sd, storage_reader=FileSystemReader(os.path.join(root, src)), planner=planner,
                         process_group=group if alone else None)
                bad = check_loaded(topo, trank, sd["model"], full)
                if bad:
                    problem += f"params differ: {bad}; "
                if sd["step"] != 7 or sd["extra"]["note"] != f"saved at {src}":
                    problem += f"objects differ: {sd['step']} {sd['extra']}; "
                if planner.report is None or not planner.report.ok:
                    problem += f"report: {planner.report}; "
                out = (mg.reference_forward(sd["model"], IDS) if alone
                       else mg.distributed_forward(topo, sd["model"], IDS))
                if out is not None:
                    if not torch.allclose(out, ref_logits, rtol=1e-5, atol=1e-5):
                        problem += f"forward differs by {(out - ref_logits).abs().max().item()}; "
                    if topo.tp == 1 and not torch.equal(out, ref_logits):
                        problem += "forward not bit-identical at TP=1; "
            except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
                problem += f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"
            results.append((src, topo.name, problem))
    return results


def strict_errors(root: str, src: str) -> dict:
    """4 ranks load ``src`` at 2x1x2 with three kinds of faults spread over the ranks: rank 0 wants a
    tensor the checkpoint lacks, rank 1's embedding has a shape no saved layout gives, and no rank
    asks for the saved ``extra.note``. Every rank must get the same strict error; nothing is loaded."""
    rank = dist.get_rank()
    topo = mg.Topo(2, 1, 2)
    params = mg.empty_like_local(topo, rank)
    if rank == 0:
        params["layers.1.attn.extra.weight"] = torch.full((3,), float("nan"))
    if rank == 1:
        params["embed.weight"] = torch.full((5, 16), float("nan"))
    sd = {"model": params, "step": -1}
    try:
        dcp.load(sd, storage_reader=FileSystemReader(os.path.join(root, src)), planner=ReshardLoadPlanner(topo.layout(rank)))
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        msg = f"{type(e).__name__}: {e}"
    else:
        msg = "no error"
    untouched = all(bool(torch.isnan(t).all()) for t in params.values()) and sd["step"] == -1
    return {"msg": msg, "untouched": untouched}


def save_wrong_pp(path: str) -> None:
    """Two PP stages both claim layers 0-1 (layer_offset left at 0 on stage 1)."""
    rank = dist.get_rank()
    topo = mg.Topo(1, 2, 2)
    good = topo.layout(rank)
    lay = ParallelLayout(tp_rank=good.tp_rank, tp_size=1, pp_rank=good.pp_rank, pp_size=2,
                         dp_rank=good.dp_rank, dp_size=2, rules=good.rules, layer_offset=0)
    sd = state_for(topo, rank)
    dcp.save(sd, storage_writer=FileSystemWriter(path), planner=ReshardSavePlanner(lay))


def save_written_bytes(path: str, topo_name: str) -> int:
    """Save at 2x1x2 and return this rank's bytes in its data files (dedup balance check)."""
    rank = dist.get_rank()
    topo = mg.Topo(2, 1, 2)
    sd = state_for(topo, rank)
    dcp.save(sd, storage_writer=FileSystemWriter(path), planner=ReshardSavePlanner(topo.layout(rank)))
    dist.barrier()
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.startswith(f"__{rank}_") and f.endswith(".distcp"))


def dtensor_roundtrip(root: str) -> list[str]:
    """Save a mixed state (TP model as DTensors with Shard(0)/Shard(1) on a 4-way mesh, plain
    sharded and replicated tensors, bytes); load it as DTensors on a 2x2 mesh with other
    placements plus plain shards at TP=2 x DP=2, and the model as plain Megatron shards at
    2x1x2; compare exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank = dist.get_rank()
    full = mg.full_params(SEED)
    mesh = init_device_mesh("cpu", (4,))
    rules = mg.rules()

    def placement(name: str):
        for pat, spec in rules.items():
            import fnmatch

            if fnmatch.fnmatchcase(name, pat):
                return [Shard(spec.dim)]
        return [Replicate()]

    # a mixed state: DTensors, a plain tensor column-sharded Megatron-style, a replicated one, bytes
    col = ParallelLayout(tp_rank=rank, tp_size=4, rules={"plain.col": ShardSpec(0)})
    col_full = torch.arange(8.0)
    rep_full = torch.arange(4096.0)  # a replicated DTensor: written once, by one of its 4 holders
    sd = {"model": {k: distribute_tensor(v, mesh, placement(k)) for k, v in full.items()},
          "rep_dt": distribute_tensor(rep_full, mesh, [Replicate()]),
          "plain": {"col": ref.column_parallel(col_full, 4, rank), "rep": torch.ones(3)}, "step": 11}
    path = os.path.join(root, "dtensor")
    dcp.save(sd, storage_writer=FileSystemWriter(path), planner=ReshardSavePlanner(col))
    problems = []
    md = FileSystemReader(path).read_metadata()
    if [tuple(c.offsets) for c in md.state_dict_metadata["rep_dt"].chunks] != [(0,)]:
        problems.append(f"replicated DTensor chunks {md.state_dict_metadata['rep_dt'].chunks}")
    writers = {info.relative_path for idx, info in md.storage_data.items() if idx.fqn == "rep_dt"}
    if len(writers) != 1:
        problems.append(f"replicated DTensor written {len(writers)} times")
    mesh2 = init_device_mesh("cpu", (2, 2))
    tgt = {"model": {k: distribute_tensor(torch.zeros_like(v), mesh2, [Shard(v.dim() - 1), Replicate()])
                     for k, v in full.items()},
           "rep_dt": distribute_tensor(torch.zeros(4096), mesh2, [Replicate(), Shard(0)]),
           "plain": {"col": torch.zeros(4), "rep": torch.zeros(3)}, "step": 0}
    col2 = ParallelLayout(tp_rank=rank % 2, tp_size=2, dp_rank=rank // 2, dp_size=2,
                          rules={"plain.col": ShardSpec(0)})
    dcp.load(tgt, storage_reader=FileSystemReader(path), planner=ReshardLoadPlanner(col2))
    if not torch.equal(tgt["plain"]["col"], col_full[4 * (rank % 2): 4 * (rank % 2) + 4]):
        problems.append("plain col")
    if not torch.equal(tgt["plain"]["rep"], torch.ones(3)) or tgt["step"] != 11:
        problems.append("plain rep / step")
    for k, v in full.items():
        if not torch.equal(tgt["model"][k].full_tensor(), v):
            problems.append(f"dtensor {k}")
    if not torch.equal(tgt["rep_dt"].full_tensor(), rep_full):
        problems.append("replicated dtensor")
    topo = mg.Topo(2, 1, 2)
    plain = {"model": mg.empty_like_local(topo, rank)}
    lp = ReshardLoadPlanner(topo.layout(rank), strict=False)
    dcp.load(plain, storage_reader=FileSystemReader(path), planner=lp)
    if lp.report.unexpected_keys != ["plain.col", "plain.rep", "rep_dt", "step"] or lp.report.missing_keys:
        problems.append(f"report {lp.report}")
    problems += [f"plain {k}" for k in check_loaded(topo, rank, plain["model"], full)]
    return problems


def global_pieces_roundtrip(root: str) -> list[str]:
    """A flat buffer split unevenly over 4 ranks, saved as GlobalPieces boxes of a [6, 5] matrix,
    loaded by 4 ranks as column blocks (other boxes of the same global tensor)."""
    rank = dist.get_rank()
    full = torch.arange(30.0).reshape(6, 5)
    rows = [(0, 1), (1, 3), (3, 4), (4, 6)][rank]
    flat = full[rows[0]:rows[1]].reshape(-1).clone()
    piece = Piece("opt.w.exp_avg", (6, 5), (rows[0], 0), flat.view(rows[1] - rows[0], 5))
    rep = Piece("opt.scale", (2,), (0,), torch.tensor([1.5, 2.5]))
    sd = {"optim": GlobalPieces([piece]), "rep": GlobalPieces([rep], replicated=True)}
    path = os.path.join(root, "pieces")
    dcp.save(sd, storage_writer=FileSystemWriter(path), planner=ReshardSavePlanner(ParallelLayout()))
    cols = [(0, 2), (2, 3), (3, 5), (0, 5)][rank]
    buf = torch.full((6 * (cols[1] - cols[0]),), -1.0)
    view = buf.view(cols[1] - cols[0], 6).T  # a non-contiguous view, filled in place
    tgt = {"optim": GlobalPieces([Piece("opt.w.exp_avg", (6, 5), (0, cols[0]), view)]),
           "rep": GlobalPieces([Piece("opt.scale", (2,), (0,), torch.zeros(2))], replicated=True)}
    dcp.load(tgt, storage_reader=FileSystemReader(path), planner=ReshardLoadPlanner(ParallelLayout()))
    problems = []
    if not torch.equal(view, full[:, cols[0]:cols[1]]):
        problems.append("pieces")
    if not torch.equal(tgt["rep"].pieces[0].view, torch.tensor([1.5, 2.5])):
        problems.append("replicated piece")
    return problems


#: a model with tensors of 32-256 KiB, so that ranged reads are measurable against 4 KiB coalescing gaps
EXT_CFG = mg.Cfg(vocab=512, hidden=128, n_heads=8, n_kv=4, head_dim=16, ffn=512, n_layers=4)


def ext_storage_reshard(root: str, save: tuple[int, int, int], load: tuple[int, int, int]) -> dict:
    """Save at ``save`` with dcp_ext's writer, load at ``load`` with dcp_ext's reader (same world).

    Returns which params differ and the reader's byte counts on this rank.
    """
    import dcp_ext

    rank = dist.get_rank()
    cfg = EXT_CFG
    full = mg.full_params(SEED, cfg)
    src, dst = mg.Topo(*save), mg.Topo(*load)
    path = os.path.join(root, f"{src.name}-to-{dst.name}")
    sd = {"model": mg.local_params(src, rank, full, cfg), "step": 7, "extra": {"note": f"saved at {src.name}"}}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(path, files_per_rank=2, checksum_block_size="16KiB"),
             planner=ReshardSavePlanner(src.layout(rank, cfg)))
    sd = {"model": mg.empty_like_local(dst, rank, cfg), "step": -1, "extra": {"note": ""}}
    reader = dcp_ext.storage_reader(path)
    dcp.load(sd, storage_reader=reader, planner=ReshardLoadPlanner(dst.layout(rank, cfg)))
    st = reader.stats
    plain = dcp_ext.storage_reader(path, verify=False)  # no checksum blocks to widen reads to
    dcp.load({"model": mg.empty_like_local(dst, rank, cfg), "step": -1, "extra": {"note": ""}}, storage_reader=plain,
             planner=ReshardLoadPlanner(dst.layout(rank, cfg)))
    # (the objects are loaded again too: a strict planner wants every saved key)
    expect = mg.local_params(dst, rank, full, cfg)
    return {"bad": [k for k in expect if not torch.equal(sd["model"][k], expect[k])], "step": sd["step"], "note": sd["extra"]["note"],
            "bytes_read": st.bytes_read, "bytes_needed": st.bytes_needed,
            "plain_read": plain.stats.bytes_read, "plain_needed": plain.stats.bytes_needed,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in sd["model"].values())}


# ---------------------------------------------------------------- plan caching (repeat saves)


def _clear_plan_cache(key: str) -> None:
    """Forget stock DCP's class-level plan caches of planner class ``key`` (pool ranks are reused)."""
    from torch.distributed.checkpoint.planner import SavePlanner

    # (torch 2.7 has no _cached_metadata: its plan caching keeps the other four)
    for name in ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                 "_cached_metadata"):
        getattr(SavePlanner, name, {}).pop(key, None)


class CountingReshardSavePlanner(ReshardSavePlanner):
    """Counts the global plans actually built (on the coordinator) and the local plans sent."""

    global_plans = 0
    sent: list[bool] = []

    def _create_global_plan(self, all_plans):
        type(self).global_plans += 1
        return super()._create_global_plan(all_plans)

    def create_local_plan(self):
        plan = super().create_local_plan()
        type(self).sent.append(plan.usable)
        return plan


def _manifest_save_id(path: str) -> str:
    import json

    from dcp_ext.storage.commit import manifest_name

    with open(os.path.join(path, manifest_name(None))) as f:
        return json.load(f)["save_id"]


def plan_caching_roundtrip(root: str) -> dict:
    """Four saves with ``ReshardSavePlanner(enable_plan_caching=True)`` at TP=2: the same structure
    twice (new values), then an added tensor, then every parameter cast to bf16 (same shapes: only
    the dtypes change). Each is loaded back with our reader; returns what the checks need."""
    import dcp_ext

    cls = CountingReshardSavePlanner
    _clear_plan_cache(cls.__name__)
    cls.global_plans, cls.sent = 0, []
    rank = dist.get_rank()
    topo = mg.Topo(2, 1, 1)
    out: dict = {"global_plans": [], "sent": [], "bad": [], "save_ids": []}

    def save_load(name: str, seed: int, extra: bool, dtype: torch.dtype) -> None:
        full = mg.full_params(seed)
        params = {k: v.to(dtype) for k, v in mg.local_params(topo, rank, full).items()}
        if extra:
            params["added.bias"] = torch.arange(5, dtype=dtype) + seed  # replicated on both ranks
        path = os.path.join(root, name)
        dcp.save({"model": params, "step": seed}, storage_writer=dcp_ext.storage_writer(path),
                 planner=cls(topo.layout(rank), enable_plan_caching=True))
        out["global_plans"].append(cls.global_plans)
        out["sent"].append(cls.sent[-1])
        target = {"model": {k: torch.full_like(v, -1) for k, v in params.items()}, "step": -1}
        dcp.load(target, storage_reader=dcp_ext.storage_reader(path), planner=ReshardLoadPlanner(topo.layout(rank)))
        expect = {k: v.to(dtype) for k, v in mg.local_params(topo, rank, full).items()}
        if extra:
            expect["added.bias"] = torch.arange(5, dtype=dtype) + seed
        out["bad"].extend(f"{name}:{k}" for k, v in expect.items()
                          if target["model"][k].dtype != dtype or not torch.equal(target["model"][k], v))
        if target["step"] != seed:
            out["bad"].append(f"{name}:step")
        out["save_ids"].append(_manifest_save_id(path))

    save_load("first", 1, False, torch.float32)
    save_load("same_structure", 2, False, torch.float32)
    save_load("added_tensor", 3, True, torch.float32)
    save_load("bf16", 4, True, torch.bfloat16)
    _clear_plan_cache(cls.__name__)
    return out


class CountingDefaultSavePlanner(dcp.DefaultSavePlanner):
    sent: list[bool] = []

    def create_local_plan(self):
        plan = super().create_local_plan()
        type(self).sent.append(plan.usable)
        return plan


def stock_plan_caching_with_our_writer(root: str) -> dict:
    """Stock ``DefaultSavePlanner(enable_plan_caching=True)`` + our writer, three saves of the
    same structure: each loads back exactly and each has its own save id."""
    import dcp_ext

    cls = CountingDefaultSavePlanner
    _clear_plan_cache(cls.__name__)
    cls.sent = []
    rank = dist.get_rank()
    out: dict = {"bad": [], "save_ids": [], "sent": []}
    for i in range(3):
        sd = {f"r{rank}.w": torch.arange(12.0).reshape(3, 4) * (i + 1) + rank, "shared": torch.ones(4) * i}
        path = os.path.join(root, f"stock{i}")
        dcp.save(sd, storage_writer=dcp_ext.storage_writer(path), planner=cls(enable_plan_caching=True))
        out["sent"].append(cls.sent[-1])
        target = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp.load(target, storage_reader=dcp_ext.storage_reader(path))
        out["bad"].extend(f"{i}:{k}" for k in sd if not torch.equal(sd[k], target[k]))
        out["save_ids"].append(_manifest_save_id(path))
    _clear_plan_cache(cls.__name__)
    return out
