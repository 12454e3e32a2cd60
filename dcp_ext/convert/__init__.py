"""Conversions between DCP checkpoints and single-file formats, streamed one tensor at a time.

* :mod:`~dcp_ext.convert.export`: DCP -> safetensors (one file or HF-style shards) or torch.save
* :mod:`~dcp_ext.convert.importing`: safetensors / Hugging Face directory / torch.save -> DCP
* :mod:`~dcp_ext.convert.diff`: compare two checkpoints tensor by tensor
* :mod:`~dcp_ext.convert.dcp_source`: reading a checkpoint in bounded batches
* :mod:`~dcp_ext.convert.torch_format`: the torch.save format (safetensors is
  :mod:`~dcp_ext.storage.safetensors_format`, shared with the stock-format reader)
"""

from .diff import DiffReport, ItemDiff, diff_checkpoints
from .export import ConvertReport, export_checkpoint
from .importing import import_checkpoint

__all__ = ["ConvertReport", "DiffReport", "ItemDiff", "diff_checkpoints", "export_checkpoint", "import_checkpoint"]
