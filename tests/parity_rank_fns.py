"""The parity suite's state dicts, entry points and comparisons (tests/test_parity.py).

One *cell* of the matrix is an entry point (``dcp.save``, ``async_save`` ...) on a backend (local,
memory fsspec, S3, GCS): the same state dict is saved by stock DCP's writer and by ours, and each
checkpoint is loaded by stock's reader and by ours, so all four directions (stock -> stock,
ours -> ours, ours -> stock, stock -> ours) are compared, value for value and byte for byte, with
the source state itself (the expectation computed here, independently of the code under test)
and with each other. Module-level functions so that gloo ranks (and DCP's checkpoint process)
can import them.
"""

from __future__ import annotations

import io
import math
import os
import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

import dcp_ext
from tests.support.torch_features import stock_loads_dtype

WAYS = (("stock", "stock"), ("ours", "ours"), ("ours", "stock"), ("stock", "ours"))


# ------------------------------------------------------------------------------------ dtypes
def dcp_dtypes() -> list[torch.dtype]:
    """Every dtype torch defines that DCP accepts, from torch itself: stock's planner sizes items
    with ``torch._utils._element_size``, which refuses the bit and sub-byte placeholder dtypes
    (``bits8``, ``uint3`` ...); quantized dtypes are covered apart (they need scales); a dtype this
    torch cannot copy (stock's load copies) is left out (``float4_e2m1fn_x2`` in torch 2.9)."""
    out = []
    for d in sorted({getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}, key=str):
        try:
            torch._utils._element_size(d)
        except (TypeError, RuntimeError):
            continue
        if str(d).startswith(("torch.qint", "torch.quint")) or not stock_loads_dtype(d):
            continue
        out.append(d)
    return out


def rejected_dtypes() -> list[torch.dtype]:
    """Dtypes torch defines that stock DCP refuses to save (and that have storage)."""
    out = []
    for d in sorted({getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}, key=str):
        try:
            torch._utils._element_size(d)
        except (TypeError, RuntimeError):
            try:
                torch.empty(2, dtype=torch.uint8).view(d)
            except (TypeError, RuntimeError):
                continue
            out.append(d)
    return out


