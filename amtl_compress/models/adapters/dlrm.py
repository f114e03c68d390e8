"""The ``dlrm`` adapter: facebookresearch/dlrm's ``DLRM_Net``, run unmodified (docs/dlrm.md).

``DLRM_Net.forward(dense_x, lS_o, lS_i)`` takes the dense features as one float32 (B, m) matrix
and, per table ``emb_l[k]``, the flat ids ``lS_i[k]`` (nnz_k,) and the bag offsets ``lS_o[k]``
(B,) of an ``nn.EmbeddingBag(mode="sum")``. This adapter builds them from a batch of the data
contract whose columns are named as in dlrm's Criteo loader:

- ``dense_0`` ... ``dense_{m-1}``: float32 (B,) each, stacked in index order into ``dense_x``;
- ``cat_0`` ... ``cat_{n-1}``: the ids of table ``emb_l[k]`` in column ``cat_k``: a categorical
  column, int64 (B,), one id per bag, or a list column (multi-hot), int64 (B, L) padded with -1
  (data opened with ``list_padding=-1``, so that id 0 stays a real row); lengths are read from the
  padding, and empty lists give empty bags.

Other columns are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amtl_compress.errors import ConfigError
from amtl_compress.models.adapters import register_adapter, unwrap_model

_CAT = re.compile(r"^cat_(\d+)$")
_DENSE = re.compile(r"^dense_(\d+)$")
_DOCS = "docs/dlrm.md"


def _numbered(columns: Sequence[str], pattern: re.Pattern[str], prefix: str) -> list[str]:
    """The columns ``<prefix>_0`` ... ``<prefix>_{n-1}`` in index order; ConfigError for a gap."""
    found = sorted((int(m.group(1)), c) for c in columns if (m := pattern.match(c)))
    for want, (k, column) in enumerate(found):
        if k != want:
            raise ConfigError(
                f"`adapter=\"dlrm\"` reads columns `{prefix}_0` ... `{prefix}_{len(found) - 1}` in "
                f"index order, but `{prefix}_{want}` is missing (found `{column}`): number the "
                f"columns from 0 without gaps ({_DOCS})"
            )
    return [c for _, c in found]


def dlrm_inputs(
    features: Mapping[str, torch.Tensor], num_tables: int | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(dense_x, lS_o, lS_i)`` for ``DLRM_Net.forward`` from a batch dict (module docstring).

    Args:
        features: column -> tensor of B rows; ``dense_k`` float (B,), ``cat_k`` int64 (B,) or
            (B, L) padded with -1.
        num_tables: the model's number of tables (``len(emb_l)``), checked against the
            ``cat_*`` columns when given.

    Returns:
        dense_x float32 (B, m); lS_o: n int64 (B,) bag offsets; lS_i: n int64 (nnz_k,) ids.

    Raises:
        ConfigError: no ``dense_*`` or ``cat_*`` columns, gaps in their numbering, a count of
            ``cat_*`` columns other than ``num_tables``, a column of the wrong kind.
    """
    columns = list(features)
    dense, cats = _numbered(columns, _DENSE, "dense"), _numbered(columns, _CAT, "cat")
    if not dense or not cats:
        raise ConfigError(
            f"`adapter=\"dlrm\"` needs columns `dense_0`, `dense_1`, ... and `cat_0`, `cat_1`, ... "
            f"(DLRM_Net's dense_x and one per table of emb_l); the batch has "
            f"{', '.join(f'`{c}`' for c in columns[:8]) or 'no columns'}: rename the data's "
            f"columns ({_DOCS})"
        )
    if num_tables is not None and len(cats) != num_tables:
        raise ConfigError(
            f"the model has {num_tables} tables in `emb_l` but the data has {len(cats)} `cat_*` "
            f"columns: `adapter=\"dlrm\"` feeds `emb_l[k]` from column `cat_k`, one per table "
            f"({_DOCS})"
        )
    for name in dense:
        if not features[name].is_floating_point() or features[name].dim() != 1:
            raise ConfigError(
                f"column `{name}` must be dense (float, one value per row) for `adapter=\"dlrm\"`; "
                f"it is {features[name].dtype} of shape {tuple(features[name].shape)} ({_DOCS})"
            )
    dense_x = torch.stack([features[n].float() for n in dense], dim=1)
    offsets, indices = [], []
    for name in cats:
        ids = features[name]
        if ids.is_floating_point() or ids.dim() not in (1, 2):
            raise ConfigError(
                f"column `{name}` must hold integer ids (categorical or list) for "
                f"`adapter=\"dlrm\"`; it is {ids.dtype} of shape {tuple(ids.shape)} ({_DOCS})"
            )
        ids = ids.long()
        if ids.dim() == 1:  # one id per row: bag b is [ids[b]]
            indices.append(ids)
            offsets.append(torch.arange(ids.shape[0], device=ids.device))
        else:  # (B, L) padded with -1 on the right: bag b is its first lengths[b] ids
            real = ids >= 0
            lengths = real.sum(dim=1)
            indices.append(ids[real])
            offsets.append(torch.cumsum(lengths, 0) - lengths)
    return dense_x, offsets, indices


class DLRMNetAdapter:
    """Runs ``DLRM_Net``-like models: ``model(dense_x, lS_o, lS_i)`` from ``dense_*`` / ``cat_*``.

    Its data is opened with ``list_padding=-1`` (:attr:`list_padding`): multi-hot ids start at 0.
    """

    name = "dlrm"
    #: How this adapter wants list columns padded (``open_data(list_padding=...)``).
    list_padding = -1

    def forward(self, model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``model(dense_x, lS_o, lS_i)`` (:func:`dlrm_inputs`): the model's (B, 1) output."""
        tables = getattr(unwrap_model(model), "emb_l", None)
        num_tables = len(tables) if isinstance(tables, nn.ModuleList) else None
        dense_x, offsets, indices = dlrm_inputs(features, num_tables)
        return model(dense_x, offsets, indices)

    def default_fields(self, model: nn.Module, columns: Sequence[str]) -> dict[str, str]:
        """``emb_l.k`` -> ``cat_k`` for every table of ``emb_l`` whose column is in the data."""
        tables = getattr(unwrap_model(model), "emb_l", None)
        if not isinstance(tables, nn.ModuleList):
            return {}
        return {f"emb_l.{k}": f"cat_{k}" for k in range(len(tables)) if f"cat_{k}" in columns}


DLRM = register_adapter(DLRMNetAdapter())
