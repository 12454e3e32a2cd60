"""End-to-end demo: train a small GPT on 4 gloo ranks, save with dcp-ext, reload resharded.

``dcp-ext demo`` (or ``python -m dcp_ext.demo``):

1. spawns ``save_ranks`` gloo processes; each trains the same small GPT-style model a few
   AdamW steps (gradients all-reduced, so the ranks agree), then shards model and
   optimizer state as DTensors (``Shard(0)``, FSDP-style) and saves them with stock
   ``dcp.async_save`` (through :func:`dcp_ext.async_save` with a :class:`dcp_ext.PooledStager`)
   + :func:`dcp_ext.storage_writer` to a local directory;
2. spawns ``load_ranks`` processes as a *Megatron-style tensor-parallel* job: plain local
   tensors, vocab-parallel embedding, column/row-parallel linears, a fused QKV whose q, k, v
   parts are split separately - described as data (:class:`dcp_ext.ParallelLayout`) and loaded
   with stock ``dcp.load`` + :class:`dcp_ext.ReshardLoadPlanner` + :func:`dcp_ext.storage_reader`;
3. compares every tensor exactly (``torch.equal``) with shards cut by hand from a reference
   the training ranks kept, and prints sizes, throughputs and where the files are.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TinyGPT", "run_demo"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT-style decoder (token + position embedding, blocks, tied-free LM head)."""

    def __init__(self, vocab: int = 1024, d: int = 256, layers: int = 4, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.layers:
            x = blk(x)
        return self.head(self.ln_f(x))


def _train(steps: int, seed: int = 0):
    import torch.distributed as dist

    torch.manual_seed(seed)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    for _ in range(steps):
        idx = torch.randint(0, 1024, (4, 64), generator=g)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # data parallel: average gradients
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
    return model, opt, loss.item()


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Model + optimizer state keyed by FQN (plain tensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {}
    for p, st in opt.state.items():
        optim[names[id(p)]] = {k: v.detach().clone() for k, v in st.items()}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optim": optim}


def _shard(state: dict, mesh, dim_pref: int) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def conv(t: torch.Tensor):
        if t.dim() == 0:
            return distribute_tensor(t, mesh, [Replicate()])
        dim = dim_pref if t.dim() > dim_pref else 0
        return distribute_tensor(t, mesh, [Shard(dim)])

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return conv(x) if isinstance(x, torch.Tensor) else x

    return walk(state)


def _rank_train_and_save(ckpt: str, ref_path: str, steps: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dcp_ext

    model, opt, loss = _train(steps)
    full = _full_state(model, opt)
    if dist.get_rank() == 0:
        torch.save(full, ref_path)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = _shard(full, mesh, 0)
    state["trainer"] = {"step": steps, "loss": loss}
    writer = dcp_ext.storage_writer(ckpt, overwrite=True)
    stager = dcp_ext.PooledStager()  # training blocks only while the state is copied into its pool
    dist.barrier()
    t0 = time.perf_counter()
    fut = dcp_ext.async_save(state, storage_writer=writer, async_stager=stager)
    blocked = time.perf_counter() - t0
    fut.result()  # a training loop would keep going here; the demo waits for the commit
    seconds = time.perf_counter() - t0
    stager.close()  # frees the pool (after the last save of a run)
    return {"seconds": seconds, "blocked": blocked, "bytes": writer.stats.bytes_written,
            "loss": loss}


# Megatron-style tensor parallelism for TinyGPT, as data: which tensors are split along which
# dimension (fused QKV: each of q, k, v is split separately), for weights and their Adam moments.
def _tp_rules(d: int) -> dict:
    from .layout import ShardSpec

    specs = {
        "tok.weight": ShardSpec(0),                 # vocab-parallel embedding
        "qkv.weight": ShardSpec(0, (d, d, d)),      # column-parallel, fused q|k|v
        "qkv.bias": ShardSpec(0, (d, d, d)),
        "proj.weight": ShardSpec(1),                # row-parallel
        "fc1.weight": ShardSpec(0),                 # column-parallel
        "fc1.bias": ShardSpec(0),
        "fc2.weight": ShardSpec(1),                 # row-parallel
        "head.weight": ShardSpec(0),                # column-parallel LM head
    }
    return {f"*{name}{suffix}": spec for name, spec in specs.items() for suffix in ("", ".exp_avg", ".exp_avg_sq")}


def _tp_slice(fqn: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's plain local shard of ``full``, cut by hand (independent of the planner)."""
    name = fqn.removesuffix(".exp_avg_sq").removesuffix(".exp_avg")
    if name.endswith(("qkv.weight", "qkv.bias")):
        return torch.cat([part.chunk(tp, 0)[tp_rank] for part in full.chunk(3, 0)]).clone()
    if name.endswith(("tok.weight", "fc1.weight", "fc1.bias", "head.weight")):
        return full.chunk(tp, 0)[tp_rank].clone()
    if name.endswith(("proj.weight", "fc2.weight")):
        return full.chunk(tp, 1)[tp_rank].clone()
    return full.clone()  # replicated: norms, biases of row-parallel layers, positions, step counts


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rank_load_and_check(ckpt: str, ref_path: str) -> dict:
    """Load the FSDP-style checkpoint as Megatron-style plain TP shards (fused QKV split per part)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dcp_ext

    ref = torch.load(ref_path, weights_only=True)
    rank, tp = dist.get_rank(), dist.get_world_size()
    layout = dcp_ext.ParallelLayout(tp_rank=rank, tp_size=tp, rules=_tp_rules(ref["model"]["tok.weight"].shape[1]))
    expect = {part: {k: _tp_slice(k, v, rank, tp) for k, v in _flat(ref[part]).items()}
              for part in ("model", "optim")}
    # plain local tensors of the right shapes, filled with garbage so a load that does nothing fails
    target = {part: {k: torch.full_like(v, -7) for k, v in expect[part].items()} for part in expect}
    target["optim"] = _unflat(target["optim"])
    target["trainer"] = {"step": None, "loss": None}
    reader = dcp_ext.storage_reader(ckpt)
    planner = dcp_ext.ReshardLoadPlanner(layout)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=reader, planner=planner)
    dt = time.perf_counter() - t0
    got = {"model": target["model"], "optim": _flat(target["optim"])}
    mismatched = [f"{part}.{k}" for part in expect for k, v in expect[part].items()
                  if not torch.equal(got[part][k], v)]
    return {"seconds": dt, "bytes_read": reader.stats.bytes_read, "bytes_needed": reader.stats.bytes_needed,
            "mismatched": mismatched, "trainer": target["trainer"]}


def _unflat(flat: dict) -> dict:
    """``{"a.w.exp_avg": t}`` -> ``{"a.w": {"exp_avg": t}}`` (optimizer state keyed by param FQN)."""
    out: dict = {}
    for k, v in flat.items():
        fqn, _, key = k.rpartition(".")
        out.setdefault(fqn, {})[key] = v
    return out


@dataclass
class DemoReport:
    ckpt: str
    save_ranks: int
    load_ranks: int
    state_bytes: int
    save_seconds: float
    load_seconds: float
    files: int
    ok: bool
    mismatched: list


def _fmt(n: float) -> str:
    for u in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or u == "GiB":
            return f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def run_demo(out_dir: str | None = None, save_ranks: int = 4, load_ranks: int = 2, steps: int = 3,
             stream=sys.stdout) -> DemoReport:
    """Run the demo; returns a :class:`DemoReport` (and prints it to ``stream``)."""
    import multiprocessing as mp

    from .testing import run_on_ranks

    # fork every rank from one server that imported torch and dcp_ext once: on 2 cores, importing
    # them afresh in each of the 4 + 2 ranks costs more than the training, saving and loading together
    spawn = ({"start_method": "forkserver", "preload": ["dcp_ext.demo"]} if "forkserver" in mp.get_all_start_methods()
             else {})
    out_dir = os.path.abspath(out_dir or os.path.join(os.getcwd(), "demo_ckpt"))
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, f"step_{steps}")
    ref_dir = tempfile.mkdtemp(prefix="dcp_ext_demo_ref_")
    ref_path = os.path.join(ref_dir, "reference.pt")
    try:
        p = lambda s: (stream.write(s + "\n"), stream.flush())  # noqa: E731
        p(f"dcp-ext demo: training a small GPT on {save_ranks} gloo ranks for {steps} AdamW steps ...")
        t0 = time.perf_counter()
        saved = run_on_ranks(_rank_train_and_save, save_ranks, ckpt, ref_path, steps, timeout=600, **spawn)
        nbytes = sum(s["bytes"] for s in saved)
        save_s = max(s["seconds"] for s in saved)
        blocked = max(s["blocked"] for s in saved)
        p(f"  saved {_fmt(nbytes)} (model + AdamW state, sharded Shard(0) over {save_ranks} ranks) "
          f"with dcp.async_save + PooledStager: training blocked {blocked:.2f}s, committed after "
          f"{save_s:.2f}s = {_fmt(nbytes / save_s)}/s to {ckpt}")
        p(f"reloading on {load_ranks} ranks as Megatron-style tensor parallelism (TP={load_ranks}: plain local "
          f"shards, fused QKV split per part, vocab-parallel embedding) with ReshardLoadPlanner ...")
        loaded = run_on_ranks(_rank_load_and_check, load_ranks, ckpt, ref_path, timeout=600, **spawn)
        load_s = max(r["seconds"] for r in loaded)
        mism = sorted({m for r in loaded for m in r["mismatched"]})
        read = sum(r["bytes_read"] for r in loaded)
        needed = sum(r["bytes_needed"] for r in loaded)
        p(f"  loaded in {load_s:.2f}s = {_fmt(needed / load_s)}/s (read {_fmt(read)} for {_fmt(needed)} needed: "
          f"row-parallel shards cut every saved row; gaps under 4 KiB and whole checksum blocks are read "
          f"through); trainer state {loaded[0]['trainer']}")
        files = sorted(os.listdir(ckpt))
        data = [f for f in files if f.endswith(".distcp")]
        p(f"  files in {ckpt}: .metadata (commit marker, stock DCP), .dcp_ext.json (manifest + checksums), "
          f"{len(data)} data files ({', '.join(data[:4])}{', ...' if len(data) > 4 else ''})")
        ok = not mism and loaded[0]["trainer"]["step"] == steps
        if ok:
            p(f"OK: every tensor matches the training ranks' state exactly (torch.equal) "
              f"[{time.perf_counter() - t0:.1f}s total]")
        else:
            p(f"FAILED: {len(mism)} tensors differ: {mism[:10]}")
        return DemoReport(ckpt, save_ranks, load_ranks, nbytes, save_s, load_s, len(files), ok, mism)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dcp-ext demo", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run_from_args(args)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default ./demo_ckpt)")
    ap.add_argument("--save-ranks", type=int, default=4)
    ap.add_argument("--load-ranks", type=int, default=2, help="tensor-parallel size of the reload (divides 256)")
    ap.add_argument("--steps", type=int, default=3)


def run_from_args(args) -> int:
    if args.save_ranks < 1 or args.load_ranks < 1 or args.steps < 1:
        print("dcp-ext demo: --save-ranks, --load-ranks and --steps must be >= 1", file=sys.stderr)
        return 2
    if 256 % args.load_ranks:
        print(f"dcp-ext demo: --load-ranks is the tensor-parallel size and must divide the model width 256 "
              f"(1, 2, 4, 8, ...), got {args.load_ranks}", file=sys.stderr)
        return 2
    report = run_demo(args.dir, args.save_ranks, args.load_ranks, args.steps)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
