"""The ``torchrec`` adapter: TorchRec's ``torchrec.models.dlrm.DLRM``, run unmodified.

``DLRM.forward(dense_features, sparse_features)`` takes the dense features as one float32
(B, dense_in_features) matrix and the ids of every feature as a ``KeyedJaggedTensor`` (KJT), which
its ``EmbeddingBagCollection`` (EBC) pools table by table. This adapter builds both from a batch of
the data contract (docs/data.md), matching by **feature name** (docs/dlrm.md, "TorchRec"):

- every feature name of the EBC's tables (``EmbeddingBagConfig.feature_names``) is read from the
  column of that name: a categorical column, int64 (B,), one id per bag; or a list column
  (multi-hot), int64 (B, L) padded with -1 (data opened with ``list_padding=-1``, so that id 0
  stays a real row), whose bag lengths are the counts of ids >= 0 (an empty list is an empty bag);
- the dense features are the batch's float columns, one value per row, in the data's column
  order (the batch dict's order), and there must be exactly ``dense_in_features`` of them;
- other integer columns are ignored.

The tables live in the EBC's ``embedding_bags`` ModuleDict, at module paths
``<ebc path>.embedding_bags.<table name>`` (for ``DLRM``:
``sparse_arch.embedding_bag_collection.embedding_bags.<table name>``). They are plain
``nn.EmbeddingBag`` modules called as ``bag(input=ids, offsets=offsets,
per_sample_weights=None)``, so AMTL's masked tables and the packed lookups replace them in
place; :meth:`TorchRecAdapter.default_fields` maps each table to the column of its feature.

This module imports torchrec: :func:`amtl_compress.models.adapters.get_adapter` imports it only
for ``adapter="torchrec"`` (``pip install 'amtl-compress[torchrec]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.fx._symbolic_trace as _fx_trace
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from amtl_compress.errors import ConfigError
from amtl_compress.models.adapters import register_adapter, unwrap_model

_DOCS = "docs/dlrm.md, \"TorchRec\""


def _quiet_fx_note() -> None:
    """Emit torch's one-time ``is_fx_tracing`` note into a silenced logger.

    torchrec asks ``torch.fx.is_fx_tracing()`` on every ``KeyedJaggedTensor``; torch 2.13 then logs
    (once per process, cached) a note about its own API that would end up on every command's
    stderr. It says nothing about the user's run.
    """
    note = getattr(_fx_trace, "is_fx_tracing_warning", None)
    if note is None:
        return
    logger = logging.getLogger(_fx_trace.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        note()
    finally:
        logger.setLevel(level)


_quiet_fx_note()
_WHO = "`adapter=\"torchrec\"`"


def embedding_bag_collection(model: nn.Module) -> tuple[str, EmbeddingBagCollection]:
    """(module path, module) of the one ``EmbeddingBagCollection`` inside ``model``.

    Raises:
        ConfigError: none, or more than one.
    """
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if len(found) != 1:
        what = "no EmbeddingBagCollection" if not found else (
            f"{len(found)} EmbeddingBagCollections ({', '.join(f'`{p}`' for p, _ in found)})"
        )
        raise ConfigError(
            f"{_WHO} runs models with one EmbeddingBagCollection (TorchRec's DLRM); "
            f"`{type(model).__name__}` has {what} ({_DOCS})"
        )
    return found[0]


def feature_names(ebc: EmbeddingBagCollection) -> list[str]:
    """Every feature name of the EBC's tables, in the order its forward pools them."""
    return [name for config in ebc.embedding_bag_configs() for name in config.feature_names]


def dense_in_features(model: nn.Module) -> int:
    """``dense_in_features`` of a ``DLRM``: the input width of the first Linear of ``dense_arch``.

    Raises:
        ConfigError: the model has no ``dense_arch`` with a Linear layer.
    """
    arch = getattr(model, "dense_arch", None)
    first = next((m for m in arch.modules() if isinstance(m, nn.Linear)), None) if isinstance(
        arch, nn.Module) else None
    if first is None:
        raise ConfigError(
            f"{_WHO} runs TorchRec's DLRM (`forward(dense_features, sparse_features)`, a "
            f"`dense_arch` MLP); `{type(model).__name__}` has no `dense_arch` with a Linear layer "
            f"({_DOCS})"
        )
    return int(first.in_features)


