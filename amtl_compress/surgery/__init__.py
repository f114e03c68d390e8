"""Attaching AMTL to the embedding tables of any model: targets, wrappers, attach/detach."""

from amtl_compress.errors import SurgeryError
from amtl_compress.surgery.attach import (
    amtl_layers,
    amtl_parameters,
    attach_amtl_,
    dense_parameters,
    detach_amtl,
    model_parameters,
    table_parameters,
)
from amtl_compress.surgery.masked import MaskedEmbedding, MaskedEmbeddingBag
from amtl_compress.surgery.targets import find_embedding_modules

__all__ = [
    "MaskedEmbedding",
    "MaskedEmbeddingBag",
    "SurgeryError",
    "amtl_layers",
    "amtl_parameters",
    "attach_amtl_",
    "dense_parameters",
    "detach_amtl",
    "find_embedding_modules",
    "model_parameters",
    "table_parameters",
]
