"""Packed embedding lookups: ``PackedEmbedding``, ``PackedEmbeddingBag`` and their kernel.

``values`` + ``offsets`` (torchrec-style jagged rows) hold each row's kept prefix; the modules
re-pad (or pool) on the fly. See docs/lookup.md for the kernel, its cache and the benchmarks.
"""

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
    "pack_rows",
    "packed_embedding_bag_reference",
    "packed_embedding_reference",
]
