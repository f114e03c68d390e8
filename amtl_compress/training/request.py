"""What a ``finetune`` call asks for (:class:`FinetuneRequest`) and what it resolves to, checked
(:class:`Inputs`): the model, the data and the frequency counts of every table to compress."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amtl_compress.checkpoint import load_model
from amtl_compress.data import CTRData, count_frequencies, open_data, read_counts
from amtl_compress.errors import ConfigError, OutputExistsError
from amtl_compress.surgery.targets import find_embedding_modules
from amtl_compress.training.config import FinetuneConfig
from amtl_compress.training.distributed import World


@dataclass(frozen=True)
class FinetuneRequest:
    """One call of :func:`~amtl_compress.training.finetune.finetune`: what to fine-tune, on what,
    into where, and how (its Args say what each field means)."""

    checkpoint: str | os.PathLike[str]
    data: str | os.PathLike[str]
    valid: str | os.PathLike[str]
    out: Path
    config: FinetuneConfig
    model_factory: str | None = None
    counts_file: str | os.PathLike[str] | None = None
    resume: bool = True
    overwrite: bool = False
    progress: bool = True


@dataclass
class Inputs:
    """What the request resolved to, checked: the model, the data, and the full counts."""

    model: nn.Module
    spec: dict[str, Any]
    train_data: CTRData
    valid_data: CTRData
    column_of: dict[str, str]  # module path -> data column
    dims: dict[str, int]  # module path -> D
    counts: dict[str, torch.Tensor]  # module path -> int64 (N,), over all ranks' shards
    steps_per_epoch: int  # batches of this rank's shard; the same on every rank


def prepare(request: FinetuneRequest, world: World) -> Inputs:
    """Load and check everything ``request`` needs, before any long work; count the frequencies.

    Raises (on every rank, when any rank fails):
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
        ConfigError: ``config.fields`` is empty.
        NoMatchingModuleError, CheckpointError, DataError: from the model and the data.
    """
    config, out = request.config, request.out
    # Every check runs on every rank before the first collective that depends on it, and one
    # failing rank (a bad row in its shard) makes all fail with its error, once.
    with world.errors_agreed():
        if out.exists() and not request.overwrite:
            raise OutputExistsError(
                f"output directory `{out}` exists; pass `overwrite=True` or choose another `out`"
            )
        if not config.fields:
            raise ConfigError("no `fields` given; name at least one embedding table to compress")
        torch.manual_seed(config.seed)
        model, spec = load_model(request.checkpoint, request.model_factory)
        model.to(world.device)
        train_data = open_data(request.data, label=config.label)
        valid_data = open_data(request.valid, label=config.label)
        # The same on every rank; DataError when the data has too few rows for W shards.
        steps_per_epoch = train_data.num_batches(config.batch_size, world.rank, world.size)

        matched = find_embedding_modules(model, list(config.fields))
        modules = dict(model.named_modules())
        column_of = {path: config.fields[target] for path, target in matched.items()}
        num_rows = {path: modules[path].num_embeddings for path in matched}
        dims = {path: modules[path].embedding_dim for path in matched}
        for path, column in column_of.items():
            for dataset in (train_data, valid_data):
                dataset.validate_ids(column, num_rows[path])

        counts: dict[str, torch.Tensor] = {}
        for path, column in column_of.items():
            if request.counts_file is not None:
                counts[path] = read_counts(request.counts_file, column, num_rows[path])
            else:
                counts[path] = count_frequencies(
                    request.data, column, num_rows[path], rank=world.rank, world_size=world.size
                )
    if request.counts_file is None:
        for shard_counts in counts.values():
            world.all_reduce_(shard_counts)  # the shards' counts sum to the full counts
    return Inputs(model, spec, train_data, valid_data, column_of, dims, counts, steps_per_epoch)
