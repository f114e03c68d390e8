"""Packed embedding lookups: ``PackedEmbedding``, ``PackedEmbeddingBag``, their kernel, and
``load_packed`` / ``load_packed_model``, which serve a packed directory through them.

``values`` + ``offsets`` (torchrec-style jagged rows) hold each row's kept prefix; the modules
re-pad (or pool) on the fly, with the compiled kernel on the CPU and Triton kernels on CUDA
(imported on first use). See docs/lookup.md for the kernels, the cache and the benchmarks.
"""

from amtl_compress.lookup.load import load_packed, load_packed_model
from amtl_compress.lookup.modules import PackedEmbedding, PackedEmbeddingBag
from amtl_compress.lookup.ops import kernel_available
from amtl_compress.lookup.reference import (
    pack_rows,
    packed_embedding_bag_reference,
    packed_embedding_reference,
)

__all__ = [
    "PackedEmbedding",
    "PackedEmbeddingBag",
    "kernel_available",
    "load_packed",
    "load_packed_model",
    "pack_rows",
    "packed_embedding_bag_reference",
    "packed_embedding_reference",
]
