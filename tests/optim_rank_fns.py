"""Functions run on gloo ranks by tests/test_optim.py (module-level so spawned ranks can import them).

Scheme: every rank builds the same single-process *reference* model and optimizer and trains it
on the same data. A rank's *local* model holds its TP/PP piece of each parameter (cut from
the reference by the independent split functions of ``tests/reference.py``, never by
``dcp_ext.layout``) and its local optimizer steps on the matching slice of the reference
gradients. Adam/SGD are element-wise, so the local optimizer state is exactly the corresponding
slice of the reference state, which is what the checks compare. ZeRO slices are expected from
``reference.zero_slice`` (the flat-buffer layout element by element), never from
``dcp_ext.optim``'s own buffer math.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import dcp_ext
from dcp_ext.optim import optimizer_state
from examples.zero_adam import ZeroAdam
from tests import reference

D, FFN, N_IN, N_OUT = 8, 8, 4, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * FFN)  # fused gate/up
        self.fc2 = nn.Linear(FFN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(self.norm(x)).chunk(2, dim=-1)
        return x + self.fc2(torch.nn.functional.silu(a) * b)


class Net(nn.Module):
    def __init__(self, n_layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Linear(N_IN, D)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.head = nn.Linear(D, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, N_IN, generator=g), torch.randn(16, N_OUT, generator=g)


def rules():
    from dcp_ext.layout import ShardSpec

    return {
        "*fc1.weight": ShardSpec(0, (FFN, FFN)),
        "*fc1.bias": ShardSpec(0, (FFN, FFN)),
        "*fc2.weight": ShardSpec(1),
    }


def group_of(fqn: str) -> int:
    return 1 if (fqn.endswith(".bias") or ".norm." in fqn) else 0


def make_opt(kind: str, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    groups = [[p for f, p in named if group_of(f) == 0], [p for f, p in named if group_of(f) == 1]]
    if kind == "adam":
        return torch.optim.Adam([{"params": groups[0]}, {"params": groups[1], "lr": 0.02}], lr=0.01, foreach=False)
    if kind == "adamw":
        return torch.optim.AdamW([{"params": groups[0]}, {"params": groups[1], "weight_decay": 0.0}],
                                 lr=0.01, weight_decay=0.1, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD([{"params": groups[0]}, {"params": groups[1], "lr": 0.02}],
                               lr=0.05, momentum=0.9, foreach=False)
    if kind == "rmsprop":  # three per-parameter states: square_avg, momentum_buffer, grad_avg
        return torch.optim.RMSprop([{"params": groups[0]}, {"params": groups[1], "lr": 0.02}],
                                   lr=0.01, momentum=0.5, centered=True, foreach=False)
    if kind == "adagrad":  # state created eagerly in __init__ (state_sum), not lazily
        return torch.optim.Adagrad([{"params": groups[0]}, {"params": groups[1], "lr": 0.02}],
                                   lr=0.05, foreach=False)
    raise ValueError(kind)


# ---------------------------------------------------------------------- layouts
class Topo:
    """A rank's place in a TP x PP x DP grid (TP fastest) and its ParallelLayout (or None)."""

    def __init__(self, tp: int, pp: int, dp: int, n_layers: int = 4, use_layout: bool = True) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        assert tp * pp * dp == world, (tp, pp, dp, world)
        self.tp, self.pp, self.dp = tp, pp, dp
        self.tp_rank, self.pp_rank, self.dp_rank = rank % tp, (rank // tp) % pp, rank // (tp * pp)
        self.n_layers = n_layers
        # uneven split when it does not divide: earlier stages get more layers
        self.stage_layers = reference.even_stages(n_layers, pp)[self.pp_rank]
        self.layout = None
        if use_layout:
            from dcp_ext.layout import ParallelLayout

            self.layout = ParallelLayout(tp_rank=self.tp_rank, tp_size=tp, pp_rank=self.pp_rank, pp_size=pp,
                                         dp_rank=self.dp_rank, dp_size=dp, rules=rules(),
                                         stage_layers=self.stage_layers)

    def owns(self, gfqn: str) -> bool:
        if gfqn.startswith("layers."):
            return int(gfqn.split(".")[1]) in self.stage_layers
        if gfqn.startswith("emb."):
            return self.pp_rank == 0
        return self.pp_rank == self.pp - 1  # head

    def local_fqn(self, gfqn: str) -> str:
        if self.layout is None:
            return gfqn
        lf = reference.stage_local_name(gfqn, self.stage_layers)
        assert lf is not None, gfqn
        return lf

    def slice_global(self, lfqn: str, g: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor of global tensor ``g`` (a copy), cut by the reference: fc1 is
        a fused gate/up column-parallel linear, fc2 a row-parallel one, the rest replicated."""
        g = g.detach()
        if self.layout is None:
            return g.clone()
        if lfqn.endswith(("fc1.weight", "fc1.bias")):
            return reference.gate_up(g, FFN, self.tp, self.tp_rank)
        if lfqn.endswith("fc2.weight"):
            return reference.row_parallel(g, self.tp, self.tp_rank)
        return g.clone()


class LocalModel(nn.Module):
    """A container of parameters under given (local) FQNs."""

    def add(self, fqn: str, t: torch.Tensor) -> nn.Parameter:
        *path, name = fqn.split(".")
        mod: nn.Module = self
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        p = nn.Parameter(t)
        mod.register_parameter(name, p)
        return p


def build_local(topo: Topo, ref: Net, seed_offset: int | None = None) -> tuple[LocalModel, dict[str, str]]:
    """Local model of ``topo`` sliced from ``ref`` (or random if seed_offset is given); local->global FQN map."""
    local = LocalModel()
    names = {}
    gen = torch.Generator().manual_seed(seed_offset) if seed_offset is not None else None
    for gfqn, p in ref.named_parameters():
        if not topo.owns(gfqn):
            continue
        lf = topo.local_fqn(gfqn)
        t = topo.slice_global(lf, p)
        if gen is not None:
            t = torch.randn(t.shape, generator=gen).to(t.dtype)
        local.add(lf, t)
        names[lf] = gfqn
    return local, names


def ref_step(ref: Net, ref_opt, step: int) -> None:
    x, y = batch(step)
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(ref(x), y).backward()


def push_grads(topo: Topo, ref: Net, local: LocalModel, names: dict[str, str]) -> None:
    rp = dict(ref.named_parameters())
    for lf, p in local.named_parameters():
        p.grad = topo.slice_global(lf, rp[names[lf]].grad)


def train(topo, ref, ref_opt, local, local_opt, names, steps: range) -> None:
    for s in steps:
        ref_step(ref, ref_opt, s)
        push_grads(topo, ref, local, names)
        ref_opt.step()
        local_opt.step()


def planners(topo: Topo):
    if topo.layout is None:
        return None, None
    return dcp_ext.ReshardSavePlanner(topo.layout), dcp_ext.ReshardLoadPlanner(topo.layout)


def _check_against_ref(topo, ref, ref_opt, local, local_opt, names) -> int:
    rp = dict(ref.named_parameters())
    n = 0
    for lf, p in local.named_parameters():
        g = rp[names[lf]]
        assert torch.equal(p.detach(), topo.slice_global(lf, g.detach())), f"param {lf} differs"
        rs, ls = ref_opt.state[g], local_opt.state[p]
        assert set(rs) == set(ls), (lf, set(rs), set(ls))
        for k, v in rs.items():
            if isinstance(v, torch.Tensor) and v.shape == g.shape:
                want = topo.slice_global(lf, v)
            else:
                want = v
            assert torch.equal(ls[k], want), f"optimizer state {names[lf]}.{k} differs on rank {dist.get_rank()}"
            n += 1
    for rg, lg in zip(ref_opt.param_groups, local_opt.param_groups):
        assert {k: v for k, v in rg.items() if k != "params"} == {k: v for k, v in lg.items() if k != "params"}
    return n


# ---------------------------------------------------------------------- plain optimizers
def save_plain(path: str, grid: tuple[int, int, int], kind: str, steps: int, use_layout: bool) -> int:
    topo = Topo(*grid, use_layout=use_layout)
    ref = Net()
    ref_opt = make_opt(kind, list(ref.named_parameters()))
    local, names = build_local(topo, ref)
    local_opt = make_opt(kind, list(local.named_parameters()))
    train(topo, ref, ref_opt, local, local_opt, names, range(steps))
    _check_against_ref(topo, ref, ref_opt, local, local_opt, names)
    sp, _ = planners(topo)
    state = {"model": local.state_dict(), "optim": optimizer_state(local, local_opt, topo.layout)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=sp)
    return len(names)


def load_plain(path: str, grid: tuple[int, int, int], kind: str, steps: int, use_layout: bool) -> int:
    """Fresh model (random weights) + fresh, never-stepped optimizer at ``grid``; load; compare."""
    topo = Topo(*grid, use_layout=use_layout)
    ref = Net()
    ref_opt = make_opt(kind, list(ref.named_parameters()))
    for s in range(steps):
        ref_step(ref, ref_opt, s)
        ref_opt.step()
    local, names = build_local(topo, ref, seed_offset=7 + dist.get_rank())
    local_opt = make_opt(kind, list(local.named_parameters()))
    for g in local_opt.param_groups:  # scheduler-like change that the checkpoint must undo
        g["lr"] = 123.0
    _, lp = planners(topo)
    state = {"model": local.state_dict(), "optim": optimizer_state(local, local_opt, topo.layout)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=lp)
    return _check_against_ref(topo, ref, ref_opt, local, local_opt, names)


def _self_grads(local: LocalModel, step: int) -> None:
    """Gradients of the *local* model's own weights (a whole-model replica): forward through a
    ``Net`` with the local parameters swapped in, DP-average over the group (identical batches)."""
    from torch.func import functional_call

    params = dict(local.named_parameters())
    for p in params.values():
        p.grad = None
    x, y = batch(step)
    torch.nn.functional.mse_loss(functional_call(_SHELL, params, (x,)), y).backward()
    for p in params.values():
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())


_SHELL = Net()


def _opt_snapshot(local: LocalModel, opt) -> dict:
    return {lf: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            for lf, p in local.named_parameters()}


def resume_same(path: str, grid: tuple[int, int, int], kind: str, n: int, m: int, use_layout: bool) -> int:
    """(b): train n, save, train m more == fresh + load + train m, bit for bit (weights and every
    optimizer state). Without a layout every rank holds the whole model and the gradients come from
    its own (loaded) weights; with TP/PP they are the matching slices of the reference gradients."""
    topo = Topo(*grid, use_layout=use_layout)
    whole = topo.layout is None
    ref = Net()
    ref_opt = make_opt(kind, list(ref.named_parameters()))
    local, names = build_local(topo, ref)
    local_opt = make_opt(kind, list(local.named_parameters()))

    def run(ref, ref_opt, local, local_opt, names, steps):
        if not whole:
            return train(topo, ref, ref_opt, local, local_opt, names, steps)
        for s in steps:
            _self_grads(local, s)
            local_opt.step()

    run(ref, ref_opt, local, local_opt, names, range(n))
    sp, lp = planners(topo)
    dcp.save({"model": local.state_dict(), "optim": optimizer_state(local, local_opt, topo.layout)},
             storage_writer=dcp.FileSystemWriter(path), planner=sp)
    ref_at_n = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref_opt_at_n = copy.deepcopy(ref_opt.state_dict())
    run(ref, ref_opt, local, local_opt, names, range(n, n + m))
    final = {k: v.detach().clone() for k, v in local.state_dict().items()}
    final_opt = _opt_snapshot(local, local_opt)

    ref2 = Net()
    ref2.load_state_dict(ref_at_n)
    ref2_opt = make_opt(kind, list(ref2.named_parameters()))
    ref2_opt.load_state_dict(ref_opt_at_n)
    local2, names2 = build_local(topo, ref, seed_offset=99)
    local2_opt = make_opt(kind, list(local2.named_parameters()))
    state = {"model": local2.state_dict(), "optim": optimizer_state(local2, local2_opt, topo.layout)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=lp)
    run(ref2, ref2_opt, local2, local2_opt, names2, range(n, n + m))
    for k, v in local2.state_dict().items():
        assert torch.equal(v, final[k]), f"{k} diverged after resume"
    got_opt = _opt_snapshot(local2, local2_opt)
    assert got_opt.keys() == final_opt.keys()
    for lf, st in final_opt.items():
        assert st.keys() == got_opt[lf].keys(), (lf, st.keys(), got_opt[lf].keys())
        for k, v in st.items():
            assert torch.equal(got_opt[lf][k], v) if isinstance(v, torch.Tensor) else got_opt[lf][k] == v, \
                f"optimizer state {lf}.{k} diverged after resume"
    return len(final)


# ---------------------------------------------------------------------- error paths
def bad_optimizer_param() -> str:
    model = Net(n_layers=1)
    stray = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.Adam(list(model.parameters()) + [stray])
    try:
        optimizer_state(model, opt).state_dict()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


# ---------------------------------------------------------------------- interop with stock state_dict helpers
def interop_stock(path: str, use_fsdp: bool, use_layout: bool = False) -> str:
    """One checkpoint holding (1) a model+optimizer via torch's get_*_state_dict (FSDP2 or plain)
    and (2) another model+optimizer via dcp_ext.optimizer_state; both load back exactly."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build(seed):
        a = Net(n_layers=2, seed=seed)
        how = "plain"
        if use_fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for layer in a.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(a, mesh=mesh)
            how = "fsdp2"
        return a, torch.optim.Adam(a.parameters(), lr=0.01, foreach=False), how

    a, a_opt, how = build(1)
    b = Net(n_layers=2, seed=2)
    b_opt = make_opt("adam", list(b.named_parameters()))
    for s in range(2):
        x, y = batch(s)
        for m, o in ((a, a_opt), (b, b_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    want_a = _full(get_optimizer_state_dict(a, a_opt))
    want_b = copy.deepcopy({n: dict(b_opt.state[p]) for n, p in b.named_parameters()})
    lay = None
    sp = lp = None
    if use_layout:  # our GlobalPieces next to FSDP2 DTensors, through the Reshard planners
        lay = dcp_ext.ParallelLayout(dp_rank=dist.get_rank(), dp_size=dist.get_world_size())
        sp, lp = dcp_ext.ReshardSavePlanner(lay), dcp_ext.ReshardLoadPlanner(lay)
    state = {"a_model": get_model_state_dict(a), "a_optim": get_optimizer_state_dict(a, a_opt),
             "model": b.state_dict(), "optim": optimizer_state(b, b_opt, lay)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=sp)

    a2, a2_opt, _ = build(3)
    b2 = Net(n_layers=2, seed=4)
    b2_opt = make_opt("adam", list(b2.named_parameters()))
    state = {"a_model": get_model_state_dict(a2), "a_optim": get_optimizer_state_dict(a2, a2_opt),
             "model": b2.state_dict(), "optim": optimizer_state(b2, b2_opt, lay)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=lp)
    set_model_state_dict(a2, state["a_model"])
    set_optimizer_state_dict(a2, a2_opt, state["a_optim"])
    got_a = _full(get_optimizer_state_dict(a2, a2_opt))
    assert got_a.keys() == want_a.keys() and len(got_a) > 0
    for k in want_a:
        assert torch.equal(got_a[k], want_a[k]), f"stock optimizer state {k} differs"
    for n, p in b2.named_parameters():
        for k, v in want_b[n].items():
            assert torch.equal(b2_opt.state[p][k], v), f"dcp_ext optimizer state {n}.{k} differs"
    return how


def _full(osd) -> dict[str, torch.Tensor]:
    out = {}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if hasattr(v, "full_tensor"):
                v = v.full_tensor()
            out[f"{fqn}.{k}"] = v.detach().clone()
    return out


# ---------------------------------------------------------------------- ZeRO-style flat buffers
_GROUPS: dict[tuple, object] = {}


def dp_group(topo: Topo):
    """The DP group of this rank (all ranks create every group, in the same order)."""
    key = (dist.get_world_size(), topo.tp, topo.pp, topo.dp)
    if key not in _GROUPS:
        mine = None
        for pp_rank in range(topo.pp):
            for tp_rank in range(topo.tp):
                members = [(d * topo.pp + pp_rank) * topo.tp + tp_rank for d in range(topo.dp)]
                g = dist.new_group(members)
                if pp_rank == topo.pp_rank and tp_rank == topo.tp_rank:
                    mine = g
        _GROUPS[key] = mine
    return _GROUPS[key]


def make_zero(topo: Topo, named, alignment: int, bucket: int | None) -> ZeroAdam:
    return ZeroAdam(named, dp_size=topo.dp, dp_rank=topo.dp_rank, group=dp_group(topo) if topo.dp > 1 else None,
                    lr=0.01, weight_decay=0.1, alignment=alignment, bucket_numel=bucket, average_grads=False)


class RefZeroAdamW:
    """Single-process reference for ZeroAdam: AdamW with fp32 master weights and moments kept per
    parameter (no flat buffer), with the element-wise update ZeroAdam documents (decoupled weight
    decay on the master weights, then Adam), the parameters set from the master weights."""

    def __init__(self, model: nn.Module, lr: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.1) -> None:
        self.model, self.lr, self.betas, self.eps, self.wd = model, lr, betas, eps, weight_decay
        named = list(model.named_parameters())
        self.state = {"master": {n: p.detach().float().clone() for n, p in named},
                      "exp_avg": {n: torch.zeros(p.shape) for n, p in named},
                      "exp_avg_sq": {n: torch.zeros(p.shape) for n, p in named}}
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        (b1, b2), lr = self.betas, self.lr
        bc1, bc2 = 1 - b1 ** self.steps, math.sqrt(1 - b2 ** self.steps)
        for n, p in self.model.named_parameters():
            g = (p.grad if p.grad is not None else torch.zeros_like(p)).float()
            w, m, v = self.state["master"][n], self.state["exp_avg"][n], self.state["exp_avg_sq"][n]
            w.mul_(1 - lr * self.wd)
            m.mul_(b1)
            m.add_(g * (1 - b1))
            v.mul_(b2)
            v.add_((g * g) * (1 - b2))
            w.sub_((m / (v.sqrt() / bc2 + self.eps)) * (lr / bc1))
            p.copy_(w)

    def snapshot(self):
        return copy.deepcopy((self.state, self.steps))

    def restore(self, snap) -> None:
        self.state, self.steps = copy.deepcopy(snap)


def ref_zero(steps: int, dtype: str = "float32"):
    """The reference run: the global model (parameters in ``dtype``) trained ``steps`` steps by
    :class:`RefZeroAdamW`; returns (ref, its optimizer, full fp32 states by global FQN)."""
    ref_model = Net().to(getattr(torch, dtype))
    opt = RefZeroAdamW(ref_model)
    for s in range(steps):
        x, y = batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x.to(ref_model.emb.weight.dtype)),
                                     y.to(ref_model.emb.weight.dtype)).backward()
        opt.step()
    return ref_model, opt, opt.state


def _zero_expected(topo, names, local, full, alignment: int, bucket: int | None,
                   fill: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """This rank's expected ZeRO slice of every state and its padding mask, by the reference."""
    order = [lf for lf, _ in local.named_parameters()]  # ZeroAdam's buffer order
    return {name: reference.zero_slice({lf: topo.slice_global(lf, full[name][names[lf]]) for lf in order},
                                 topo.dp, topo.dp_rank, alignment, bucket, fill=fill, dtype=torch.float32)
            for name in full}


def zero_save(path: str, grid, steps: int, alignment: int, bucket: int | None, dtype: str = "float32") -> int:
    topo = Topo(*grid)
    ref, ref_opt, _ = ref_zero(0, dtype)
    local, names = build_local(topo, ref)
    opt = make_zero(topo, list(local.named_parameters()), alignment, bucket)
    for s in range(steps):
        x, y = batch(s)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x.to(ref.emb.weight.dtype)), y.to(ref.emb.weight.dtype)).backward()
        push_grads(topo, ref, local, names)
        ref_opt.step()
        opt.step()
    want = _zero_expected(topo, names, local, ref_opt.state, alignment, bucket)
    for name, buf in opt.flat_state.items():
        assert torch.equal(buf, want[name][0]), f"ZeRO {name} slice differs from the reference before saving"
    sp, _ = planners(topo)
    dcp.save({"model": local.state_dict(), "optim": optimizer_state(local, opt, topo.layout)},
             storage_writer=dcp.FileSystemWriter(path), planner=sp)
    return opt.flat_spec.local_numel


_SENTINEL = -7.0


def zero_load(path: str, grid, steps: int, alignment: int, bucket: int | None, target: str,
              resave: str | None = None, dtype: str = "float32") -> int:
    """Load a ZeRO checkpoint at ``grid`` into a fresh ZeroAdam (any DP size/alignment/buckets) or a
    plain Adam and compare with the single-process reference. For ZeroAdam the slice buffers start
    filled with a sentinel: every parameter element must be loaded and the padding left alone.
    ``resave``: then save the *loaded* state (no training in between) there, for the next hop."""
    topo = Topo(*grid)
    ref, ref_opt, full = ref_zero(steps, dtype)
    local, names = build_local(topo, ref, seed_offset=5 + dist.get_rank())
    sp, lp = planners(topo)
    if target == "zero":
        opt = make_zero(topo, list(local.named_parameters()), alignment, bucket)
        opt.param_groups[0]["lr"] = 9.0
        for buf in opt.flat_state.values():
            buf.fill_(_SENTINEL)
        opt.scalar_state["step"].fill_(-1)
        dcp.load({"model": local.state_dict(), "optim": optimizer_state(local, opt, topo.layout)},
                 storage_reader=dcp.FileSystemReader(path), planner=lp)
        want = _zero_expected(topo, names, local, full, alignment, bucket, fill=_SENTINEL)
        for name, buf in opt.flat_state.items():
            assert buf.dtype == torch.float32, (name, buf.dtype)
            # padding cells hold the sentinel in the expected slice: the load must leave them alone
            assert torch.equal(buf, want[name][0]), \
                f"ZeRO {name} slice differs after load on rank {dist.get_rank()} " \
                f"(padding cells written: {bool((buf[want[name][1]] != _SENTINEL).any())})"
        assert opt.scalar_state["step"].item() == steps
        assert opt.param_groups[0]["lr"] == 0.01
        checked = len(want)
        if resave is not None:
            dcp.save({"model": local.state_dict(), "optim": optimizer_state(local, opt, topo.layout)},
                     storage_writer=dcp.FileSystemWriter(resave), planner=sp)
    else:
        opt = torch.optim.Adam(local.parameters(), lr=0.5)
        # a plain Adam has no fp32 master weights: they are the only keys left unread
        lp = dcp_ext.ReshardLoadPlanner(topo.layout, strict=False)
        dcp.load({"model": local.state_dict(), "optim": optimizer_state(local, opt, topo.layout)},
                 storage_reader=dcp.FileSystemReader(path), planner=lp)
        unexpected = set(lp.report.unexpected_keys)
        assert unexpected and all(k.endswith(".master") for k in unexpected), sorted(unexpected)[:5]
        assert not lp.report.missing_keys and not lp.report.shape_mismatches
        checked = 0
        for lf, p in local.named_parameters():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][name], topo.slice_global(lf, full[name][names[lf]])), (lf, name)
                checked += 1
            assert opt.state[p]["step"].item() == steps
    rp = dict(ref.named_parameters())
    for lf, p in local.named_parameters():
        assert p.dtype == getattr(torch, dtype), (lf, p.dtype)
        assert torch.equal(p.detach(), topo.slice_global(lf, rp[names[lf]].detach())), f"param {lf} differs"
    return checked


