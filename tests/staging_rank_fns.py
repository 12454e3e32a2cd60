"""Functions run on gloo ranks by tests/test_staging.py (module-level, importable)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dcp_ext
from dcp_ext.staging import PooledStager


class SlowWriter(FileSystemWriter):
    """A FileSystemWriter whose uploads take a while: sleeps before reading the staged data."""

    def __init__(self, path: str, delay: float) -> None:
        super().__init__(path)
        self.delay = delay

    def write_data(self, plan, planner):  # type: ignore[override]
        time.sleep(self.delay)
        return super().write_data(plan, planner)


class GatedWriter(FileSystemWriter):
    """A FileSystemWriter whose upload starts reading the staged data only once ``release()``
    is true: a test holds an upload "in flight" until the next save has provably arrived
    (no sleeps, so the outcome cannot depend on how loaded the machine is)."""

    def __init__(self, path: str, release, max_s: float = 300.0) -> None:
        super().__init__(path)
        self.release = release
        self.max_s = max_s

    def write_data(self, plan, planner):  # type: ignore[override]
        deadline = time.monotonic() + self.max_s
        while not self.release():
            if time.monotonic() > deadline:
                raise TimeoutError(f"GatedWriter({self.path}): not released within {self.max_s}s")
            time.sleep(0.005)
        return super().write_data(plan, planner)


class RecordingStager(PooledStager):
    """PooledStager that remembers the data_ptr of every staged plain tensor, per save."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.ptrs: list[list[int]] = []

    def stage(self, state_dict):  # type: ignore[override]
        staged = super().stage(state_dict)
        ptrs: list[int] = []
        _walk(staged, lambda t: ptrs.append(t.data_ptr()))
        self.ptrs.append(ptrs)
        return staged


def _walk(x: Any, fn) -> None:
    if isinstance(x, DTensor):
        fn(x._local_tensor)
    elif isinstance(x, torch.Tensor):
        fn(x)
    elif isinstance(x, dict):
        for v in x.values():
            _walk(v, fn)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _walk(v, fn)


