"""Shared by the examples: a tiny model, deterministic data, a data-parallel training step, the
state to checkpoint, and a launcher that runs a function on N local gloo ranks (or under torchrun).

Nothing here is dcp-ext specific except that the state is what the examples hand to
``dcp_ext.CheckpointManager``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``rank`` at ``step``: a function of both only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """One data-parallel step (gradients averaged over ranks); returns the mean loss over ranks."""
    x, y = batch(step, dist.get_rank())
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    world = dist.get_world_size()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return (mean / world).item()


class AppState(Stateful):
    """Model + optimizer as one DCP ``Stateful`` (the pattern of the DCP tutorial)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def build() -> tuple[nn.Module, torch.optim.Optimizer, AppState]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, AppState(model, opt)


def say(*args: Any) -> None:
    """Print on rank 0 only, at once (the tests read the output as it comes)."""
    if dist.get_rank() == 0:
        print(*args, flush=True)


def example_parser(doc: str, *, steps: int, interval: int, sleep: float) -> argparse.ArgumentParser:
    """The options every training example takes (``--dir``, ``--steps``, ``--interval``,
    ``--nproc``, ``--sleep``), with the example's defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="checkpoint root (any dcp-ext URL)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--interval", type=int, default=interval, help="save every N steps")
    ap.add_argument("--nproc", type=int, default=2, help="local ranks (ignored under torchrun)")
    ap.add_argument("--sleep", type=float, default=sleep, help="seconds to pause per step (time to kill or signal it)")
    return ap


# -- launcher ----------------------------------------------------------------------------------

def _rank_main(fn: Callable[..., Any], rank: int, world: int, store: str, args: Any) -> None:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)  # not the launcher's forwarding handler
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, args: Any) -> int:
    """Run ``fn(args)`` on ``nproc`` gloo ranks: under ``torchrun`` (``RANK`` set) in this process,
    else in ``nproc`` forked processes rendezvousing through a file. Signals sent to the launcher
    are passed on to the ranks. Returns the first non-zero exit code of a rank (or 0)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        try:
            fn(args)
        finally:
            dist.destroy_process_group()
        return 0
    with tempfile.TemporaryDirectory(prefix="dcp_ext_example_") as d:
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, nproc, os.path.join(d, "store"), args))
                 for r in range(nproc)]
        for p in procs:
            p.start()

        def forward(signum: int, _frame: Any) -> None:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signum)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, forward)
        failed_at = None
        while any(p.is_alive() for p in procs):
            time.sleep(0.05)
            bad = [p for p in procs if p.exitcode not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 30:  # a rank died: don't hang
                for p in procs:
                    if p.is_alive():
                        p.kill()
        for p in procs:
            p.join()
        code = next((p.exitcode for p in procs if p.exitcode), 0)
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    sys.exit("this module is imported by the examples")
