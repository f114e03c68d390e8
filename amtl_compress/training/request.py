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
from amtl_compress.models.adapters.call import (
    ModelCall,
    adapter_list_padding,
    check_model_call,
    first_batch,
    recorded_output,
    resolve_adapter,
)
from amtl_compress.surgery.targets import field_column, find_embedding_modules
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
    adapter: str | None = None
    output: str | None = None


@dataclass
class Inputs:
    """What the request resolved to, checked: the model, the data, and the full counts."""

    model: nn.Module
    spec: dict[str, Any]  # records the adapter and output of ``call`` (models/factory.py)
    train_data: CTRData
    valid_data: CTRData
    column_of: dict[str, str]  # module path -> data column
    dims: dict[str, int]  # module path -> D
    counts: dict[str, torch.Tensor]  # module path -> int64 (N,), over all ranks' shards
    steps_per_epoch: int  # batches of this rank's shard; the same on every rank
    call: ModelCall  # how the loops call the model: its adapter, logits or probabilities
    call_note: str  # what the output was taken for, and why (printed, kept in metrics.json)


def prepare(request: FinetuneRequest, world: World) -> Inputs:
    """Load and check everything ``request`` needs, before any long work; count the frequencies.

    Raises (on every rank, when any rank fails):
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
        ConfigError: no ``config.fields`` and no default from the adapter; an unknown adapter;
            a model whose forward does not take the adapter's call or returns the wrong shape
            (models/adapters/call.py ``check_model_call``).
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
        torch.manual_seed(config.seed)
        model, spec = load_model(request.checkpoint, request.model_factory)
        model.to(world.device)
        adapter = resolve_adapter(model, request.adapter, spec)
        padding = adapter_list_padding(adapter)
        train_data = open_data(request.data, label=config.label, list_padding=padding)
        valid_data = open_data(request.valid, label=config.label, list_padding=padding)
        # The same on every rank; DataError when the data has too few rows for W shards.
        steps_per_epoch = train_data.num_batches(config.batch_size, world.rank, world.size)

        fields = dict(config.fields) or adapter.default_fields(model, valid_data.columns)
        if not fields:
            raise ConfigError("no `fields` given; name at least one embedding table to compress")
        matched = find_embedding_modules(model, list(fields))
        modules = dict(model.named_modules())
        column_of = {
            path: field_column(target, fields[target], path) for path, target in matched.items()
        }
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
        # One batch through the model before any long work: its call and output are checked
        # (and probabilities told from logits) on every rank alike, from the same rows.
        batch = first_batch(valid_data.batches(min(config.batch_size, 1024)))
        batch = {k: v.to(world.device) for k, v in batch.items()}
        call, note = check_model_call(
            model, adapter, batch, recorded_output(request.output, spec)
        )
        if spec.get("kind") != "dlrm":  # the reference DLRM's spec needs neither
            spec = {**spec, **call.spec_entries()}
    if request.counts_file is None:
        for shard_counts in counts.values():
            world.all_reduce_(shard_counts)  # the shards' counts sum to the full counts
    return Inputs(model, spec, train_data, valid_data, column_of, dims, counts, steps_per_epoch,
                  call, note)
