"""TensorStore backend: each global tensor a zarr3 array, on local disk, S3 or GCS.

Select it with a ``zarr3+file://``, ``zarr3+s3://`` or ``zarr3+gs://`` URL, or
``backend="tensorstore"`` (``DCP_EXT_BACKEND=tensorstore``, ``backend = "tensorstore"`` in a
config file) with a plain path / ``s3://`` / ``gs://`` URL. Options: ``[tensorstore]``
(:class:`~dcp_ext.config.TensorStoreOptions`). Layout and guarantees: ``docs/backends.md``.

Modules: :mod:`.layout` (names, chunk grids, dtypes: pure), :mod:`.kvstore` (URL -> byte store
+ kvstore spec + credentials), :mod:`.arrays` (TensorStore glue), :mod:`.writer`,
:mod:`.reader`.
"""

from __future__ import annotations

from .kvstore import SCHEMES
from .layout import array_name, object_path
from .reader import TensorStoreLoadStats, TensorStoreReader
from .writer import TensorStoreSaveStats, TensorStoreWriter

__all__ = ["SCHEMES", "TensorStoreWriter", "TensorStoreReader", "TensorStoreSaveStats", "TensorStoreLoadStats",
           "array_name", "object_path"]
