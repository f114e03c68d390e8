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
from amtl_compress.surgery.targets import check_field_template

#: Version 1 predates ``dense_lr``: every model parameter was trained at ``lr``.
_FINETUNE_VERSIONS = (1, 2)

#: ``FinetuneConfig.budget_warmup``'s default (docs/amtl.md, "Gradual budget").
DEFAULT_BUDGET_WARMUP = 0.1
#: ``FinetuneConfig.max_auc_drop``'s default: about the seed noise of MovieLens-100k validation
#: AUC (docs/amtl.md).
DEFAULT_MAX_AUC_DROP = 0.002
#: The ``target_ratio`` that asks the truncation plan for each table's R.
AUTO = "auto"
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
        lr: Adam learning rate of the model's embedding tables (every ``nn.Embedding`` /
            ``nn.EmbeddingBag`` weight, the AMTL tables and any other). 1e-2 recovers the AUC
            lost to the cut dims within the 3 epochs (MovieLens-100k validation AUC at budget
            0.4: 0.7697 at 1e-3, 0.7754 at 3e-3, 0.7767 at 1e-2; docs/amtl.md).
        dense_lr: Adam learning rate of every other parameter of the model (MLPs, interaction
            and output layers), >= 0. 0 (the default) freezes them: fine-tuning changes the
            tables only, the recipe with the smallest worst-case validation loss over the three
            tasks of docs/amtl.md ("Fine-tuning the tables only"; MovieLens-100k 0.7789 against
            0.7755 with every parameter at ``lr``). Version 1 configs (written before this
            field) read as ``dense_lr = lr``.
        amtl_lr: initial Adam learning rate of the AMTL layers; it decays linearly to 0.
        final_temperature: if set, T is annealed geometrically from ``amtl.temperature`` to this
            value over the run.
        target_ratio: the memory budget, kept values / (N*D) each AMTL table lands on (the
            nearest ratio its rows can reach, since rows that share a count share a length;
            core/budget.py, docs/amtl.md): one R for every table; a dict target -> R keyed
            like ``fields`` (every key must match a chosen table; tables no key names get no
            budget); ``"auto"``, a per-table R from the training-free truncation plan on the
            validation data (``max_auc_drop``); or None, the paper's loss (nothing is cut
            unless the loss alone shortens rows).
        max_auc_drop: with ``target_ratio="auto"``, the validation AUC each table's truncation
            may lose (amtl_compress/planning.py, ``recommend_ratios``), >= 0.
        budget_warmup: share of the optimiser steps over which each table's ratio is annealed
            linearly from 1 (nothing cut: the trained model's outputs) to its R, in [0, 1]. An
            epoch that ends before the warmup is over does not meet the budget. Default 0.1:
            the best of the warmups on MovieLens-100k validation (best-epoch AUC 0.7763, against
            0.7753 / 0.7747 for 0.25 / 0.5; 0, no warmup, scored 0.7773 but cuts the trained
            model at step 0; docs/amtl.md, "Gradual budget").
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
    dense_lr: float = 0.0
    amtl_lr: float = 3e-3
    final_temperature: float | None = None
    target_ratio: float | dict[str, float] | str | None = None
    max_auc_drop: float = DEFAULT_MAX_AUC_DROP
    budget_warmup: float = DEFAULT_BUDGET_WARMUP
    budget_weight: float = 1.0
    seed: int = 0
    label: str = "label"
    save_every: int = 200
    amtl: AMTLConfig = field(default_factory=AMTLConfig)
    version: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ConfigError("epochs, batch_size and save_every must be >= 1")
        if self.lr <= 0 or self.amtl_lr <= 0:
            raise ConfigError("lr and amtl_lr must be > 0")
        if not (math.isfinite(self.dense_lr) and self.dense_lr >= 0):
            raise ConfigError(
                f"`dense_lr` must be a number >= 0, got {self.dense_lr}; 0 (the default) "
                "freezes every parameter outside the embedding tables"
            )
        if self.final_temperature is not None and self.final_temperature <= 0:
            raise ConfigError("final_temperature must be > 0")
        _check_target_ratio(self.target_ratio)
        if not (math.isfinite(self.max_auc_drop) and self.max_auc_drop >= 0):
            raise ConfigError(
                f"`max_auc_drop` must be a number >= 0, got {self.max_auc_drop}; e.g. "
                f"{DEFAULT_MAX_AUC_DROP}"
            )
        if not 0.0 <= self.budget_warmup <= 1.0:
            raise ConfigError(
                f"`budget_warmup` must be in [0, 1] (a share of the steps), got "
                f"{self.budget_warmup}"
            )
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
        get their defaults. A version 1 dict keeps its meaning: ``dense_lr = lr``."""
        data = known_keys(cls, data)
        data["amtl"] = AMTLConfig.from_dict(data.get("amtl", {}))
        if data.get("version") == 1:
            data.setdefault("dense_lr", data.get("lr", cls.lr))
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


def _check_target_ratio(target: object) -> None:
    """ConfigError unless ``target`` is None, "auto", an R in (0, 1] or a non-empty dict of them."""
    def bad_ratio(r: object) -> bool:
        return isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0

    if target is None or target == AUTO:
        return
    if isinstance(target, dict):
        if not target:
            raise ConfigError(
                "`target_ratio` is an empty dict; give target -> R pairs, or None for no budget"
            )
        for key, r in target.items():
            if not isinstance(key, str) or not key or bad_ratio(r):
                raise ConfigError(
                    f"`target_ratio` entry {key!r}: {r!r} is not a table name with an R in "
                    "(0, 1]; e.g. {'item_id': 0.3}"
                )
        return
    if isinstance(target, str) or bad_ratio(target):
        raise ConfigError(
            f"`target_ratio` must be an R in (0, 1], a dict table -> R, \"{AUTO}\" or None; got "
            f"{target!r}"
        )


def parse_target_ratio(specs: list[str]) -> float | dict[str, float] | str | None:
    """:attr:`FinetuneConfig.target_ratio` from the CLI's repeatable ``--target-ratio``:
    ``["0.4"]`` -> 0.4, ``["auto"]`` -> "auto", ``["item_id=0.3", "user_id=0.5"]`` -> a dict,
    ``[]`` -> None.

    Raises:
        ConfigError: a value that is not a number, or a bare R or "auto" mixed with others.
    """
    if not specs:
        return None
    if len(specs) == 1 and "=" not in specs[0]:
        spec = specs[0].strip()
        if spec == AUTO:
            return AUTO
        try:
            return float(spec)
        except ValueError:
            raise ConfigError(
                f"bad `target_ratio` `{spec}`; use a number like 0.4, `TABLE=R`, or auto"
            ) from None
    out: dict[str, float] = {}
    for spec in specs:
        table, sep, value = spec.partition("=")
        table = table.strip()
        try:
            ratio = float(value)
        except ValueError:
            ratio = None
        if not sep or not table or ratio is None:
            raise ConfigError(
                f"bad `target_ratio` `{spec}` among several; give each as `TABLE=R`, e.g. "
                "item_id=0.3 (one bare R or auto stands alone)"
            )
        out[table] = ratio
    return out


def parse_field(spec: str) -> tuple[str, str]:
    """One :attr:`FinetuneConfig.fields` entry from text: ``"user_table=user_id"`` ->
    ``("user_table", "user_id")``; ``"user_id"`` -> the same name for both.

    A template (``"emb_l.{i}=cat_{i}"``) selects every table its module path matches and
    names each one's column from the placeholders (surgery/targets.py, ``field_column``).

    Raises:
        ConfigError: an empty target or column, or a column placeholder the target lacks.
    """
    target, sep, column = spec.partition("=")
    target, column = target.strip(), column.strip()
    if not target or (sep and not column):
        raise ConfigError(
            f"bad `fields` entry `{spec}`; use `MODULE=COLUMN` or a bare name used for both"
        )
    if sep:
        check_field_template(target, column)
    return target, column if sep else target
