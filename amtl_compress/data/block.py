"""The rows a streaming reader holds between reading them and batching them.

Rows live column by column in numpy arrays; a list column is kept unpadded as lengths + values,
so holding rows costs O(nnz) rather than O(n * L). Padding happens once per batch in
:meth:`Block.to_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amtl_compress.data.columns import pad_lists
from amtl_compress.data.dataset import Batch


@dataclass
class Block:
    """Decoded, validated rows held by the reader: a few row groups' worth at most.

    ``flat``: categorical int64 (n,) and dense float32 (n,) columns. ``lists``: a list column as
    ``(lengths (n,), values (nnz,))`` int64, unpadded, so a block costs O(nnz) not O(n * L).
    ``labels``: float32 (n,).
    """

    flat: dict[str, np.ndarray]
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(blocks: list[Block]) -> Block:
        if len(blocks) == 1:
            return blocks[0]
        first = blocks[0]
        return Block(
            {k: np.concatenate([b.flat[k] for b in blocks]) for k in first.flat},
            {
                k: (
                    np.concatenate([b.lists[k][0] for b in blocks]),
                    np.concatenate([b.lists[k][1] for b in blocks]),
                )
                for k in first.lists
            },
            np.concatenate([b.labels for b in blocks]),
        )

    def take(self, idx: np.ndarray) -> Block:
        """The rows ``idx`` (int64 (b,)), in that order."""
        lists = {}
        for k, (lengths, values) in self.lists.items():
            starts = np.cumsum(lengths) - lengths
            lens = lengths[idx]
            # Element j of taken row i sits at starts[idx[i]] + j.
            within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            lists[k] = (lens, values[np.repeat(starts[idx], lens) + within])
        return Block({k: v[idx] for k, v in self.flat.items()}, lists, self.labels[idx])

    def to_batch(self, columns: tuple[str, ...], list_padding: int = 0) -> Batch:
        """``(features, labels)``; a list column is padded with ``list_padding`` to the longest
        list of this batch."""
        n = self.num_rows
        features = {}
        for name in columns:
            if name in self.flat:
                features[name] = torch.from_numpy(self.flat[name])
            else:
                lengths, values = self.lists[name]
                rows = np.repeat(np.arange(n), lengths)
                features[name] = torch.from_numpy(pad_lists(rows, values, n, list_padding))
        return features, torch.from_numpy(self.labels)