def _jagged(ids: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (nnz,), lengths (B,)) int64 of one feature's column: (B,) or (B, L) padded -1."""
    if ids.is_floating_point() or ids.dim() not in (1, 2):
        raise ConfigError(
            f"column `{name}` feeds TorchRec feature `{name}`, so it must hold integer ids "
            f"(categorical (B,) or list (B, L)); it is {ids.dtype} of shape {tuple(ids.shape)} "
            f"({_DOCS})"
        )
    ids = ids.long()
    if ids.dim() == 1:  # one id per row
        return ids, torch.ones_like(ids)
    real = ids >= 0  # right-padded with -1: row b's bag is its first lengths[b] ids
    return ids[real], real.sum(dim=1)


def torchrec_inputs(
    features: Mapping[str, torch.Tensor], keys: Sequence[str], num_dense: int
) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """``(dense_features, sparse_features)`` for ``DLRM.forward`` from a batch dict.

    Args:
        features: column -> tensor of B rows (module docstring).
        keys: the EBC's feature names (:func:`feature_names`); each must be a column.
        num_dense: the model's ``dense_in_features``.

    Returns:
        dense float32 (B, num_dense); a KJT with ``keys``, int64 values (nnz,) and lengths
        (len(keys) * B,), feature-major (every row of the first key, then the next key).

    Raises:
        ConfigError: a feature without a column, a feature column that is not integer ids, or a
            count of float columns other than ``num_dense``.
    """
    missing = [k for k in keys if k not in features]
    if missing:
        have = ", ".join(f"`{c}`" for c in list(features)[:10]) or "no columns"
        raise ConfigError(
            f"the model's EmbeddingBagCollection reads feature(s) "
            f"{', '.join(f'`{k}`' for k in missing)}, which are not columns of the data "
            f"(it has {have}); {_WHO} feeds each feature from the column of the same name: "
            f"rename the columns or the features ({_DOCS})"
        )
    dense_columns = [
        c for c, t in features.items() if c not in keys and t.is_floating_point() and t.dim() == 1
    ]
    if len(dense_columns) != num_dense:
        shown = ", ".join(f"`{c}`" for c in dense_columns) or "none"
        raise ConfigError(
            f"the model takes {num_dense} dense feature(s) (`dense_in_features`) but the data has "
            f"{len(dense_columns)} float column(s) ({shown}); {_WHO} stacks every float column "
            f"in column order: write exactly {num_dense} ({_DOCS})"
        )
    rows = int(next(iter(features.values())).shape[0])
    if dense_columns:
        dense = torch.stack([features[c].float() for c in dense_columns], dim=1)
    else:
        device = next(iter(features.values())).device
        dense = torch.zeros(rows, 0, device=device)
    values, lengths = zip(*(_jagged(features[k], k) for k in keys), strict=True)
    sparse = KeyedJaggedTensor(
        keys=list(keys), values=torch.cat(values), lengths=torch.cat(lengths), stride=rows
    )
    return dense, sparse


class TorchRecAdapter:
    """Runs TorchRec's ``DLRM`` (and its subclasses): ``model(dense_features, kjt)``.

    Its data is opened with ``list_padding=-1`` (:attr:`list_padding`): multi-hot ids start at 0,
    as in TorchRec, where every id is a real row.
    """

    name = "torchrec"
    #: How this adapter wants list columns padded (``open_data(list_padding=...)``).
    list_padding = -1

    def forward(self, model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``model(dense_features, sparse_features)`` (:func:`torchrec_inputs`): (B, 1) logits."""
        inner = unwrap_model(model)
        _, ebc = embedding_bag_collection(inner)
        if ebc.is_weighted():
            raise ConfigError(
                f"{_WHO} builds unweighted KeyedJaggedTensors; the model's "
                f"EmbeddingBagCollection is weighted (`is_weighted=True`) ({_DOCS})"
            )
        dense, sparse = torchrec_inputs(features, feature_names(ebc), dense_in_features(inner))
        return model(dense, sparse)

    def default_fields(self, model: nn.Module, columns: Sequence[str]) -> dict[str, str]:
        """``<ebc>.embedding_bags.<table>`` -> the column of the table's feature.

        Every table whose (first) feature name is a column is mapped; a table shared by several
        features takes its first feature's column for its frequency counts.
        """
        path, ebc = embedding_bag_collection(unwrap_model(model))
        prefix = f"{path}.embedding_bags" if path else "embedding_bags"
        fields = {}
        for config in ebc.embedding_bag_configs():
            names = [n for n in config.feature_names if n in columns]
            if names:
                fields[f"{prefix}.{config.name}"] = names[0]
        return fields


TORCHREC = register_adapter(TorchRecAdapter())