def filled(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (any bit pattern, NaNs included; bools 0/1)."""
    n = math.prod(shape) * dtype.itemsize
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        b = b % 2
    return b.view(dtype).reshape(shape)


def zeros(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero bytes of any dtype (``torch.zeros`` lacks some of them)."""
    return torch.zeros(math.prod(shape) * dtype.itemsize, dtype=torch.uint8).view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The C-order bytes of ``t``'s values (conj/neg bits resolved)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------ state dicts
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def _dtensor(full: torch.Tensor, placements: list) -> Any:
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh()
    local = full
    for dim, p in enumerate(placements):
        if isinstance(p, Shard):
            local = full.chunk(dist.get_world_size(), dim=p.dim)[dist.get_rank()]
    return DTensor.from_local(local.clone(), mesh, placements, run_check=False, shape=full.shape,
                              stride=full.contiguous().stride())


def _sharded(full: torch.Tensor) -> Any:
    """A ShardedTensor (rows split over the ranks), if this torch still ships it."""
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import ShardMetadata, init_from_local_shards

    ws, r = dist.get_world_size(), dist.get_rank()
    rows = full.shape[0] // ws
    md = ShardMetadata([r * rows, 0], [rows, full.shape[1]], f"rank:{r}/cpu")
    return init_from_local_shards([STShard(full[r * rows:(r + 1) * rows].clone(), md)], list(full.shape))


def make_state(kinds: tuple[str, ...], seed: int = 0) -> dict[str, Any]:
    """A state dict of the given kinds; ``dtensor``/``sharded`` need a process group."""
    sd: dict[str, Any] = {}
    s = seed * 1000
    if "dtypes" in kinds:
        for i, d in enumerate(dcp_dtypes()):
            sd[f"dtype.{str(d).removeprefix('torch.')}"] = filled(d, (5, 3), s + i)
    if "scalars" in kinds:
        sd["zero_dim.f32"] = filled(torch.float32, (), s + 100)
        sd["zero_dim.i64"] = torch.tensor(-(seed + 3))
        sd["zero_dim.c64"] = torch.tensor(1 - 2j).conj()
    if "empty" in kinds:
        sd["empty.1d"] = torch.empty(0)
        sd["empty.rows"] = torch.zeros(0, 4, dtype=torch.bfloat16)
        sd["empty.cols"] = zeros(torch.float8_e4m3fn, (3, 0))
    if "views" in kinds:
        base = filled(torch.float32, (6, 10), s + 200)
        sd["view.rows"] = base[2:4]  # a slice of a larger storage, at an offset
        sd["view.col"] = base[:, 3]  # non-contiguous 1-D
        sd["view.t"] = base.t()
        sd["view.step"] = base[::2, 1::3]
        sd["view.expand"] = filled(torch.int16, (3,), s + 201).expand(4, 3)
        sd["view.channels_last"] = filled(torch.float16, (2, 3, 4, 5), s + 202).to(
            memory_format=torch.channels_last)
        tied = filled(torch.float32, (4,), s + 203)
        sd["view.tied_a"], sd["view.tied_b"] = tied, tied
    if "conj" in kinds:
        c = filled(torch.complex64, (4, 3), s + 300)
        sd["conj.c64"] = c.conj()
        sd["conj.c128"] = filled(torch.complex128, (5,), s + 301).conj()
        sd["conj.strided"] = c.conj()[::2, 1:]
        sd["conj.c32"] = filled(torch.complex32, (6,), s + 302).conj()
        sd["neg.f32"] = torch._neg_view(filled(torch.float32, (3, 2), s + 303))
        sd["neg.imag"] = filled(torch.complex64, (7,), s + 304).conj().imag  # the neg bit, via conj
        sd["neg.i32"] = torch._neg_view(torch.arange(6, dtype=torch.int32) - 2)
    if "nested" in kinds:
        sd["nested"] = {"a": {"w": filled(torch.float32, (3,), s + 400), "lst": [filled(torch.int8, (2,), s + 401),
                                                                              filled(torch.int64, (2, 2), s + 402)]},
                        "tup": (filled(torch.bfloat16, (4,), s + 403), seed + 4), "deep": {"x": {"y": {"z": 1.5}}}}
    if "objects" in kinds:
        sd["obj"] = {"int": seed + 7, "float": 0.25, "str": "adamw", "bytes": b"\x00\xffraw", "none": None,
                     "bool": True, "list": [1, "a", 2.5], "dict": {"lr": 0.1, "betas": (0.9, 0.99)},
                     "bytesio": io.BytesIO(b"in-memory file"), "size": torch.Size([2, 3]), "dtype": torch.float16}
    if "quantized" in kinds:
        sd["quant.qint8"] = torch.quantize_per_tensor(torch.linspace(-1, 1, 12), 0.01, 3, torch.qint8)
    if "dtensor" in kinds:
        from torch.distributed.tensor import Replicate, Shard

        ws = dist.get_world_size()
        sd["dtensor.rows"] = _dtensor(filled(torch.float32, (4 * ws, 6), s + 500), [Shard(0)])
        sd["dtensor.cols"] = _dtensor(filled(torch.bfloat16, (5, 2 * ws), s + 501), [Shard(1)])
        sd["dtensor.rep"] = _dtensor(filled(torch.int32, (3, 3), s + 502), [Replicate()])
    if "dtensor_conj" in kinds:  # stock's async stagers cannot stage it (torch 2.13): a kind of its own
        from torch.distributed.tensor import Shard

        sd["dtensor.conj"] = _dtensor(filled(torch.complex64, (2 * dist.get_world_size(), 3), s + 503),
                                      [Shard(0)]).conj()
    if "sharded" in kinds:
        sd["sharded.rows"] = _sharded(filled(torch.float32, (2 * dist.get_world_size(), 5), s + 600))
    return sd


def template_of(state: Any, key: str = "") -> Any:
    """What to load into: the same structure with zeroed tensors of the same layout (some of them
    deliberately non-contiguous or conj views, to cover those destinations) and object
    placeholders."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        local = zeros(state.dtype, tuple(state.to_local().shape))
        out = DTensor.from_local(local, state.device_mesh, state.placements, run_check=False, shape=state.shape,
                                 stride=state.stride())
        return out.conj() if state.is_conj() else out
    if isinstance(state, ShardedTensor):
        from torch.distributed._shard.sharded_tensor import Shard as STShard
        from torch.distributed._shard.sharded_tensor import init_from_local_shards

        shards = [STShard(torch.zeros_like(sh.tensor), sh.metadata) for sh in state.local_shards()]
        return init_from_local_shards(shards, list(state.size()))
    if isinstance(state, torch.Tensor):
        if state.is_quantized:
            return torch.quantize_per_tensor(torch.zeros(state.shape), state.q_scale(), state.q_zero_point(),
                                             state.dtype)
        if key == "view.t":  # a non-contiguous destination
            return zeros(state.dtype, tuple(reversed(state.shape))).t()
        if key in ("conj.c64", "neg.f32"):  # destinations that are conj / neg views themselves
            z = zeros(state.dtype, tuple(state.shape))
            return z.conj() if state.is_complex() else torch._neg_view(z)
        return zeros(state.dtype, tuple(state.shape))
    if isinstance(state, dict):
        return {k: template_of(v, f"{key}.{k}" if key else k) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(template_of(v, key) for v in state)
    return 0  # an object: DCP replaces the placeholder with the stored value


def snapshot(x: Any) -> Any:
    """A comparable (and picklable) description of a loaded value: tensors by dtype, shape and
    value bytes; DTensors and ShardedTensors by layout and local bytes; objects by type and value."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        return ("DTensor", str(x.placements), tuple(x.shape), snapshot(x.to_local()))
    if isinstance(x, ShardedTensor):
        return ("ShardedTensor", tuple(x.size()), [snapshot(s.tensor) for s in x.local_shards()])
    if isinstance(x, torch.Tensor):
        if x.is_quantized:
            return ("qtensor", str(x.dtype), tuple(x.shape), x.q_scale(), x.q_zero_point(), tensor_bytes(x.int_repr()))
        return ("tensor", str(x.dtype), tuple(x.shape), tensor_bytes(x))
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [snapshot(v) for v in x])
    if isinstance(x, io.BytesIO):
        return ("BytesIO", x.getvalue())
    return (type(x).__name__, x)


