"""The reference DLRM: embedding tables, a bottom MLP on dense features, pairwise dot products.

The paper applies AMTL behind the embedding layer of a DLRM backbone (Sec. 2, 3.1); this is a
small backbone of that shape (Naumov et al. 2019) for the data contract in docs/data.md. Every
table lives in ``self.embeddings`` so its module path is ``embeddings.<field>``, and is called as
``table(ids)`` with ids (B,) or (B, L): a wrapper (``MaskedEmbedding``, ``PackedEmbedding``) that
takes the same call can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amtl_compress._config import check_version, known_keys
from amtl_compress.errors import ConfigError, DataError

_CONFIG_VERSIONS = (1,)

if TYPE_CHECKING:  # annotation only: models/ does not import data/ at run time
    from amtl_compress.data.splits import CTRSplits


@dataclass(frozen=True)
class DLRMConfig:
    """Shape of a :class:`DLRM`.

    Args:
        categorical: field (column) name -> N, rows of its ``nn.Embedding``; the column feeds
            int64 ids (B,) in [0, N).
        list_fields: multi-valued field name -> N, rows of its
            ``nn.EmbeddingBag(mode="mean", padding_idx=0)``; the column feeds int64 (B, L), ids in
            [1, N), 0 = padding. N counts the padding row.
        dense: float feature columns, each fed as float32 (B,), in the bottom MLP's input order.
        embedding_dim: D, the width of every table and of the bottom MLP's output.
        bottom_mlp: widths of the bottom MLP's layers (Linear + ReLU each); must end with D when
            there are dense features; dropped (stored as ()) when there are none.
        top_mlp: widths of the top MLP's hidden layers (Linear + ReLU each); a final Linear to 1
            logit is always added.
        version: format version of this config, for reading old checkpoints' model specs.

    Field order (categorical first, then list fields, both in dict order) fixes the order of the
    interaction terms, so it is kept through :meth:`to_dict` / :meth:`from_dict`.

    Raises:
        ConfigError: (a ValueError) a field has the wrong value.
    """

    categorical: dict[str, int]
    list_fields: dict[str, int] = field(default_factory=dict)
    dense: tuple[str, ...] = ()
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = ()
    top_mlp: tuple[int, ...] = (64, 32)
    version: int = 1

    def __post_init__(self) -> None:
        # Normalize sequences so a config built from lists equals one built from tuples.
        object.__setattr__(self, "categorical", {k: int(v) for k, v in self.categorical.items()})
        object.__setattr__(self, "list_fields", {k: int(v) for k, v in self.list_fields.items()})
        object.__setattr__(self, "dense", tuple(self.dense))
        # No dense features, no bottom MLP: its widths are moot, so a generic default such as
        # (64, D) is accepted and dropped rather than refused.
        bottom = tuple(int(w) for w in self.bottom_mlp) if self.dense else ()
        object.__setattr__(self, "bottom_mlp", bottom)
        object.__setattr__(self, "top_mlp", tuple(int(w) for w in self.top_mlp))
        self._validate()

    def _validate(self) -> None:
        check_version(DLRMConfig, self.version, _CONFIG_VERSIONS)
        if self.embedding_dim < 1:
            raise ConfigError(f"DLRMConfig: embedding_dim must be >= 1, got {self.embedding_dim}")
        tables = [*self.categorical, *self.list_fields]
        names = [*tables, *self.dense]
        for name in tables:
            if not isinstance(name, str) or not name or "." in name or _clashes(name):
                raise ConfigError(
                    f"DLRMConfig: field name `{name}` cannot be a module name; "
                    "rename the column (no dots, not empty, not a ModuleDict attribute)"
                )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"DLRMConfig: field `{dup[0]}` is listed twice; list it once")
        for name, rows in self.categorical.items():
            if rows < 1:
                raise ConfigError(f"DLRMConfig: table `{name}` needs >= 1 row, got {rows}")
        for name, rows in self.list_fields.items():
            if rows < 2:
                raise ConfigError(
                    f"DLRMConfig: list table `{name}` needs >= 2 rows (row 0 is padding), "
                    f"got {rows}"
                )
        if self.dense and (not self.bottom_mlp or self.bottom_mlp[-1] != self.embedding_dim):
            raise ConfigError(
                f"DLRMConfig: bottom_mlp {self.bottom_mlp} must end with embedding_dim "
                f"{self.embedding_dim} so its output joins the interaction"
            )
        if any(w < 1 for w in self.bottom_mlp + self.top_mlp):
            raise ConfigError("DLRMConfig: MLP widths must be >= 1")
        if self.num_vectors < 2:
            raise ConfigError(
                "DLRMConfig: the interaction needs >= 2 vectors (tables, plus 1 for dense "
                "features); add a field"
            )

    @property
    def num_vectors(self) -> int:
        """F, the vectors that interact: one per table, plus the bottom MLP output if any."""
        return len(self.categorical) + len(self.list_fields) + (1 if self.dense else 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        return {
            "categorical": dict(self.categorical),
            "list_fields": dict(self.list_fields),
            "dense": list(self.dense),
            "embedding_dim": self.embedding_dim,
            "bottom_mlp": list(self.bottom_mlp),
            "top_mlp": list(self.top_mlp),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DLRMConfig:
        """Inverse of :meth:`to_dict`; unknown keys, a missing ``categorical`` or an unknown
        ``version`` raise ConfigError, other missing keys get their defaults."""
        data = known_keys(cls, data)
        if "categorical" not in data:
            raise ConfigError("DLRMConfig: key `categorical` is missing")
        return cls(**data)


def _clashes(name: str) -> bool:
    # nn.ModuleDict refuses keys that shadow its attributes, including per-instance ones such as
    # `training`, hence an instance rather than the class.
    return hasattr(nn.ModuleDict(), name)


class DLRM(nn.Module):
    """Embeddings + bottom MLP -> pairwise dot products -> top MLP -> logits.

    ``forward(batch)`` takes the data contract's dict: categorical fields int64 (B,), list fields
    int64 (B, L) with 0 = padding, dense fields float32 (B,); other keys are ignored. It returns
    logits float32 (B,).

    The F vectors (B, D) (bottom MLP output first, if there are dense features, then one per
    table in config order) interact by all F(F-1)/2 pairwise dot products; the top MLP sees the
    bottom output (if any) concatenated with them.
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.embeddings = nn.ModuleDict()
        for name, rows in config.categorical.items():
            self.embeddings[name] = nn.Embedding(rows, d)
        for name, rows in config.list_fields.items():
            self.embeddings[name] = nn.EmbeddingBag(rows, d, mode="mean", padding_idx=0)
        self.bottom = _mlp(len(config.dense), config.bottom_mlp, last_relu=True)
        f = config.num_vectors
        top_in = f * (f - 1) // 2 + (d if config.dense else 0)
        self.top = _mlp(top_in, (*config.top_mlp, 1), last_relu=False)
        i, j = torch.triu_indices(f, f, offset=1)
        self.register_buffer("_pair_i", i, persistent=False)
        self.register_buffer("_pair_j", j, persistent=False)
        self.reset_embeddings()

    @torch.no_grad()
    def reset_embeddings(self) -> None:
        """Draw every table from N(0, 1/D) (padding rows 0).

        With this scale a dot product of two rows has variance 1/D, so the interaction starts
        near the range of the logits instead of the N(0, 1) default's variance D.
        """
        std = 1.0 / math.sqrt(self.config.embedding_dim)
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=std)
            if table.padding_idx is not None:
                table.weight[table.padding_idx].zero_()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits float32 (B,) for a batch dict (see the class docstring)."""
        missing = [k for k in self._inputs() if k not in batch]
        if missing:
            raise DataError(
                f"the batch has no column `{missing[0]}` that DLRM field `{missing[0]}` reads "
                f"(batch columns: {', '.join(f'`{k}`' for k in batch)}): feed data with that column"
            )
        vectors = []
        x0 = None
        if self.config.dense:
            dense = torch.stack([batch[n] for n in self.config.dense], dim=1)
            x0 = self.bottom(dense.to(self.top[0].weight.dtype))
            vectors.append(x0)
        for name in self._tables():
            vectors.append(self.embeddings[name](batch[name]))
        t = torch.stack(vectors, dim=1)  # (B, F, D)
        dots = torch.bmm(t, t.transpose(1, 2))[:, self._pair_i, self._pair_j]  # (B, F(F-1)/2)
        top_in = dots if x0 is None else torch.cat([x0, dots], dim=1)
        return self.top(top_in).squeeze(1)

    def _tables(self) -> list[str]:
        # Config order, not ModuleDict order, so swapping a table in keeps the interaction order.
        return [*self.config.categorical, *self.config.list_fields]

    def _inputs(self) -> list[str]:
        return [*self.config.dense, *self._tables()]


def _mlp(width_in: int, widths: tuple[int, ...], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, width in enumerate(widths):
        layers.append(nn.Linear(width_in, width))
        if last_relu or k < len(widths) - 1:
            layers.append(nn.ReLU())
        width_in = width
    return nn.Sequential(*layers)


def dlrm_config_for(
    splits: CTRSplits,
    embedding_dim: int = 16,
    bottom_mlp: tuple[int, ...] | None = None,
    top_mlp: tuple[int, ...] = (64, 32),
) -> DLRMConfig:
    """A :class:`DLRMConfig` with one table per id column of a data set's splits.

    Args:
        splits: the data set (``build_ctr_dataset``, ``make_synthetic_ctr`` or
            ``CTRSplits.load``); its categorical and list columns become tables of the sizes it
            records, its dense columns the bottom MLP's input.
        embedding_dim: D of every table.
        bottom_mlp: defaults to ``(32, embedding_dim)`` when there are dense columns, else ().
        top_mlp: widths of the top MLP's hidden layers.
    """
    if bottom_mlp is None:
        bottom_mlp = (32, embedding_dim) if splits.dense else ()
    return DLRMConfig(
        categorical=dict(splits.categorical),
        list_fields=dict(splits.list_fields),
        dense=splits.dense,
        embedding_dim=embedding_dim,
        bottom_mlp=bottom_mlp,
        top_mlp=top_mlp,
    )
