"""Drop-in wrappers that multiply every looked-up embedding row by its AMTL mask (Eq. 1).

Each wrapper keeps the user's module as ``base_layer`` and the layer as ``amtl``, so parameter
names read ``<path>.base_layer.weight`` and ``<path>.amtl.<param>``; ``detach_amtl`` puts the
``base_layer`` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amtl_compress.core.amtl import AMTL
from amtl_compress.core.rotation import rotate_rows
from amtl_compress.errors import SurgeryError
from amtl_compress.surgery.rotate import check_rotatable


def _check_pair(base_layer: nn.Module, amtl: AMTL, kind: type[nn.Module]) -> None:
    if not isinstance(base_layer, kind):
        raise SurgeryError(
            f"`base_layer` must be an nn.{kind.__name__}, got {type(base_layer).__name__}"
        )
    if not isinstance(amtl, AMTL):
        raise SurgeryError(f"`amtl` must be an AMTL layer, got {type(amtl).__name__}")
    want = (base_layer.num_embeddings, base_layer.embedding_dim)
    got = (amtl.num_embeddings, amtl.embedding_dim)
    if want != got:
        raise SurgeryError(
            f"AMTL layer is for a ({got[0]}, {got[1]}) table but `base_layer` is ({want[0]}, "
            f"{want[1]}); build the AMTL from counts of shape ({want[0]},) and D = {want[1]}"
        )


def _apply_mask(rows: Tensor, mask: Tensor) -> Tensor:
    """e_hat = m * e (Eq. 1) for rows (..., D) and a mask of the same shape.

    When no gradient has to reach the mask (inference, frozen AMTL) the masked positions are
    written as exact +0.0, so the result equals a lookup in a table whose tails were zeroed
    (a plain product gives -0.0 for negative values and NaN for inf).
    """
    mask = mask.to(rows.dtype)
    if mask.requires_grad:
        return rows * mask
    return torch.where(mask != 0, rows * mask, 0.0)


class _MaskedTable(nn.Module):
    """What both wrappers share: ``base_layer`` + ``amtl`` and the base's table attributes.

    ``rotation`` (optional float32 (D, D) R, a buffer; None if absent) turns on dimension
    ordering (core/rotation.py): the wrapper returns its masked output times R.
    """

    _kind: type[nn.Module]
    rotation: Tensor | None

    def __init__(self, base_layer: nn.Module, amtl: AMTL, rotation: Tensor | None = None):
        super().__init__()
        _check_pair(base_layer, amtl, self._kind)
        if rotation is not None:
            check_rotatable("base_layer", base_layer)
            d = base_layer.embedding_dim
            if tuple(rotation.shape) != (d, d):
                raise SurgeryError(
                    f"`rotation` must be ({d}, {d}) for a table of width {d}, got "
                    f"{tuple(rotation.shape)}; build it with `principal_axes(table.weight)`"
                )
            rotation = rotation.detach().to(base_layer.weight.device, torch.float32).contiguous()
        self.base_layer = base_layer
        self.amtl = amtl
        self.register_buffer("rotation", rotation)

    @property
    def weight(self) -> nn.Parameter:
        """The base table (N, D), unmasked."""
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx


class MaskedEmbedding(_MaskedTable):
    """``nn.Embedding`` whose row i keeps only its first k_i + 1 dims (Eq. 1: e_hat = m * e).

    Same call as the base: ids int64 of any shape -> float (*ids.shape, D) in the base's dtype.
    ``padding_idx`` behaves as in the base (that row is looked up, then masked like any other).

    Args:
        base_layer: the wrapped table, (N, D).
        amtl: the AMTL layer built for that table's N rows and D dims.
        rotation: optional float32 (D, D); the masked rows are returned as ``e_hat @ R``.
    """

    _kind = nn.Embedding

    def forward(self, input: Tensor) -> Tensor:
        """ids (any shape) -> masked (then rotated) rows (*ids.shape, D)."""
        rows = _apply_mask(self.base_layer(input), self.amtl.mask(input))
        return rows if self.rotation is None else rotate_rows(rows, self.rotation)


class MaskedEmbeddingBag(_MaskedTable):
    """``nn.EmbeddingBag`` that masks each looked-up row (Eq. 1) BEFORE pooling.

    Same call and semantics as the base: ``input`` 1-D (nnz,) with ``offsets`` (B,) or, with
    ``include_last_offset``, (B + 1,); or 2-D (B, L) without offsets (B bags of L ids). Modes
    sum/mean/max; ``per_sample_weights`` shaped like ``input`` (mode sum only); entries equal to
    ``padding_idx`` are skipped and not counted by mean. Returns float (B, D) in the base dtype.

    The masked rows E = mask * weight[input] (nnz, D) get one zero row appended and are pooled
    by ``F.embedding_bag`` with indices arange(nnz) (padding entries pointed at the zero row,
    which is passed as ``padding_idx``), so pooling is torch's own, bag for bag.

    Args:
        base_layer: the wrapped table, (N, D).
        amtl: the AMTL layer built for that table's N rows and D dims.
        rotation: optional float32 (D, D) applied to each pooled bag (sum and mean commute with
            it; mode max is rejected).
    """

    _kind = nn.EmbeddingBag

    @property
    def mode(self) -> str:
        return self.base_layer.mode

    def forward(
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        """Pool the masked rows of each bag: (nnz,) + offsets or (B, L) -> (B, D)."""
        base = self.base_layer
        ids = input.reshape(-1)
        rows = F.embedding(
            ids,
            base.weight,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        masked = _apply_mask(rows, self.amtl.mask(ids))
        nnz = ids.numel()
        table = torch.cat([masked, masked.new_zeros(1, masked.shape[1])])
        positions = torch.arange(nnz, device=ids.device)
        padding_idx = None
        if base.padding_idx is not None:
            positions = torch.where(ids == base.padding_idx, nnz, positions)
            padding_idx = nnz
        pooled = F.embedding_bag(
            positions.reshape(input.shape),
            table,
            None if offsets is None else offsets.long(),
            mode=base.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=base.include_last_offset,
            padding_idx=padding_idx,
        )
        return pooled if self.rotation is None else rotate_rows(pooled, self.rotation)