def md_summary(md: Any, location: str) -> dict:
    """What a reader's ``read_metadata()`` says, minus what legitimately differs between writers
    (file names and offsets): per-FQN metadata, planner data, storage keys and value types, and
    the checkpoint id (``"<location>"`` when it names the checkpoint's own location)."""
    sdm = {}
    for fqn, m in md.state_dict_metadata.items():
        if hasattr(m, "chunks"):
            sdm[fqn] = ("tensor", str(m.properties.dtype), tuple(m.size),
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
        else:
            sdm[fqn] = (type(m).__name__,)
    sm = md.storage_meta
    return {"sdm": sdm, "planner_data": md.planner_data,
            "storage_keys": sorted((i.fqn, tuple(i.offset or ())) for i in (md.storage_data or {})),
            "storage_types": sorted({type(v).__module__ + "." + type(v).__name__
                                     for v in (md.storage_data or {}).values()}),
            "checkpoint_id": None if sm is None or sm.checkpoint_id is None else
            "<location>" if os.fspath(sm.checkpoint_id) == location else os.fspath(sm.checkpoint_id)}


# --------------------------------------------------------------------------- stream transform
class ZlibTransform(StreamTransformExtension):
    """A user's own stream transform (stock's ZStandard needs a package we do not install)."""

    @staticmethod
    def registry_name() -> str:
        return "test.zlib"

    @staticmethod
    def from_descriptor(version: str) -> "ZlibTransform":
        return ZlibTransform()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output):
        class W(io.RawIOBase):
            def __init__(self):
                super().__init__()
                self.c = zlib.compressobj()

            def writable(self):
                return True

            def write(self, b):
                output.write(self.c.compress(bytes(b)))
                return len(memoryview(b))

            def close(self):
                if not self.closed:
                    output.write(self.c.flush())
                    output.close()
                super().close()

        return W()

    def transform_from(self, input):
        return io.BytesIO(zlib.decompress(input.read()))


def zlib_registry() -> ExtensionRegistry:
    reg = ExtensionRegistry()
    reg.register(ZlibTransform)
    return reg


# ----------------------------------------------------------------------- writers and readers
def writer(kind: str, backend: dict, url: str, **kw: Any) -> Any:
    """Stock's writer for the backend (``FileSystemWriter`` for ``local``, else ``FsspecWriter``
    with ``backend["stock"]`` storage options) or ours (``backend["ours"]`` options)."""
    if kind == "ours":
        return dcp_ext.storage_writer(url, overwrite=True, **backend.get("ours", {}), **kw)
    if backend["name"] == "local":
        return FileSystemWriter(url, overwrite=True, **kw)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, overwrite=True, **backend.get("stock", {}), **kw)


