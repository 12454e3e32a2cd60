"""Save at layout A, resume at layout B: model + ZeRO-style optimizer state, resharded by stock DCP.

Layout A: tensor parallel 2 (a Megatron-style MLP: column-parallel ``fc1``, row-parallel
          ``fc2``), each TP rank with a ``ZeroAdam`` over its local shards (DP 1).
Layout B: data parallel 2 (no TP), ``ZeroAdam`` flat buffers split over the 2 DP ranks with
          128-element alignment padding.

The script trains 3 steps at A and saves; then, at B, it loads into a freshly built model and
optimizer, checks every optimizer state slice and weight bit for bit against the full tensors
stored in the checkpoint (read back with stock DCP's ``dcp_to_torch_save``), trains 2 more
steps and checks that a single process resuming from the same checkpoint gets exactly the same
weights, and that they match a single process trained without interruption (up to the rounding
of TP=2's partial sums). Runs on CPU with gloo in a few seconds::

    python examples/resume_different_layout.py [checkpoint_dir]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import dcp_ext
from dcp_ext.layout import ParallelLayout, ShardSpec
from dcp_ext.optim import pack_flat
from dcp_ext.testing import run_on_ranks

try:  # run as a script: examples/ is on sys.path
    from zero_adam import ZeroAdam
except ImportError:  # python -m examples.resume_different_layout
    from examples.zero_adam import ZeroAdam

D_IN, HIDDEN, D_OUT = 16, 32, 4
RULES = {"*fc1.weight": ShardSpec(0), "*fc1.bias": ShardSpec(0), "*fc2.weight": ShardSpec(1)}


class _SumOverTP(torch.autograd.Function):
    """Megatron's "g": all-reduce partial outputs forward, identity backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class MLP(nn.Module):
    """fc1 column-parallel, fc2 row-parallel (its bias replicated, added after the reduction)."""

    def __init__(self, tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__()
        self.tp_size = tp_size
        g = torch.Generator().manual_seed(0)
        w1, b1 = torch.randn(HIDDEN, D_IN, generator=g) * 0.2, torch.randn(HIDDEN, generator=g) * 0.1
        w2, b2 = torch.randn(D_OUT, HIDDEN, generator=g) * 0.2, torch.randn(D_OUT, generator=g) * 0.1
        h = HIDDEN // tp_size
        self.fc1 = nn.Linear(D_IN, h)
        self.fc2 = nn.Linear(h, D_OUT, bias=False)
        self.fc2_bias = nn.Parameter(b2.clone())
        with torch.no_grad():
            self.fc1.weight.copy_(w1[tp_rank * h:(tp_rank + 1) * h])
            self.fc1.bias.copy_(b1[tp_rank * h:(tp_rank + 1) * h])
            self.fc2.weight.copy_(w2[:, tp_rank * h:(tp_rank + 1) * h])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        if self.tp_size > 1:
            y = _SumOverTP.apply(y)
        return y + self.fc2_bias


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, D_IN, generator=g), torch.randn(8, D_OUT, generator=g)


def train(model: nn.Module, opt: ZeroAdam, steps: range) -> None:
    for s in steps:
        x, y = batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def state_of(model: nn.Module, opt: ZeroAdam, layout: ParallelLayout, no_dist: bool = False) -> dict:
    return {"model": model.state_dict(), "optim": dcp_ext.optimizer_state(model, opt, layout, no_dist=no_dist)}


def layout_a_save(path: str) -> None:
    """TP 2: every rank is one TP rank (DP 1), ZeroAdam over its local shards."""
    rank = dist.get_rank()
    layout = ParallelLayout(tp_rank=rank, tp_size=2, rules=RULES)
    model = MLP(tp_size=2, tp_rank=rank)
    opt = ZeroAdam(list(model.named_parameters()), lr=0.01, weight_decay=0.01)
    train(model, opt, range(3))
    dcp.save(state_of(model, opt, layout), storage_writer=dcp.FileSystemWriter(path),
             planner=dcp_ext.ReshardSavePlanner(layout))


def resume(path: str, full: dict, steps: int, world: int, rank: int) -> dict[str, torch.Tensor]:
    """DP ``world``: fresh model + ZeroAdam, load, verify against the checkpoint, train ``steps``."""
    layout = ParallelLayout(dp_rank=rank, dp_size=world, rules=RULES)
    torch.manual_seed(1234 + rank)  # fresh, different weights: everything must come from the checkpoint
    model = MLP()
    for p in model.parameters():
        nn.init.normal_(p)
    opt = ZeroAdam(list(model.named_parameters()), dp_size=world, dp_rank=rank, alignment=128, lr=0.5)
    dcp.load(state_of(model, opt, layout, no_dist=world == 1), storage_reader=dcp.FileSystemReader(path),
             planner=dcp_ext.ReshardLoadPlanner(layout), no_dist=world == 1)

    for name, buf in opt.flat_state.items():
        want = pack_flat(opt.flat_spec, {f: full["optim"]["state"][f][name] for f, _ in model.named_parameters()})
        assert torch.equal(buf, want), f"{name} slice differs on rank {rank}"
    for f, p in model.named_parameters():
        assert torch.equal(p.detach(), full["model"][f]), f
    assert opt.scalar_state["step"].item() == 3 and opt.param_groups[0]["lr"] == 0.01

    train(model, opt, range(3, 3 + steps))
    return {f: p.detach().clone() for f, p in model.named_parameters()}


def layout_b_resume(path: str, full_path: str, steps: int) -> bool:
    """DP 2 resume; rank 0 then also resumes alone (DP 1, no_dist) and compares the weights."""
    full = torch.load(full_path, weights_only=False)  # every global tensor, read by stock DCP
    got = resume(path, full, steps, dist.get_world_size(), dist.get_rank())
    if dist.get_rank() == 0:
        single = resume(path, full, steps, 1, 0)
        for f in single:
            assert torch.equal(got[f], single[f]), f"{f}: DP=2 resume differs from a single-process resume"
        # independent of the checkpoint: one process trained 3 + steps steps without interruption at
        # TP=1. TP=2 sums fc2's partial products in another order, so equal up to rounding (~1e-7;
        # one step moves the weights by ~1e-2).
        model = MLP()
        opt = ZeroAdam(list(model.named_parameters()), lr=0.01, weight_decay=0.01)
        train(model, opt, range(3 + steps))
        for f, p in model.named_parameters():
            assert torch.allclose(got[f], p.detach(), rtol=1e-5, atol=1e-6), \
                f"{f}: resumed run differs from the uninterrupted one by {(got[f] - p).abs().max().item():.3g}"
    return True


def main(root: str) -> None:
    path, full_path = os.path.join(root, "ckpt"), os.path.join(root, "full.pt")
    run_on_ranks(layout_a_save, 2, path)
    print(f"saved at layout A (TP=2, ZeroAdam per TP rank) -> {path}")

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, full_path)  # stock DCP reads the resharding checkpoint as global tensors
    run_on_ranks(layout_b_resume, 2, path, full_path, 2)
    print("resumed at layout B (DP=2, flat buffers split over 2 ranks): every state slice matches")
    print("2 more steps at DP=2 == 2 more steps in one process, bit for bit: OK")
    print("and == an uninterrupted 5-step run at TP=1 (up to TP=2's rounding): OK")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.makedirs(sys.argv[1], exist_ok=True)
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
