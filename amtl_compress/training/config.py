"""The configurations of a training run: :class:`FinetuneConfig` (AMTL fine-tuning, stored in the
run directory's ``config.json``) and :class:`TrainConfig` (baseline training).

Both follow the package's config style (amtl_compress/_config.py): frozen dataclasses with a
``version``, validated on construction (ConfigError, a ValueError), ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from amtl_compress._config import check_version, known_keys
from amtl_compress.core.amtl import AMTLConfig
from amtl_compress.errors import ConfigError

_FINETUNE_VERSIONS = (1,)
_TRAIN_VERSIONS = (1,)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuning run (stored in the run's ``config.json``).

    Args:
        fields: module-path target -> data column feeding that table. A target is an exact
            module path, a path suffix (``user_id`` matches ``embeddings.user_id``) or a regex.
        epochs: passes over the training data.
        batch_size: rows per optimiser step and process: under torchrun with W processes a step
            averages the gradients of W batches, so it sees W x ``batch_size`` rows (pass the
            single-process batch size / W to train on the same rows per step).
        lr: Adam learning rate of the model's own parameters (embeddings and MLPs). 1e-2
            recovers the AUC lost to the cut dims within the 3 epochs (MovieLens-100k validation
            AUC at budget 0.4: 0.7697 at 1e-3, 0.7754 at 3e-3, 0.7767 at 1e-2; docs/amtl.md).
        amtl_lr: initial Adam learning rate of the AMTL layers; it decays linearly to 0.
        final_temperature: if set, T is annealed geometrically from ``amtl.temperature`` to this
            value over the run.
        target_ratio: if set, the kept values / (N*D) each AMTL table lands on: the nearest
            ratio its rows can reach, since rows that share a count share a length
            (core/budget.py, docs/amtl.md).
        budget_weight: with ``target_ratio``, the Lagrangian term ``budget_weight * sum_t mu_t *
            expected_ratio_t`` (core/budget.py) is added to the loss, so every row, not only the
            rows a batch touches, feels the price of its length; 0 = the price acts on the
            selection only. >= 0.
        seed: seeds parameter init of AMTL and the data order.
        label: name of the label column.
        save_every: optimiser steps between resumable-state saves.
        amtl: the AMTL layer's own configuration (its defaults: ``ordering="pca"``, the recipe
            docs/benchmarks.md measured).
        version: format version of this config, for reading old run directories.

    Raises:
        ConfigError: (a ValueError) a field is out of range.
    """

    fields: dict[str, str] = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-2
    amtl_lr: float = 3e-3
    final_temperature: float | None = None
    target_ratio: float | None = None
    budget_weight: float = 1.0
    seed: int = 0
    label: str = "label"
    save_every: int = 200
    amtl: AMTLConfig = field(default_factory=AMTLConfig)
    version: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ConfigError("epochs, batch_size and save_every must be >= 1")
        if self.lr <= 0 or self.amtl_lr <= 0:
            raise ConfigError("lr and amtl_lr must be > 0")
        if self.final_temperature is not None and self.final_temperature <= 0:
            raise ConfigError("final_temperature must be > 0")
        if self.target_ratio is not None and not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        if not self.budget_weight >= 0:
            raise ConfigError(
                f"`budget_weight` must be >= 0, got {self.budget_weight}; "
                "use 1.0 (the default) or 0 to price the selection only"
            )
        check_version(FinetuneConfig, self.version, _FINETUNE_VERSIONS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["amtl"] = self.amtl.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict`; unknown keys or version raise ConfigError, missing keys
        get their defaults."""
        data = known_keys(cls, data)
        data["amtl"] = AMTLConfig.from_dict(data.get("amtl", {}))
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of baseline training.

    Args:
        embedding_dim: D of every table, >= 1.
        bottom_mlp: hidden sizes of the bottom MLP on dense features (its output is D).
        top_mlp: hidden sizes of the top MLP (its output is one logit).
        epochs: passes over the training data, >= 1.
        batch_size: rows per optimiser step and process (under torchrun a step sees W x this).
        lr: Adam learning rate, > 0.
        seed: parameter init and data order.
        label: name of the label column.
        version: format version of this config.

    Raises:
        ConfigError: (a ValueError) a field is out of range.
    """

    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (32,)
    top_mlp: tuple[int, ...] = (64, 32)
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0
    label: str = "label"
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("bottom_mlp", "top_mlp"):  # JSON has no tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("embedding_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.bottom_mlp + self.top_mlp):
            raise ConfigError("TrainConfig MLP widths must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"`lr` must be a finite number > 0, got {self.lr}; e.g. 3e-3")
        check_version(TrainConfig, self.version, _TRAIN_VERSIONS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["bottom_mlp"], out["top_mlp"] = list(self.bottom_mlp), list(self.top_mlp)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys or version raise ConfigError, missing keys
        get their defaults."""
        return cls(**known_keys(cls, data))


def parse_field(spec: str) -> tuple[str, str]:
    """One :attr:`FinetuneConfig.fields` entry from text: ``"user_table=user_id"`` ->
    ``("user_table", "user_id")``; ``"user_id"`` -> the same name for both.

    Raises:
        ConfigError: an empty target or column.
    """
    target, sep, column = spec.partition("=")
    target, column = target.strip(), column.strip()
    if not target or (sep and not column):
        raise ConfigError(
            f"bad `fields` entry `{spec}`; use `MODULE=COLUMN` or a bare name used for both"
        )
    return target, column if sep else target