def zero_resume_same(path: str, grid, n: int, m: int) -> int:
    """(b) for ZeRO: train n, save, train m == fresh ZeroAdam + load + train m, bit for bit."""
    topo = Topo(*grid)
    alignment, bucket = 4, 100

    def run(local, opt, ref, ref_opt, steps):
        for s in steps:
            x, y = batch(s)
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            push_grads(topo, ref, local, names)
            ref_opt.step()
            opt.step()

    ref, ref_opt, _ = ref_zero(0)
    local, names = build_local(topo, ref)
    opt = make_zero(topo, list(local.named_parameters()), alignment, bucket)
    run(local, opt, ref, ref_opt, range(n))
    sp, lp = planners(topo)
    dcp.save({"model": local.state_dict(), "optim": optimizer_state(local, opt, topo.layout)},
             storage_writer=dcp.FileSystemWriter(path), planner=sp)
    ref_n = copy.deepcopy(ref.state_dict()), ref_opt.snapshot()
    run(local, opt, ref, ref_opt, range(n, n + m))
    final = {k: v.detach().clone() for k, v in local.state_dict().items()}

    ref2, ref2_opt, _ = ref_zero(0)
    ref2.load_state_dict(ref_n[0])
    ref2_opt.restore(ref_n[1])
    local2, _ = build_local(topo, ref2, seed_offset=11)
    opt2 = make_zero(topo, list(local2.named_parameters()), alignment, bucket)
    dcp.load({"model": local2.state_dict(), "optim": optimizer_state(local2, opt2, topo.layout)},
             storage_reader=dcp.FileSystemReader(path), planner=lp)
    run(local2, opt2, ref2, ref2_opt, range(n, n + m))
    for k, v in local2.state_dict().items():
        assert torch.equal(v, final[k]), f"{k} diverged after ZeRO resume"
    return len(final)


