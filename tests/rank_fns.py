"""Module-level functions run on gloo ranks by the harness tests (must be importable)."""

import torch
import torch.distributed as dist


def allreduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank(bad: int) -> int:
    if dist.get_rank() == bad:
        raise ValueError(f"boom on {bad}")
    return dist.get_rank()


def hang_in_collective(bad: int) -> None:
    if dist.get_rank() == bad:
        raise RuntimeError("rank failed before the collective")
    dist.barrier()


def sleep_forever() -> None:
    import time

    time.sleep(3600)


def env_and_cwd(name: str) -> tuple:
    import os
    import sys

    return os.environ.get(name), os.getcwd(), sys.path[:], dist.get_rank()
