"""A CTR data set on disk: train/valid/test Parquet files plus the schema of their columns.

The schema records each id column's table size, which is what a model needs to build its
embedding tables (for the reference DLRM: ``amtl_compress.models.dlrm.dlrm_config_for``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amtl_compress._io import atomic_write_text
from amtl_compress.errors import DataError

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
