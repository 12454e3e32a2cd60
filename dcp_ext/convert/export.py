"""Export a DCP checkpoint to safetensors (one file, or Hugging Face-style shards + index) or to
one ``torch.save`` file, streaming: memory holds about one tensor (or a batch of small ones up
to ``buffer`` bytes) at a time, whatever the checkpoint size; source and output on any backend.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import load_config, parse_size
from ..errors import ConvertError
from ..progress import Progress
from ..storage import open_store
from .dcp_source import CheckpointTensors, rename_key, select_keys
from ..storage.safetensors_format import INDEX_NAME, encode_header, shard_name
from .torch_format import LazyTensor, StreamingTorchWriter

__all__ = ["ConvertReport", "export_checkpoint", "parse_dtype", "split_output"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                "fp64": torch.float64, "float64": torch.float64}
#: elements converted (dtype) per slice, so a conversion never holds a second full-size copy
_CONVERT_CHUNK = 4 * 1024 * 1024


@dataclass
class ConvertReport:
    """What a conversion wrote."""

    source: str
    output: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: key -> why it was left out (e.g. a non-tensor value in a safetensors export)
    skipped: dict[str, str] = field(default_factory=dict)
    #: bytes of the largest tensor held at once (what the memory use scales with)
    largest_tensor: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"float16"``, ``torch.bfloat16`` -> a floating dtype (None passes through)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dt = _DTYPE_NAMES.get(str(name).lower().removeprefix("torch."))
    if dt is None:
        raise ConvertError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPE_NAMES))}")
    return dt


def split_output(out: str) -> tuple[str, str]:
    """``"/x/model.pt"`` -> ``("/x", "model.pt")``; works for URLs (``s3://b/p/model.pt``)."""
    out = os.fspath(out)
    if "://" in out:
        parent, _, name = out.rstrip("/").rpartition("/")
        if "://" not in parent or parent.endswith(":/"):
            raise ConvertError(f"{out}: name a file inside a bucket/prefix, e.g. s3://bucket/dir/model.safetensors")
        return parent, name
    out = os.path.abspath(os.path.expanduser(out))
    return os.path.dirname(out), os.path.basename(out)


def _converted(t: torch.Tensor, dtype: torch.dtype | None) -> Iterator[Any]:
    """Slices of ``t``'s bytes, converted to ``dtype`` slice by slice (floating tensors only)."""
    flat = t.reshape(-1)
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        yield flat.view(torch.uint8).numpy().data if flat.numel() else b""
        return
    for i in range(0, flat.numel(), _CONVERT_CHUNK):
        yield flat[i:i + _CONVERT_CHUNK].to(dtype).view(torch.uint8).numpy().data


def _out_dtype(src: CheckpointTensors, fqn: str, dtype: torch.dtype | None) -> torch.dtype:
    d = src.dtype(fqn)
    return dtype if dtype is not None and d.is_floating_point and not d.is_complex else d


class _Output:
    """Files written through a dcp-ext store; each aborted (removed) on failure."""

    def __init__(self, parent: str, overwrite: bool, options: dict):
        self.store = open_store(parent, **options)
        self.parent = parent
        self.overwrite = overwrite
        self.store.prepare_for_write()

    def check_free(self, names: list[str]) -> None:
        taken = [n for n in names if self.store.exists(n)]
        if taken and not self.overwrite:
            raise ConvertError(f"{self.parent}: {', '.join(taken)} already exist(s); pass --overwrite "
                               f"(overwrite=True) to replace")
        if taken:
            self.store.remove(taken)

    def url(self, name: str) -> str:
        return f"{self.parent.rstrip('/')}/{name}"


def export_checkpoint(source: str, output: str, *, to: str = "safetensors", dtype: Any = None,
                      keys: list[str] | None = None, strip_prefix: str | None = None, add_prefix: str | None = None,
                      max_shard_size: int | str = "5GB", buffer: int | str = "128MiB", overwrite: bool = False,
                      progress: bool | None = None, **options: Any) -> ConvertReport:
    """Export the DCP checkpoint at ``source`` to ``output``, streaming.

    ``to="safetensors"``: ``output`` ending in ``.safetensors`` is one file; otherwise a directory
    receiving ``model.safetensors``, or, above ``max_shard_size``, Hugging Face-style
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (written last).
    Non-tensor items cannot go into safetensors and are reported in ``skipped``.
    ``to="torch"``: one ``torch.save`` file (nested like the saved state when the checkpoint
    records its structure); non-tensor items are included when ``torch.load(weights_only=True)``
    can read them, otherwise reported in ``skipped``.
    ``dtype`` (e.g. ``"bf16"``) converts floating tensors; ``keys`` are FQN globs to export;
    ``strip_prefix``/``add_prefix`` rename keys. ``options`` go to the source reader and the output
    store (``s3={...}``, ...). Memory: about the largest tensor plus ``buffer``.
    """
    t0 = time.perf_counter()
    if to not in ("safetensors", "torch"):
        raise ConvertError(f"--to must be 'safetensors' or 'torch', got {to!r}")
    dtype = parse_dtype(dtype)
    budget = parse_size(buffer, "buffer")
    load_config(**options)  # bad options fail before anything is read
    src = CheckpointTensors(source, **options)
    try:
        chosen = select_keys(list(src.tensors) + src.objects, keys)
        tensors = [k for k in chosen if k in src.tensors]
        objects = [k for k in chosen if k not in src.tensors]
        names = {k: rename_key(k, strip_prefix, add_prefix) for k in chosen}
        seen: dict[str, str] = {}
        for k, n in names.items():
            if n in seen:
                raise ConvertError(f"keys {seen[n]!r} and {k!r} both become {n!r} after renaming")
            seen[n] = k
        report = ConvertReport(source, output)
        report.largest_tensor = max((src.nbytes(k) for k in tensors), default=0)
        total = sum(src.nbytes(k) for k in tensors)
        bar = Progress(f"exporting {source}", total, progress, logger)
        if to == "safetensors":
            for k in objects:
                report.skipped[k] = "not a tensor (safetensors holds tensors only)"
            _to_safetensors(src, output, tensors, names, dtype, parse_size(max_shard_size, "max_shard_size"),
                            budget, overwrite, options, report, bar)
        else:
            _to_torch(src, output, tensors, objects, names, dtype, budget, overwrite, options, report, bar)
        bar.close()
    finally:
        src.close()
    report.seconds = time.perf_counter() - t0
    logger.info("exported %s to %s: %d tensors, %.1f MiB in %d file(s), %.2fs", source, output, report.tensors,
                report.bytes / 2**20, len(report.files), report.seconds)
    return report


def _plan_shards(src: CheckpointTensors, tensors: list[str], dtype, limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k in tensors:
        n = src.nbytes(k) // src.dtype(k).itemsize * _out_dtype(src, k, dtype).itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _to_safetensors(src: CheckpointTensors, output: str, tensors: list[str], names: dict[str, str], dtype,
                    limit: int, budget: int, overwrite: bool, options: dict, report: ConvertReport,
                    bar: Progress) -> None:
    if output.endswith(".safetensors"):
        parent, fname = split_output(output)
        plan = [(fname, tensors)]
        index = False
    else:
        parent = output if "://" in output else os.path.abspath(os.path.expanduser(output))
        shards = _plan_shards(src, tensors, dtype, limit)
        plan = [(shard_name(i + 1, len(shards)), s) for i, s in enumerate(shards)]
        index = len(plan) > 1
    out = _Output(parent, overwrite, options)
    out.check_free([n for n, _ in plan] + ([INDEX_NAME] if index else []))
    weight_map: dict[str, str] = {}
    data_bytes = 0
    for fname, keys in plan:
        header, entries = encode_header([(names[k], _out_dtype(src, k, dtype), src.shape(k)) for k in keys],
                                        {"format": "pt"})
        w = out.store.open_writer(fname)
        try:
            w.write(header)
            for batch in src.batches(keys, budget):
                loaded = src.load(batch)
                for k in batch:
                    t = loaded.pop(k)
                    for piece in _converted(t, dtype):
                        w.write(piece)
                    bar.advance(src.nbytes(k))
                    del t
            w.close()
        except BaseException:
            w.abort()
            raise
        report.files.append(out.url(fname))
        report.tensors += len(keys)
        data_bytes += entries[-1].end if entries else 0
        report.bytes += len(header) + (entries[-1].end if entries else 0)
        weight_map.update({names[k]: fname for k in keys})
    if index:
        doc = {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}
        out.store.put_atomic(INDEX_NAME, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        report.files.append(out.url(INDEX_NAME))
    out.store.close()


def _nested(src: CheckpointTensors, keys: list[str], names: dict[str, str]) -> dict[str, tuple] | None:
    """FQN -> path in the saved (nested) state, when the checkpoint records it for every key and
    no renaming applies; else None (a flat dict is written)."""
    pd = src.metadata.planner_data
    if not isinstance(pd, dict) or any(names[k] != k for k in keys):
        return None
    paths = {}
    for k in keys:
        p = pd.get(k)
        if not isinstance(p, tuple) or not p or not all(isinstance(x, (str, int)) for x in p):
            return None
        paths[k] = p
    return paths


def _assemble(values: dict[str, Any], paths: dict[str, tuple] | None, names: dict[str, str]) -> dict:
    if paths is None:
        return {names[k]: v for k, v in values.items()}
    root: dict = {}
    for k, v in values.items():
        node = root
        for part in paths[k][:-1]:
            node = node.setdefault(part, {})
        node[paths[k][-1]] = v
    return root


def _to_torch(src: CheckpointTensors, output: str, tensors: list[str], objects: list[str], names: dict[str, str],
              dtype, budget: int, overwrite: bool, options: dict, report: ConvertReport, bar: Progress) -> None:
    import io

    parent, fname = split_output(output)
    values: dict[str, Any] = {}
    for k, raw in (src.load_raw_objects(objects) if objects else {}).items():
        try:
            values[k] = torch.load(io.BytesIO(raw), weights_only=True)
            report.objects += 1
        except Exception as e:  # noqa: BLE001 - anything that is not plain data stays out
            report.skipped[k] = f"not loadable with torch.load(weights_only=True): {str(e).splitlines()[0][:200]}"
    keys = [str(i) for i in range(len(tensors))]
    key_of = dict(zip(tensors, keys))
    for k, key in key_of.items():
        values[k] = LazyTensor(key, _out_dtype(src, k, dtype), src.shape(k))
    ordered = {k: values[k] for k in tensors + objects if k in values}
    structure = _assemble(ordered, _nested(src, list(ordered), names), names)
    out = _Output(parent, overwrite, options)
    out.check_free([fname])
    w = out.store.open_writer(fname)
    try:
        zw = StreamingTorchWriter(w.write)
        zw.write_structure(structure, keys)
        for batch in src.batches(tensors, budget):
            loaded = src.load(batch)
            for k in batch:
                t = loaded.pop(k)
                if dtype is not None and t.is_floating_point() and not t.is_complex() and t.dtype != dtype:
                    t = _convert_whole(t, dtype)
                zw.write_tensor(key_of[k], t)
                bar.advance(src.nbytes(k))
                del t
        zw.close()
        w.close()
    except BaseException:
        w.abort()
        raise
    report.files.append(out.url(fname))
    report.tensors = len(tensors)
    report.bytes = w.tell()
    out.store.close()


def _convert_whole(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` slice by slice into one new tensor (the source is freed by the caller;
    the peak is source + target, i.e. 1.5x the source for fp32 -> bf16)."""
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), _CONVERT_CHUNK):
        dst[i:i + _CONVERT_CHUNK].copy_(src[i:i + _CONVERT_CHUNK])
    return out
