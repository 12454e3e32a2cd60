"""Functions run on gloo ranks by tests/test_manager.py (must be importable)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dcp_ext


def expected_state(step: int, rank: int) -> dict:
    """The state every test trains to at ``step`` (computed independently of the manager)."""
    return {"shared": torch.full((1024,), float(step)),
            f"own{rank}": torch.arange(4096, dtype=torch.float32) + 1000 * rank + step,
            "step": step}


def _blank(rank: int) -> dict:
    return {"shared": torch.zeros(1024), f"own{rank}": torch.zeros(4096), "step": -1}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def train_save_load(root: str, steps: int, manager_kw: dict, opts: dict) -> dict:
    """Train ``steps`` steps saving through a manager (training collectives on the default group
    between saves), then reload the newest step into a blank state on every rank."""
    rank = dist.get_rank()
    mgr = dcp_ext.CheckpointManager(root, **manager_kw, **opts)
    state = _blank(rank)
    saved = []
    for step in range(1, steps + 1):
        new = expected_state(step, rank)
        for k, v in new.items():  # in place, as an optimizer would
            if isinstance(v, torch.Tensor):
                state[k].copy_(v)
            else:
                state[k] = v
        t = torch.ones(1)
        dist.all_reduce(t)  # the training job's own collective, while an async upload may run
        assert t.item() == dist.get_world_size()
        if mgr.save(step, state, metrics={"loss": 100.0 - step}):
            saved.append(step)
    mgr.wait()
    steps_seen = mgr.all_steps()
    latest = mgr.latest_step()
    fresh = _blank(rank)
    loaded = mgr.load(fresh)
    ok = _equal(fresh, expected_state(loaded, rank))
    info = mgr.info(loaded)
    mgr.close()
    return {"saved": saved, "steps": steps_seen, "latest": latest, "loaded": loaded, "exact": ok,
            "metrics": info.metrics if info else None, "world": info.world_size if info else None}


def load_step(root: str, step: int | None, manager_kw: dict, opts: dict) -> dict:
    rank = dist.get_rank()
    mgr = dcp_ext.CheckpointManager(root, **manager_kw, **opts)
    fresh = _blank(rank)
    loaded = mgr.load(fresh, step)
    mgr.close()
    return {"loaded": loaded, "exact": loaded is not None and _equal(fresh, expected_state(loaded, rank))}


def save_into_a_blocked_step(root: str) -> str:
    """Rank 0 cannot create the step directory (a file is in the way): every rank gets the error,
    none is left waiting in a collective."""
    mgr = dcp_ext.CheckpointManager(root)
    try:
        mgr.save(2, expected_state(2, dist.get_rank()))
        return "saved"
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    finally:
        mgr.close()


def groups_freed_at_close(root: str, manager_kw: dict) -> dict:
    """Save and load through a manager, close it, and report whether its own process groups are
    gone by then (freed by close, not whenever the manager object happens to be collected)."""
    import weakref

    rank = dist.get_rank()
    mgr = dcp_ext.CheckpointManager(root, **manager_kw)
    refs = [weakref.ref(g) for g in (mgr._pg, mgr._save_pg)]
    mgr.save(1, expected_state(1, rank), force=True)
    fresh = _blank(rank)
    loaded = mgr.load(fresh)
    mgr.close()
    alive = [r() is not None for r in refs]
    return {"loaded": loaded, "exact": _equal(fresh, expected_state(1, rank)), "alive": alive}


def free_group_with_a_collective_in_flight() -> dict:
    """Rank 0 frees a gloo group while its all_gather still waits for rank 1, having let go of
    the collective's tensors: on torch < 2.8, freeing the ProcessGroup with the GIL held hung
    for good (its worker then needs the GIL to free those tensors). The list holds the only
    reference, so the group is freed inside destroy_process_groups (nothing stays parked)."""
    from dcp_ext import torch_compat

    groups = [dist.new_group(backend="gloo")]
    out = [torch.zeros(4) for _ in range(2)]
    mine = torch.full((4,), float(dist.get_rank() + 1))
    if dist.get_rank() == 0:
        dist.all_gather(out, mine, group=groups[0], async_op=True)  # the work alone holds the tensors now
        del out, mine
        dist.barrier()  # rank 1 joins the all_gather once rank 0 is about to free the group
        torch_compat.destroy_process_groups(groups)
        return {"gathered": None, "parked": len(torch_compat._PARKED)}
    dist.barrier()
    dist.all_gather(out, mine, group=groups[0])
    torch_compat.destroy_process_groups(groups)
    return {"gathered": [t.tolist() for t in out], "parked": len(torch_compat._PARKED)}