def reader(kind: str, backend: dict, url: str, **kw: Any) -> Any:
    if kind == "ours":  # our reader takes stock's _extension_registry too
        return dcp_ext.storage_reader(url, **backend.get("ours", {}), **kw)
    if backend["name"] == "local":
        return FileSystemReader(url, **kw)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **backend.get("stock", {}))


def _process_mode() -> Any:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    # Rank workers of the test harness are daemonic and multiprocessing forbids daemonic
    # processes to start children, which DCP's checkpoint process is; trainers (torchrun
    # workers) are not daemonic.
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # the checkpoint processes' own group: loopback
    return AsyncCheckpointerType.PROCESS


def _wait(result: Any) -> Any:
    return getattr(result, "upload_completion", result).result()


#: entry point -> (save(kind, backend, url, state), load(kind, backend, url, target))
def _save_plain(kind, backend, url, state):
    return dcp.save(state, storage_writer=writer(kind, backend, url))


def _load_plain(kind, backend, url, target):
    dcp.load(target, storage_reader=reader(kind, backend, url))


def _save_thread(kind, backend, url, state):
    return _wait(dcp.async_save(state, storage_writer=writer(kind, backend, url)))


def _save_process(kind, backend, url, state):
    return _wait(dcp.async_save(state, storage_writer=writer(kind, backend, url),
                                async_checkpointer_type=_process_mode()))


def _save_process_pooled(kind, backend, url, state):
    stager = dcp_ext.PooledStager(share_memory=True)
    try:
        return _wait(dcp_ext.async_save(state, storage_writer=writer(kind, backend, url), async_stager=stager,
                                        async_checkpointer_type=_process_mode()))
    finally:
        stager.close()


def _save_checkpoint_id(kind, backend, url, state):
    """One writer object, reused: a save to another id, then twice to ``url`` (overwrite)."""
    w = writer(kind, backend, url + "-unused")
    older = {k: v for k, v in make_state(("dtypes",), seed=99).items()}
    dcp.save(older, checkpoint_id=url + "-other", storage_writer=w)
    dcp.save(older, checkpoint_id=url, storage_writer=w)
    return dcp.save(state, checkpoint_id=url, storage_writer=w)


def _load_checkpoint_id(kind, backend, url, target):
    r = reader(kind, backend, url + "-other")  # a reader made for another checkpoint, reset to this one
    dcp.load(target, checkpoint_id=url, storage_reader=r)


def _rank_url(url: str) -> str:
    return f"{url}-rank{dist.get_rank()}" if dist.is_initialized() else url


def _save_no_dist(kind, backend, url, state):
    return dcp.save(state, storage_writer=writer(kind, backend, _rank_url(url)), no_dist=True)


def _load_no_dist(kind, backend, url, target):
    dcp.load(target, storage_reader=reader(kind, backend, _rank_url(url)), no_dist=True)


def _save_rank_local(kind, backend, url, state):
    return dcp.save(state, storage_writer=writer(kind, backend, url), use_collectives=False)


def _save_extensions(kind, backend, url, state):
    return dcp.save(state, storage_writer=writer(kind, backend, url, _extensions=[ZlibTransform()]))


def _load_extensions(kind, backend, url, target):
    kw = {"_extension_registry": zlib_registry()} if backend["name"] == "local" or kind == "ours" else {}
    dcp.load(target, storage_reader=reader(kind, backend, url, **kw))


ENTRIES: dict[str, tuple[Callable, Callable]] = {
    "save": (_save_plain, _load_plain),
    "async_thread": (_save_thread, _load_plain),
    "async_process": (_save_process, _load_plain),
    "async_process_pooled": (_save_process_pooled, _load_plain),
    "checkpoint_id": (_save_checkpoint_id, _load_checkpoint_id),
    "no_dist": (_save_no_dist, _load_no_dist),
    "rank_local": (_save_rank_local, _load_plain),
    "extensions": (_save_extensions, _load_extensions),
}


def _location(entry: str, url: str) -> str:
    return _rank_url(url) if entry == "no_dist" else url


def _md_of(kind: str, backend: dict, url: str, entry: str) -> dict:
    r = reader(kind, backend, _location(entry, url), **({"_extension_registry": zlib_registry()}
                                                        if entry == "extensions"
                                                        and (backend["name"] == "local" or kind == "ours") else {}))
    kw = {"rank": dist.get_rank() if dist.is_initialized() else 0} if entry == "rank_local" else {}
    return md_summary(r.read_metadata(**kw), _location(entry, url))


