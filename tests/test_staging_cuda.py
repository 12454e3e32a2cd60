"""PooledStager on a real CUDA device: the page-locked pool, the side-stream device-to-host
copies and the event that makes ``stage()`` return only once they are complete.

These run only where ``torch.cuda.is_available()``; elsewhere they are skipped with that reason
(``pytest -ra`` lists it). The same logic is pinned down on CPU with fakes in
``tests/test_staging.py`` ("CUDA logic, without a device"); ``benchmarks/bench_cuda_staging.py``
measures the blocking time on a GPU.

Races are made deterministic with ``torch.cuda._sleep``: a kernel that keeps the GPU busy
for a while, queued on the current stream before the tensors are written, so a stager that
ignored the current stream or returned before its copies finished would see old values.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.staging import PooledStager

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device (torch.cuda.is_available() is False): the pinned-pool / "
                                 "side-stream staging path of dcp_ext/staging.py runs only on a GPU")
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_cuda_staging.py")

SPIN = 200_000_000  # GPU cycles torch.cuda._sleep keeps the current stream busy (~0.1 s)


def _state(fill: float) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    return {"w": torch.full((2048, 1024), fill, device=dev),  # 8 MiB
            "bf16": torch.full((3, 333), fill, device=dev, dtype=torch.bfloat16),
            "nc": torch.full((64, 48), fill, device=dev).t(),  # non-contiguous
            "i64": torch.full((7,), int(fill), device=dev, dtype=torch.int64),
            "cpu": torch.full((5,), fill),  # a CPU tensor in the same state
            "step": int(fill)}


def _all_equal(staged: dict, fill: float) -> list[str]:
    return [k for k, v in staged.items() if isinstance(v, torch.Tensor)
            and not torch.equal(v, torch.full(v.shape, fill, dtype=v.dtype))]


@CUDA
def test_pool_is_page_locked_and_staged_on_the_host():
    st = PooledStager()  # pin_memory=None: pinned because CUDA is available
    assert st.pin_memory
    staged = st.stage(_state(1.0))
    assert st._pools[0].pinned
    for k, v in staged.items():
        if isinstance(v, torch.Tensor):
            assert v.device.type == "cpu" and v.is_pinned(), k
    assert _all_equal(staged, 1.0) == [] and staged["step"] == 1
    ptrs = {k: v.data_ptr() for k, v in staged.items() if isinstance(v, torch.Tensor)}
    del staged
    gc.collect()
    again = st.stage(_state(2.0))  # the same pinned buffers, new values
    assert {k: v.data_ptr() for k, v in again.items() if isinstance(v, torch.Tensor)} == ptrs
    assert _all_equal(again, 2.0) == []
    del again
    st.close()


@CUDA
def test_copies_wait_for_pending_kernels_and_finish_before_stage_returns():
    """The source is written by a kernel queued behind a long one on the current stream: the
    side stream must wait for it (else it copies the old values), and stage() must return only
    after its non-blocking copies landed (else the pool still holds the previous save)."""
    st = PooledStager()
    staged = st.stage(_state(1.0))  # the pool now holds 1s
    del staged
    gc.collect()
    state = _state(1.0)
    torch.cuda._sleep(SPIN)  # the current stream is busy for a while ...
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_cuda:
            v.fill_(3.0)  # ... then writes the new values
    state["cpu"].fill_(3.0)
    staged = st.stage(state)
    assert _all_equal(staged, 3.0) == [], "staged values are not the ones written before stage()"
    # the source may change right after stage() returned: the staged copy must not
    torch.cuda._sleep(SPIN)
    for v in state.values():
        if isinstance(v, torch.Tensor):
            v.fill_(4.0)
    torch.cuda.synchronize()
    assert _all_equal(staged, 3.0) == []
    del staged
    st.close()


@CUDA
def test_async_save_of_a_cuda_state_is_exact(tmp_path):
    """Back-to-back dcp_ext.async_save of a CUDA state mutated right after each call returns:
    every checkpoint holds the values of its call, read back through dcp_ext's reader."""
    st = PooledStager()
    state = _state(0.0)
    futs = []
    for i in range(3):
        futs.append(dcp_ext.async_save(state, async_stager=st, no_dist=True,
                                       storage_writer=dcp_ext.storage_writer(str(tmp_path / str(i)))))
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v.add_(1)  # a training step, queued at once
    for f in futs:
        f.result()
    for i in range(3):
        out = {k: (torch.zeros(v.shape, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else None)
               for k, v in state.items()}
        dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / str(i))), no_dist=True)
        bad = [k for k, v in out.items() if isinstance(v, torch.Tensor)
               and not torch.equal(v.cpu(), torch.full(v.shape, float(i), dtype=v.dtype))]
        assert bad == [] and out["step"] == 0, (i, bad)
    assert st.stats["pools_allocated"] == 1
    st.close()


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(BENCH))})


@CUDA
def test_benchmark_runs_on_the_device():
    r = _bench("--gib", "0.02", "--tensors", "8", "--rounds", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bare_pinned" in r.stdout and "pooled_async" in r.stdout and "checked against the GPU tensors: OK" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_benchmark_without_cuda_says_so():
    r = _bench()
    assert r.returncode == 2 and r.stdout == ""
    assert "bench_cuda_staging.py needs a CUDA device" in r.stderr and "torch.cuda.is_available() is False" in r.stderr
