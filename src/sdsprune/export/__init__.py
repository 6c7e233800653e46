"""Deployment formats: a compact sparse checkpoint and its re-densified counterpart."""

from sdsprune.export.checkpoint import (
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    MANIFEST,
    check_model_folder,
    export_checkpoint,
    is_sparse_checkpoint,
    load_state_dict,
    prunable_weight_names,
    read_manifest,
)
from sdsprune.export.packing import decode_weight, encode_weight, nm_pattern

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "MANIFEST",
    "check_model_folder",
    "decode_weight",
    "encode_weight",
    "export_checkpoint",
    "is_sparse_checkpoint",
    "load_state_dict",
    "nm_pattern",
    "prunable_weight_names",
    "read_manifest",
]