def run_cell(entry: str, backend: dict, root: str, kinds: tuple[str, ...], seed: int = 1) -> dict:
    """Save ``make_state(kinds)`` with stock's writer and with ours through ``entry``; load each
    checkpoint with both readers. Returns the expectation (the source state's snapshot) and, per
    (writer, reader), the loaded snapshot or the error text; per writer, both readers' metadata."""
    save, load = ENTRIES[entry]
    state = make_state(kinds, seed)
    expected = snapshot(state)
    out: dict[str, Any] = {"expected": expected, "loaded": {}, "saved_md": {}, "read_md": {}}
    for w in ("stock", "ours"):
        url = f"{root}/{entry}-{w}"
        md = save(w, backend, url, state)
        out["saved_md"][w] = md_summary(md, _location(entry, url)) if md is not None else None
        for r in ("stock", "ours"):
            target = template_of(state)
            try:
                load(r, backend, url, target)
                out["loaded"][f"{w}->{r}"] = snapshot(target)
            except BaseException as e:  # noqa: BLE001 - CheckpointException; compared by the test
                out["loaded"][f"{w}->{r}"] = ("error", f"{type(e).__name__}: {e}")
            try:
                out["read_md"][f"{w}->{r}"] = _md_of(r, backend, url, entry)
            except BaseException as e:  # noqa: BLE001
                out["read_md"][f"{w}->{r}"] = ("error", f"{type(e).__name__}: {e}")
    return out


# ------------------------------------------------------------------- dtypes: ranged, resharded
def reshard_dtypes(root: str, backend: dict, verify: bool = True) -> dict:
    """Every DCP dtype (and conj views of the complex ones) saved by both writers as full tensors
    and as row-sharded DTensors, loaded by both readers as column-sharded DTensors (strided ranged
    reads) and row-sharded ones (exact ranged reads): per (writer, reader), the keys whose local
    values differ from the source."""
    from torch.distributed.tensor import Shard

    ws, r = dist.get_world_size(), dist.get_rank()
    full = {str(d).removeprefix("torch."): filled(d, (4 * ws, 2 * ws + 1), 7000 + i)
            for i, d in enumerate(dcp_dtypes())}
    state = {}
    for name, t in full.items():
        state[f"plain.{name}"] = t
        state[f"rows.{name}"] = _dtensor(t, [Shard(0)])
    for name in [n for n, t in full.items() if t.is_complex()]:  # conj views, resharded as well
        full[f"conj_{name}"] = full[name].conj().resolve_conj()
        state[f"plain.conj_{name}"] = full[name].conj()
        state[f"rows.conj_{name}"] = _dtensor(full[name], [Shard(0)]).conj()
    bad: dict[str, list[str]] = {}
    ours = dict(backend, ours={**backend.get("ours", {}), "verify": verify})
    for w in ("stock", "ours"):
        url = f"{root}/dtypes-{w}-{verify}"
        dcp.save(state, storage_writer=writer(w, ours, url))
        for rk in ("stock", "ours"):
            for placement in (Shard(1), Shard(0)):
                target = {}
                for name, t in full.items():
                    for src in ("plain", "rows"):
                        target[f"{src}.{name}"] = template_of(_dtensor(t, [placement]))
                dcp.load(target, storage_reader=reader(rk, ours, url))
                for key, dt in target.items():
                    t = full[key.split(".", 1)[1]]
                    want = t.chunk(ws, dim=placement.dim)[r]
                    if tensor_bytes(dt.to_local()) != tensor_bytes(want) or dt.dtype != t.dtype:
                        bad.setdefault(f"{w}->{rk}", []).append(f"{key} as {placement}")
    return bad


def rank_local_with_a_lost_part(url: str) -> dict:
    """Rank-local parts saved by every rank and loaded back; then rank 1's part loses its commit
    (its save died before ``__1.metadata``) and the load is tried again."""
    r = dist.get_rank()

    def load() -> str:
        out = {"t": torch.zeros(4)}
        try:
            dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
        except BaseException as e:  # noqa: BLE001 - CheckpointException
            return f"{type(e).__name__}: {e}"
        return "ok" if torch.equal(out["t"], torch.full((4,), float(r))) else f"wrong values {out['t']}"

    dcp.save({"t": torch.full((4,), float(r))}, storage_writer=dcp_ext.storage_writer(url), use_collectives=False)
    res = {"before": load()}
    dist.barrier()
    if r == 0:
        os.remove(os.path.join(url, "__1.metadata"))
    dist.barrier()
    res["after"] = load()
    return res
