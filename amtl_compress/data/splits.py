"""A CTR data set on disk: train/valid/test Parquet files plus the schema a DLRM needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amtl_compress._io import atomic_write_text
from amtl_compress.errors import DataError
from amtl_compress.models.dlrm import DLRMConfig

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class CTRSplits:
    """Paths of a train/valid/test split and the schema of its columns.

    Attributes:
        train, valid, test: Parquet files of the data contract (docs/data.md).
        categorical: categorical column -> N (ids in [0, N)).
        list_fields: list column -> N (ids in [1, N), 0 = padding; N counts the padding row).
        dense: float columns.
        label: the label column.
    """

    train: Path
    valid: Path
    test: Path
    categorical: dict[str, int]
    list_fields: dict[str, int] = field(default_factory=dict)
    dense: tuple[str, ...] = ()
    label: str = "label"

    def dlrm_config(
        self,
        embedding_dim: int = 16,
        bottom_mlp: tuple[int, ...] | None = None,
        top_mlp: tuple[int, ...] = (64, 32),
    ) -> DLRMConfig:
        """A :class:`DLRMConfig` with one table per id column of this data set.

        ``bottom_mlp`` defaults to ``(32, embedding_dim)`` when there are dense columns, else ().
        """
        if bottom_mlp is None:
            bottom_mlp = (32, embedding_dim) if self.dense else ()
        return DLRMConfig(
            categorical=dict(self.categorical),
            list_fields=dict(self.list_fields),
            dense=self.dense,
            embedding_dim=embedding_dim,
            bottom_mlp=bottom_mlp,
            top_mlp=top_mlp,
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``splits.json`` into ``directory`` (paths relative to it when inside it)."""
        d = Path(directory)
        data: dict[str, Any] = {
            "train": _relative(self.train, d),
            "valid": _relative(self.valid, d),
            "test": _relative(self.test, d),
            "categorical": self.categorical,
            "list_fields": self.list_fields,
            "dense": list(self.dense),
            "label": self.label,
        }
        out = d / SPLITS_FILE
        atomic_write_text(out, json.dumps(data, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CTRSplits:
        """Read ``splits.json`` written by :meth:`save`."""
        d = Path(directory)
        f = d / SPLITS_FILE
        if not f.is_file():
            raise DataError(
                f"`{d}` has no `{SPLITS_FILE}`: build the data set first (e.g. `build_ctr_dataset`)"
            )
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            return cls(
                train=d / data["train"],
                valid=d / data["valid"],
                test=d / data["test"],
                categorical={k: int(v) for k, v in data["categorical"].items()},
                list_fields={k: int(v) for k, v in data.get("list_fields", {}).items()},
                dense=tuple(data.get("dense", ())),
                label=data.get("label", "label"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(
                f"`{f}` is not a valid splits file ({type(exc).__name__}: {exc}): rebuild it"
            ) from None


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(directory.resolve()))
    except ValueError:
        return str(Path(path).resolve())
