"""Stock features an older torch lacks, as skip markers for the tests that exercise them.

dcp-ext supports torch >= 2.7; CI runs 2.13 (where nothing here skips) and ``tests/old_torch.sh``
runs the suite on an old torch by hand. A test of a *stock* feature the running torch does not
have skips there with the reason, instead of failing; everything dcp-ext itself promises on that
torch still runs. Each flag detects the feature, never a version number.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as _stock_filesystem
from torch.distributed.checkpoint import staging as _stock_staging
from torch.distributed.checkpoint.planner import SavePlanner as _SavePlanner

from dcp_ext.torch_compat import ASYNC_SAVE_TAKES_STAGER, crc_option_is_context_local, stock_load_hides_reader_errors


def _lacks(what: str) -> str:
    return f"torch {torch.__version__} lacks {what}"


#: ``dcp.save(use_collectives=False)``: rank-local saves (torch 2.9 has it, 2.7 not)
RANK_LOCAL_SAVE = "use_collectives" in inspect.signature(dcp.save).parameters
needs_rank_local_save = pytest.mark.skipif(not RANK_LOCAL_SAVE,
                                           reason=_lacks("dcp.save(use_collectives=False) (rank-local saves)"))

#: ``dcp.async_save(async_stager=...)``, and with it stagers whose ``stage()`` returns a Future
#: (``max_pools > 1``; torch 2.9 has both, 2.7 neither)
needs_async_stager = pytest.mark.skipif(
    not ASYNC_SAVE_TAKES_STAGER, reason=_lacks("dcp.async_save(async_stager=...) and staging Futures"))

#: stock ``DefaultStager`` (torch 2.9 has it, 2.7 not)
needs_default_stager = pytest.mark.skipif(not hasattr(_stock_staging, "DefaultStager"),
                                          reason=_lacks("torch.distributed.checkpoint.staging.DefaultStager"))


def needs_dtype(name: str) -> pytest.MarkDecorator:
    """Skip where torch has no dtype ``name`` (``float4_e2m1fn_x2``: torch 2.9 has it, 2.7 not)."""
    return pytest.mark.skipif(not hasattr(torch, name), reason=_lacks(f"the dtype torch.{name}"))


def _stock_lets_one_rank_save_part_of_a_tensor() -> bool:
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                       TensorStorageMetadata)
    from torch.distributed.checkpoint.planner import SavePlan

    half = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2]),
                                 [ChunkStorageMetadata(torch.Size([0]), torch.Size([1]))])
    log = logging.getLogger(default_planner.__name__)
    was, log.disabled = log.disabled, True  # the probe's own warning is no news
    try:
        found = default_planner._validate_global_plan([SavePlan([])], Metadata({"t": half}))
    finally:
        log.disabled = was
    return found is True or found == []  # torch 2.7 answers False: it checks coverage with one rank too


#: a ``no_dist`` save of one rank's shard of a DTensor: stock's plan check accepts chunks that do not
#: cover the tensor when only one rank plans (torch 2.13 does; 2.7 refuses: "invalid fill")
needs_one_rank_partial_save = pytest.mark.skipif(
    not _stock_lets_one_rank_save_part_of_a_tensor(),
    reason=_lacks("no_dist saves of part of a tensor (its plan check wants one rank to cover every tensor)"))


#: ``torch.serialization.set_crc32_options`` kept per thread (contextvars context): torch 2.13 does;
#: older torch (2.7, 2.9) keeps one process-wide setting, so no thread gets its own back
needs_per_context_crc_option = pytest.mark.skipif(
    not crc_option_is_context_local(), reason=_lacks("a per-thread torch.serialization.set_crc32_options"))


def stock_loads_dtype(dtype: torch.dtype) -> bool:
    """Whether this torch can ``copy_`` a tensor of ``dtype``, as stock DCP's load does into every
    destination (torch 2.9 has ``float4_e2m1fn_x2`` but no copy kernel for it): dtype matrices
    leave out the ones it cannot."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ComplexHalf is "experimental"
        try:
            torch.empty(2, dtype=dtype).copy_(torch.empty(2, dtype=dtype))
        except RuntimeError:
            return False
    return True


#: stock ``dcp.load``'s error names what the reader's ``read_metadata`` raised (torch 2.7: it
#: propagates; 2.13: stock names it). torch 2.9 hides it behind ``assert metadata is not None``;
#: dcp_ext logs it at ERROR there (``tests.support.errors.error_text`` appends those lines), which a
#: rank that did not fail itself, or a test matching the exception of a rank process, cannot see
needs_load_to_report_reader_errors = pytest.mark.skipif(
    stock_load_hides_reader_errors(),
    reason=_lacks("a dcp.load error naming the reader's read_metadata error (dcp_ext logs it at ERROR instead)"))


#: stock ``HuggingFaceStorageWriter``/``Reader`` (public in torch 2.9; 2.7 has only a private draft)
HF_STORAGE = hasattr(dcp, "HuggingFaceStorageWriter")
needs_hf_storage = pytest.mark.skipif(not HF_STORAGE, reason=_lacks("torch.distributed.checkpoint.HuggingFaceStorageWriter"))

#: ``FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)`` (torch 2.9 has it, 2.7 not)
SAFETENSORS_FORMAT = hasattr(_stock_filesystem, "SerializationFormat")
needs_safetensors_format = pytest.mark.skipif(
    not SAFETENSORS_FORMAT, reason=_lacks("FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)"))

#: stock plan caching skips building the global plan when every local plan is unchanged (it caches
#: the metadata too); torch 2.7's caching saves the gather and scatter of plans but re-plans
STOCK_CACHE_SKIPS_GLOBAL_PLAN = hasattr(_SavePlanner, "_cached_metadata")
