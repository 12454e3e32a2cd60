"""A tensor over 2 GiB (and over 2**31 elements): saved, loaded whole and loaded ranged, with
checksums verified, on local disk. Offsets, lengths and element counts past 2**31 are where
32-bit arithmetic breaks (and Linux returns short reads past 0x7ffff000 bytes per call).

The values follow a pattern that any box can recompute (so the 2 GiB source need not be kept
next to the 2 GiB loaded copy): peak memory is about one copy of the tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcp_ext

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROWS, COLS = 32768, 65539  # uint8: 2,147,581,952 bytes and elements, just over 2**31
TILE = 1_048_573  # a prime number of random bytes, repeated: any shift or swap of data shows


def _tile() -> torch.Tensor:
    return torch.randint(0, 256, (TILE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(19))


def pattern(r0: int, r1: int, c0: int = 0, c1: int = COLS) -> torch.Tensor:
    """The values of rows [r0, r1) x columns [c0, c1): flat element i holds ``tile[i % TILE]``."""
    flat = torch.arange(r0, r1)[:, None] * COLS + torch.arange(c0, c1)[None, :]
    return _tile()[flat % TILE]


def _tiles(flat: torch.Tensor):
    """(slice of ``flat``, the tile it must hold) covering the whole flat tensor."""
    tile = _tile()
    for off in range(0, flat.numel(), TILE):
        n = min(TILE, flat.numel() - off)
        yield flat[off:off + n], tile[:n]


def make_tensor() -> torch.Tensor:
    t = torch.empty(ROWS, COLS, dtype=torch.uint8)
    for part, want in _tiles(t.view(-1)):
        part.copy_(want)
    return t


def differing_tiles(t: torch.Tensor) -> list[int]:
    """Indices of the TILE-byte stretches of ``t`` that do not hold the pattern (compared as
    bytes: memcmp, about 20x faster than torch.equal on these machines)."""
    return [i for i, (part, want) in enumerate(_tiles(t.view(-1)))
            if part.numpy().tobytes() != want.numpy().tobytes()]


@pytest.fixture
def one_thread():
    """torch ops on one thread: on a loaded 2-core machine two spinning threads make each small
    copy or compare 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BoxPlanner(DefaultLoadPlanner):
    """Load rows [r0, r1) x columns [c0, c1) of the single-chunk tensor ``w`` (a ranged read)."""

    def __init__(self, r0: int, r1: int, c0: int, c1: int):
        super().__init__()
        self.box = (r0, r1, c0, c1)
        self.out = torch.zeros(r1 - r0, c1 - c0, dtype=torch.uint8)

    def create_local_plan(self) -> LoadPlan:
        r0, r1, c0, c1 = self.box
        chunk = self.metadata.state_dict_metadata["w"].chunks[0]
        return LoadPlan([ReadItem(LoadItemType.TENSOR, MetadataIndex("w", (0, 0)), torch.Size([0, 0]),
                                  MetadataIndex("w", chunk.offsets), torch.Size([r0, c0]),
                                  torch.Size([r1 - r0, c1 - c0]))])

    def resolve_tensor(self, read_item):
        return self.out

    def commit_tensor(self, read_item, tensor):
        pass


def _reset_peak_rss() -> bool:
    """Linux: restart the process's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def test_tensor_over_2_gib_saved_and_loaded_whole_and_ranged(tmp_path, one_thread):
    assert ROWS * COLS > 2**31
    measure = _reset_peak_rss()
    path = str(tmp_path / "big")
    src = make_tensor()
    # (no fsync: what is tested is the arithmetic of large offsets, not the disk)
    dcp.save({"w": src, "step": 1}, storage_writer=dcp_ext.storage_writer(path, io_threads=2, fs={"fsync": False}))
    del src

    # a ranged read of a few rows straddling byte 2**31, one of a column band past it (strided
    # spans), and one at the very end
    boundary_row = 2**31 // COLS
    for r0, r1, c0, c1 in [(boundary_row - 1, boundary_row + 2, 0, COLS), (ROWS - 40, ROWS - 8, 1000, 1333),
                           (ROWS - 3, ROWS, COLS - 5000, COLS)]:
        p = BoxPlanner(r0, r1, c0, c1)
        reader = dcp_ext.storage_reader(path)
        dcp.load({"w": torch.empty(0, dtype=torch.uint8)}, storage_reader=reader, planner=p)
        assert torch.equal(p.out, pattern(r0, r1, c0, c1)), (r0, r1, c0, c1)
        need = (r1 - r0) * (c1 - c0)
        assert reader.stats.bytes_needed == need
        assert reader.stats.bytes_read <= (r1 - r0) * COLS + 2 * 1024 * 1024, reader.stats  # ranged, not whole

    # the whole tensor, verified
    target = {"w": torch.empty(ROWS, COLS, dtype=torch.uint8), "step": 0}
    dcp.load(target, storage_reader=dcp_ext.storage_reader(path))
    assert target["step"] == 1
    bad = differing_tiles(target["w"])
    assert not bad, f"{len(bad)} stretches of {TILE} bytes differ, the first at byte {bad[0] * TILE}"
    if measure:  # one 2 GiB copy at a time, plus buffers
        assert _peak_rss_gib() < 4, f"peak RSS {_peak_rss_gib():.1f} GiB"