def fsdp2_ours(path: str) -> int:
    """optimizer_state on an FSDP2 (DTensor) model: DTensor states pass through to DCP and load exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        m = Net(n_layers=2, seed=seed)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in m.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m, make_opt("adamw", list(m.named_parameters()))

    a, a_opt = build(1)
    for s in range(2):
        x, y = batch(s)
        a_opt.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        a_opt.step()
    lay = dcp_ext.ParallelLayout(dp_rank=dist.get_rank(), dp_size=dist.get_world_size())
    dcp.save({"optim": optimizer_state(a, a_opt, lay)}, storage_writer=dcp.FileSystemWriter(path),
             planner=dcp_ext.ReshardSavePlanner(lay))
    b, b_opt = build(2)
    dcp.load({"optim": optimizer_state(b, b_opt, lay)}, storage_reader=dcp.FileSystemReader(path),
             planner=dcp_ext.ReshardLoadPlanner(lay))
    n = 0
    for (fa, pa), (fb, pb) in zip(a.named_parameters(), b.named_parameters()):
        for k, v in a_opt.state[pa].items():
            w = b_opt.state[pb][k]
            assert type(w).__name__ == type(v).__name__, (fa, k, type(w))
            full_v = v.full_tensor() if hasattr(v, "full_tensor") else v
            full_w = w.full_tensor() if hasattr(w, "full_tensor") else w
            assert torch.equal(full_v, full_w), (fa, k)
            n += 1
    return n