def make_state(with_dtensor: bool = True) -> dict[str, Any]:
    """Per-rank state: plain, nested, tied, non-tensor values and (optionally) a sharded DTensor."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1234 + rank)
    w = torch.randn(64, 33, generator=g)
    sd: dict[str, Any] = {
        f"rank{rank}.w": w,
        f"rank{rank}.w_tied": w,  # the same tensor under a second key
        f"rank{rank}.opt": {
            "exp_avg": torch.randn(257, generator=g, dtype=torch.float64),
            "step": torch.tensor(7, dtype=torch.int64),
            "mask": torch.rand(5, 5, generator=g) > 0.5,
            "half": torch.randn(3, 7, generator=g).to(torch.bfloat16),
            "lr": 0.1,
        },
        f"rank{rank}.list": [torch.arange(10, dtype=torch.int32), "tag", 3],
        f"rank{rank}.nc": torch.randn(8, 6, generator=g).t(),  # non-contiguous source
        f"rank{rank}.empty": torch.empty(0, 4),
        "meta": {"step": 0, "name": "run"},
    }
    if with_dtensor:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        full = torch.arange(48 * 5, dtype=torch.float32).reshape(48, 5)  # same on every rank
        sd["dt"] = distribute_tensor(full, mesh, [Shard(0)])
    return sd


def snapshot(sd: Any) -> Any:
    """A deep copy of the values as they are now (the single-process reference)."""
    if isinstance(sd, DTensor):
        # the local shard only: a collective here would race with the upload thread's collectives
        return ("dtensor", sd.to_local().clone(), tuple(sd.shape))
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    if isinstance(sd, dict):
        return {k: snapshot(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [snapshot(v) for v in sd]
    return sd


def mutate(sd: dict[str, Any], i: int) -> None:
    """Change every value in place, as a training step would."""
    def bump(t: torch.Tensor) -> None:
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(i + 1)

    _walk(sd, bump)
    sd["meta"]["step"] = i + 1
    rank = dist.get_rank()
    sd[f"rank{rank}.opt"]["lr"] = 0.1 * (i + 2)


def _zeros_like_state(sd: Any) -> Any:
    if isinstance(sd, DTensor):
        return DTensor.from_local(torch.full_like(sd.to_local(), -1), sd.device_mesh, sd.placements,
                                  run_check=False, shape=sd.shape, stride=sd.stride())
    if isinstance(sd, torch.Tensor):
        return torch.full_like(sd, -1) if sd.dtype != torch.bool else torch.zeros_like(sd)
    if isinstance(sd, dict):
        return {k: _zeros_like_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_zeros_like_state(v) for v in sd]
    if isinstance(sd, str):
        return ""
    if isinstance(sd, float):
        return -1.0
    if isinstance(sd, int):
        return -1
    return sd


def compare(loaded: Any, ref: Any, path: str = "") -> list[str]:
    """Paths whose loaded value differs from the reference (torch.equal / ==)."""
    bad: list[str] = []
    if isinstance(ref, tuple) and ref and ref[0] == "dtensor":
        if not (torch.equal(loaded.to_local(), ref[1]) and tuple(loaded.shape) == ref[2]):
            bad.append(path)
    elif isinstance(ref, torch.Tensor):
        if not (loaded.dtype == ref.dtype and torch.equal(loaded, ref)):
            bad.append(path)
    elif isinstance(ref, dict):
        for k in ref:
            bad += compare(loaded[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        for i, v in enumerate(ref):
            bad += compare(loaded[i], v, f"{path}.{i}")
    elif loaded != ref:
        bad.append(f"{path} ({loaded!r} != {ref!r})")
    return bad


def load_and_compare(path: str, template: dict[str, Any], ref: Any, ext: bool = False) -> list[str]:
    out = _zeros_like_state(template)
    dcp.load(out, storage_reader=dcp_ext.storage_reader(path) if ext else FileSystemReader(path))
    return compare(out, ref)


def save_mutate_check(root: str, *, n_saves: int = 3, delay: float = 0.0, mode: str = "wrapper",
                      executor: str = "thread", stager_kw: dict | None = None, gated: bool = False,
                      with_dtensor: bool = True, wait_each: bool = False, ext_writer: bool = False) -> dict[str, Any]:
    """Back-to-back async saves; the state is mutated right after each call returns.

    gated (thread executor): upload ``i`` starts only once save ``i + 1`` has arrived at the
    stager and either waits for a pool or has staged into another one, so every save but the
    last finds the previous upload still in flight, deterministically.

    mode: "wrapper" (dcp_ext.async_save), "stock" (dcp.async_save, untracked lease),
    "track" (dcp.async_save + stager.track), "default_reused" (one stock DefaultStager reused
    across saves, no PooledStager: the control that shows what overwriting looks like).
    Returns per-rank: mismatching paths per checkpoint, data_ptrs per save, stager stats.
    """
    sd = make_state(with_dtensor)
    ex = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
    if executor == "process":
        # The harness's rank workers are daemonic, and multiprocessing forbids daemonic
        # processes to start children; DCP's checkpoint daemon is such a child. Real trainers
        # (torchrun workers) are not daemonic, so lift the flag for this test process.
        import multiprocessing

        multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    if mode == "default_reused":
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager: Any = DefaultStager(StagingOptions(False, False, False, False))
    else:
        stager = RecordingStager(**(stager_kw or {}))
    refs, futs = [], []
    waits_after: dict[int, int] = {}  # save i -> the stager's wait count once save i had staged

    def next_save_arrived(i: int) -> bool:
        if i == n_saves - 1 or i not in waits_after:
            return i == n_saves - 1
        st = stager.stats
        return st["waits"] > waits_after[i] or st["stages"] >= i + 2

    for i in range(n_saves):
        refs.append(snapshot(sd))
        if ext_writer:  # dcp_ext's own storage writer
            writer: Any = dcp_ext.storage_writer(f"{root}/ckpt{i}")
        elif gated:
            assert executor == "thread" and isinstance(stager, PooledStager), "gating reads the stager's counters"
            writer = GatedWriter(f"{root}/ckpt{i}", lambda i=i: next_save_arrived(i))
        else:
            writer = SlowWriter(f"{root}/ckpt{i}", delay) if delay else FileSystemWriter(f"{root}/ckpt{i}")
        kw = dict(storage_writer=writer, async_stager=stager, async_checkpointer_type=ex)
        if mode == "wrapper":
            fut = dcp_ext.async_save(sd, **kw)
        else:
            fut = dcp.async_save(sd, **kw)
            if mode == "track":
                stager.track(fut)
        if isinstance(stager, PooledStager):
            waits_after[i] = stager.stats["waits"]
        mutate(sd, i)  # at once: the checkpoint must still hold refs[i]
        futs.append(fut)
        if wait_each:
            getattr(fut, "upload_completion", fut).result()
    for f in futs:
        getattr(f, "upload_completion", f).result()  # AsyncSaveResponse when max_pools > 1
    bad = [load_and_compare(f"{root}/ckpt{i}", sd, refs[i], ext=ext_writer) for i in range(n_saves)]
    out = {"bad": bad, "ptrs": getattr(stager, "ptrs", None), "stats": dict(getattr(stager, "stats", {}))}
    if isinstance(stager, PooledStager):
        out["pool_bytes"] = stager.pool_bytes
        out["shared"] = [p.shared for p in stager._pools]
    stager.close()
    return out


def restructure(root: str) -> dict[str, Any]:
    """Save, change the state's structure (new key, new shape), save again: pool rebuilt."""
    stager = RecordingStager()
    sd = make_state(with_dtensor=False)
    r0 = snapshot(sd)
    dcp_ext.async_save(sd, async_stager=stager, storage_writer=FileSystemWriter(f"{root}/a")).result()
    sd["extra"] = torch.arange(100, dtype=torch.int16)
    sd["meta"]["grown"] = torch.ones(3, 3)
    rank = dist.get_rank()
    sd[f"rank{rank}.w"] = torch.randn(10, 10)  # replaced tensor, new shape
    r1 = snapshot(sd)
    dcp_ext.async_save(sd, async_stager=stager, storage_writer=FileSystemWriter(f"{root}/b")).result()
    bad = [load_and_compare(f"{root}/a", _template_of(r0), r0), load_and_compare(f"{root}/b", _template_of(r1), r1)]
    out = {"bad": bad, "stats": dict(stager.stats), "n_pools": len(stager._pools)}
    stager.close()
    return out


def _template_of(ref: Any) -> Any:
    if isinstance(ref, torch.Tensor):
        return ref
    if isinstance(ref, dict):
        return {k: _template_of(v) for k, v in ref.items()}
    if isinstance(ref, list):
        return [_template_of(v) for v in ref]
    return ref
