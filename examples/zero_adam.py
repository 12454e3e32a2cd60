"""ZeroAdam: a small ZeRO-1 style Adam(W) whose state ``dcp_ext.optimizer_state`` checkpoints.

An example, not part of the dcp_ext package: it shows the interface a flat-buffer optimizer
offers to be checkpointed and resharded (``flat_spec``, ``flat_state``, ``scalar_state``,
``param_groups``, ``after_load``; see docs/optimizer.md), and it is kept simple rather than fast
(one all-reduce per parameter gradient, an all-reduce of the whole weights instead of an
all-gather, a single parameter group, no overlap with the backward pass). Copy and adapt it, or
give your own distributed optimizer the same attributes. ``resume_different_layout.py`` and the
test suite use it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dcp_ext.optim import FlatBufferSpec, OptimizerStateError, pack_flat, unpack_flat

__all__ = ["ZeroAdam"]


class ZeroAdam:
    """ZeRO-1 style Adam/AdamW: each DP rank keeps fp32 master weights and Adam moments only for
    its slice of one flat buffer (described by :class:`FlatBufferSpec`).

    ``step()`` (optionally) averages gradients over the DP group, updates this rank's slice
    and all-gathers the updated weights into every rank's parameters. The arithmetic uses only
    correctly rounded element-wise operations, so results do not depend on how the buffer is
    sliced: a run at any DP size is bit-identical to the same run at DP 1. It is a reference for
    checkpointing flat buffers (``dcp_ext.optimizer_state`` presents its state as pieces of the
    global parameters), kept simple rather than fast.

    ``group`` is the DP process group (``None``: the default group, which must then be exactly
    the DP ranks); no collective runs when ``dp_size == 1``. ``average_grads=False`` skips the
    gradient all-reduce (when every DP rank already holds the same gradients).
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], *, dp_size: int = 1,
                 dp_rank: int = 0, group: object | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 alignment: int = 1, bucket_numel: int | None = None, average_grads: bool = True) -> None:
        self.params = dict(named_params)
        if len(self.params) != len(named_params):
            raise OptimizerStateError("ZeroAdam got the same parameter FQN twice")
        self.flat_spec = FlatBufferSpec.build([(f, tuple(p.shape)) for f, p in self.params.items()],
                                              dp_size=dp_size, dp_rank=dp_rank, alignment=alignment,
                                              bucket_numel=bucket_numel)
        self.group = group
        self.average_grads = average_grads
        with torch.no_grad():
            master = pack_flat(self.flat_spec, {f: p.detach().float() for f, p in self.params.items()},
                               dtype=torch.float32)
        self.flat_state = {"master": master, "exp_avg": torch.zeros_like(master),
                           "exp_avg_sq": torch.zeros_like(master)}
        self.scalar_state = {"step": torch.tensor(0.0)}
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _dp_world(self) -> int:
        return self.flat_spec.dp_size

    @torch.no_grad()
    def step(self) -> None:
        """One Adam(W) step on this rank's slice, then all-gather the weights into the params."""
        import torch.distributed as dist

        grads = {f: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for f, p in self.params.items()}
        world = self._dp_world()
        if self.average_grads and world > 1:
            for f in grads:
                grads[f] = grads[f].clone()
                dist.all_reduce(grads[f], group=self.group)
                grads[f].div_(world)
        g = pack_flat(self.flat_spec, grads, dtype=torch.float32)
        hp = self.param_groups[0]
        lr, (b1, b2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
        st = self.flat_state
        self.scalar_state["step"].add_(1)
        step = float(self.scalar_state["step"].item())
        master, m, v = st["master"], st["exp_avg"], st["exp_avg_sq"]
        if wd:
            master.mul_(1 - lr * wd)
        m.mul_(b1)
        m.add_(g * (1 - b1))
        v.mul_(b2)
        v.add_((g * g) * (1 - b2))
        bc1 = 1 - b1 ** step
        bc2 = math.sqrt(1 - b2 ** step)
        denom = v.sqrt() / bc2 + eps
        master.sub_((m / denom) * (lr / bc1))
        self._gather_params()

    @torch.no_grad()
    def _gather_params(self) -> None:
        """Write every rank's master slice into all ranks' parameters (zeros + sum = exact)."""
        import torch.distributed as dist

        spec = self.flat_spec
        full = torch.zeros(spec.numel, dtype=torch.float32)
        pos = 0
        for a, b in spec.ranges:
            full[a:b] = self.flat_state["master"][pos:pos + b - a]
            pos += b - a
        if self._dp_world() > 1:
            dist.all_reduce(full, group=self.group)
        whole = FlatBufferSpec(spec.params, spec.numel, ((0, spec.numel),), spec.buckets, spec.alignment)
        tmp = {f: torch.empty(p.shape, dtype=torch.float32) for f, p in self.params.items()}
        unpack_flat(whole, full, tmp)
        for f, p in self.params.items():
            p.copy_(tmp[f])

    def after_load(self) -> None:
        """Called by :class:`OptimizerState` after ``dcp.load``: refresh params from the master weights."""
        self._gather_params()
