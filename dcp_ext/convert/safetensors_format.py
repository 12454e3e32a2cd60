"""Where conversions found the safetensors format before it moved to
:mod:`dcp_ext.storage.safetensors_format` (shared with the stock-format reader): the same names."""

from ..storage.safetensors_format import (
    DTYPES,
    HEADER_PREFIX,
    INDEX_NAME,
    SafetensorsHeader,
    TensorEntry,
    decode_header,
    encode_header,
    header_length,
    shard_name,
)

__all__ = ["DTYPES", "HEADER_PREFIX", "INDEX_NAME", "SafetensorsHeader", "TensorEntry", "decode_header",
           "encode_header", "header_length", "shard_name"]
