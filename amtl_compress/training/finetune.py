"""Fine-tune a trained model with AMTL attached (warm start, paper Section 3.4).

``finetune`` loads every trained weight, attaches AMTL to the chosen embedding tables, trains the
model and the AMTL layers together (task loss + optional memory-budget penalty), keeps the best
validation epoch, and writes the run directory described in docs/design.md. Under torchrun the
same function runs data-parallel, one rank per process (training/distributed.py, docs/scaling.md).

The pieces, in order: :func:`_prepare` (load and check the request, count frequencies),
:func:`_start` (attach AMTL, optimiser, resume), :func:`_train` (the step loop, with
:func:`_step` and :func:`_end_epoch`), :func:`_finish` (best epoch, detach, write the run dir).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.checkpoint import load_model
from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.budget import apply_budget_
from amtl_compress.data import CTRData, count_frequencies, open_data, read_counts
from amtl_compress.errors import (
    AmtlError,
    ConfigError,
    OutputExistsError,
    RunDirError,
    TrainingError,
)
from amtl_compress.surgery.attach import (
    amtl_layers,
    amtl_parameters,
    attach_amtl_,
    detach_amtl,
    model_parameters,
)
from amtl_compress.surgery.targets import find_embedding_modules
from amtl_compress.training.distributed import (
    World,
    mark_every_rank,
    process_group,
    raised_on_every_rank,
    wrap_ddp,
)
from amtl_compress.training.loop import bce_step, evaluate, read_batches, sync_batch
from amtl_compress.training.run_dir import table_report, write_run_dir
from amtl_compress.training.state import has_state, load_state, save_state

#: How close the realized memory ratio must land to ``target_ratio`` for an epoch to count as
#: meeting the budget.
BUDGET_TOLERANCE = 0.02


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
        amtl: the AMTL layer's own configuration; by default with ``ordering="pca"``
            (dimension ordering, surgery/rotation.py), the recipe docs/benchmarks.md measured.
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
    amtl: AMTLConfig = field(default_factory=lambda: AMTLConfig(ordering="pca"))
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
                f"`budget_weight` (--budget-weight) must be >= 0, got {self.budget_weight}; "
                "use 1.0 (the default) or 0 to price the selection only"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["amtl"] = self.amtl.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        data = dict(data)
        data["amtl"] = AMTLConfig.from_dict(data.get("amtl", {}))
        return cls(**data)


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the run directory and its metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    lengths: dict[str, torch.Tensor]


def parse_field(spec: str) -> tuple[str, str]:
    """``"user_table=user_id"`` -> ``("user_table", "user_id")``; ``"user_id"`` -> both the same."""
    target, sep, column = spec.partition("=")
    target, column = target.strip(), column.strip()
    if not target or (sep and not column):
        raise AmtlError(
            f"bad --field `{spec}`; use `MODULE=COLUMN` or a bare name used for both"
        )
    return target, column if sep else target


def _resume_dir(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def _temperature_at(config: FinetuneConfig, step: int, total_steps: int) -> float:
    start = config.amtl.temperature
    if config.final_temperature is None or total_steps <= 1:
        return start
    frac = min(step / (total_steps - 1), 1.0)
    return start * (config.final_temperature / start) ** frac


@dataclass
class _Inputs:
    """What the request resolved to, checked: the model, the data, and the full counts."""

    model: nn.Module
    spec: dict[str, Any]
    train_data: CTRData
    valid_data: CTRData
    column_of: dict[str, str]  # module path -> data column
    dims: dict[str, int]  # module path -> D
    counts: dict[str, torch.Tensor]  # module path -> int64 (N,), over all ranks' shards
    steps_per_epoch: int  # batches of this rank's shard; the same on every rank


@dataclass
class _Run:
    """A fine-tuning run in progress on one rank (of ``world``)."""

    config: FinetuneConfig
    world: World
    model: nn.Module  # AMTL attached; evaluated and saved
    ddp: nn.Module  # what the steps call: ``model`` in DistributedDataParallel, or ``model``
    layers: dict[str, AMTL]
    optimizer: torch.optim.Optimizer
    train_data: CTRData
    valid_data: CTRData
    state_dir: Path
    progress: dict[str, Any]  # step, history, best, config, world_size: the resumable part
    before: dict[str, float]
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def save(self, step: int) -> None:
        """Rank 0 writes the resumable state at ``step``; every rank waits until it is written."""
        self.progress["step"] = step
        with self.world.errors_agreed():
            if self.world.is_main:
                save_state(self.state_dir, self.model, self.optimizer, self.progress)


def finetune(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: FinetuneConfig,
    model_factory: str | None = None,
    counts_file: str | os.PathLike[str] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``checkpoint`` with AMTL on ``config.fields`` and write the run directory ``out``.

    Under ``torchrun`` every rank calls this with the same arguments and the run is data-parallel
    (docs/scaling.md): each rank trains on its shard of ``data`` with ``config.batch_size`` rows
    per step (W x that many per step in all), the counts are summed over the shards, and rank 0
    alone writes ``out`` and ``<out>.resume``, which must be on a filesystem every rank sees.

    Args:
        checkpoint: trained weights (``.safetensors``, or a ``.pt`` state_dict).
        data: training data (Parquet or CSV, or a folder/glob of Parquet files; docs/data.md).
        valid: validation data; AUC/logloss before training and after every epoch, best epoch kept.
        out: run directory to create (written atomically; see docs/design.md for its files).
        config: the run's hyper-parameters.
        model_factory: ``package.module:function`` building the model; optional when the
            checkpoint carries a model spec (the reference DLRM does).
        counts_file: per-column frequency counts to use instead of counting ``data``.
        resume: continue from ``<out>.resume`` if an interrupted run with the same config left it.
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar on stderr (rank 0 only).
    """
    with process_group() as world:
        # A call, so that its DDP model is gone when the process group is torn down.
        return _finetune(world, checkpoint, data, valid, Path(out), config, model_factory,
                         counts_file, resume, overwrite, progress)


def _finetune(
    world: World,
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: Path,
    config: FinetuneConfig,
    model_factory: str | None,
    counts_file: str | os.PathLike[str] | None,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> FinetuneResult:
    inputs = _prepare(checkpoint, data, valid, out, config, model_factory, counts_file,
                      overwrite, world)
    run = _start(inputs, config, out, resume, world)
    _train(run, progress)
    return _finish(run, inputs, checkpoint, data, valid, out, overwrite)


def _prepare(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: Path,
    config: FinetuneConfig,
    model_factory: str | None,
    counts_file: str | os.PathLike[str] | None,
    overwrite: bool,
    world: World,
) -> _Inputs:
    """Load and check everything the run needs, before any long work; count the frequencies."""
    # Every check runs on every rank before the first collective that depends on it, and one
    # failing rank (a bad row in its shard) makes all fail with its error, once.
    with world.errors_agreed():
        if out.exists() and not overwrite:
            raise OutputExistsError(
                f"output directory `{out}` exists; pass --overwrite or choose another --out"
            )
        if not config.fields:
            raise AmtlError("no --field given; name at least one embedding table to compress")
        torch.manual_seed(config.seed)
        model, spec = load_model(checkpoint, model_factory)
        model.to(world.device)
        train_data = open_data(data, label=config.label)
        valid_data = open_data(valid, label=config.label)
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
            if counts_file is not None:
                counts[path] = read_counts(counts_file, column, num_rows[path])
            else:
                counts[path] = count_frequencies(
                    data, column, num_rows[path], rank=world.rank, world_size=world.size
                )
    if counts_file is None:
        for shard_counts in counts.values():
            world.all_reduce_(shard_counts)  # the shards' counts sum to the full counts
    return _Inputs(model, spec, train_data, valid_data, column_of, dims, counts, steps_per_epoch)


def _start(
    inputs: _Inputs, config: FinetuneConfig, out: Path, resume: bool, world: World
) -> _Run:
    """Score the trained model, attach AMTL, build the optimiser and restore an interrupted run."""
    model = inputs.model
    before = evaluate(model, inputs.valid_data.batches(config.batch_size), world)
    with world.errors_agreed():
        attach_amtl_(model, inputs.counts, config.amtl)
        layers = amtl_layers(model)
        optimizer = torch.optim.Adam(
            [
                {"params": model_parameters(model), "lr": config.lr},
                {"params": amtl_parameters(model), "lr": config.amtl_lr},
            ]
        )
    state_dir = _resume_dir(out)
    progress_state = _resume_or_restart(state_dir, model, optimizer, config, resume, world)
    with world.errors_agreed():
        if config.target_ratio is not None:
            apply_budget_(layers, config.target_ratio)  # train under the budget from step 0
    # After the resume: DDP broadcasts rank 0's weights as they are now (the same on every rank:
    # the same checkpoint, seed, counts and state file; the broadcast makes sure of it).
    ddp = wrap_ddp(model, world)
    return _Run(config, world, model, ddp, layers, optimizer, inputs.train_data,
                inputs.valid_data, state_dir, progress_state, before, inputs.steps_per_epoch)


def _resume_or_restart(
    state_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    resume: bool,
    world: World,
) -> dict[str, Any]:
    """Load the state an interrupted run left in ``state_dir`` (every rank reads rank 0's file),
    or clear the directory; returns the progress to start from."""
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    with world.errors_agreed():
        saved = None
        if resume and has_state(state_dir):
            saved = load_state(state_dir, model, optimizer)
            if saved.get("config") != config_json:
                raise RunDirError(
                    f"`{state_dir}` holds an interrupted run with a different configuration; "
                    "rerun with the same options, or pass --no-resume to start over"
                )
            # A state saved before runs had ranks comes from a single process.
            saved_world = saved.get("world_size", 1)
            if saved_world != world.size:
                raise RunDirError(
                    f"`{state_dir}` was saved by a run of {saved_world} process(es), this one has "
                    f"{world.size}; resume with as many (torchrun --nnodes x --nproc_per_node), "
                    "or pass --no-resume to start over"
                )
    if world.active:
        steps = world.gather_rows(torch.tensor([-1 if saved is None else saved["step"]]))
        with world.errors_agreed():
            if len({int(s) for s in steps}) > 1:
                raise RunDirError(
                    f"the ranks do not see the same resume state in `{state_dir}` (saved step "
                    f"by rank: {[int(s) for s in steps]}, -1 = none); put --out on a "
                    "filesystem every node shares"
                )
    if saved is not None:
        return saved
    with world.errors_agreed():
        if world.is_main and state_dir.exists():
            shutil.rmtree(state_dir)
    if world.active:
        _check_shared(state_dir, world)
    return {
        "step": 0, "history": [], "best": None, "config": config_json, "world_size": world.size,
    }


def _check_shared(state_dir: Path, world: World) -> None:
    """Fail now, not at the first resume, when rank 0's files are invisible to other ranks.

    Rank 0 writes the resume state and the best epoch's weights, and every rank reads them back
    (resume, end of run), so ``state_dir`` must be on a filesystem all ranks share.
    """
    with world.errors_agreed():
        if world.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
    with world.errors_agreed():
        if not state_dir.is_dir():
            raise RunDirError(
                f"rank {world.rank} does not see `{state_dir}`, which rank 0 created; put --out "
                "on a filesystem every node shares"
            )
    with world.errors_agreed():
        if world.is_main:
            state_dir.rmdir()  # empty until the first save; a run that fails leaves nothing


def _budget_penalty(
    config: FinetuneConfig, layers: dict[str, AMTL]
) -> Callable[[], torch.Tensor] | None:
    """The Lagrangian's memory term ``budget_weight * sum_t mu_t * expected_ratio_t``, or None."""
    if config.target_ratio is None or config.budget_weight == 0:
        return None

    def penalty() -> torch.Tensor:
        # Its gradient shortens rows the task does not defend (rare rows barely appear in
        # batches, so without it they keep their start length). It is computed outside the
        # model's forward, from the same weights on every rank: under DDP it joins the task
        # loss before backward, and the average over ranks of identical gradients is itself.
        term = sum(layer.price * layer.expected_ratio() for layer in layers.values())
        return config.budget_weight * term

    return penalty


def _train(run: _Run, progress: bool) -> None:
    """The step loop, from the saved step to the last: epoch ends, periodic saves, Ctrl-C."""
    config, world = run.config, run.world
    penalty = _budget_penalty(config, run.layers)
    step = run.progress["step"]
    bar = tqdm(
        total=run.total_steps, initial=step, desc="finetune", unit="step", file=sys.stderr,
        disable=not progress or not world.is_main, dynamic_ncols=True,
    )
    running = None
    run.model.train()
    with _DeferredInterrupt() as interrupt:
        while step < run.total_steps:
            epoch, skip = divmod(step, run.steps_per_epoch)
            batches = run.train_data.batches(
                config.batch_size, shuffle=True, seed=config.seed * 100_003 + epoch,
                rank=world.rank, world_size=world.size,
            )
            for i, item in enumerate(read_batches(batches, run.steps_per_epoch)):
                if i < skip and not isinstance(item, Exception):
                    continue  # already done before the interruption
                # Ctrl-C: stop between steps with a resumable state, every rank before this one.
                if sync_batch(item, world, stop=interrupt.requested):
                    run.save(step)
                    raise mark_every_rank(KeyboardInterrupt())
                features, labels = item  # type: ignore[misc]  # sync_batch raised errors
                loss, ratios = _step(run, step, features, labels, penalty)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                step += 1
                postfix = {"loss": f"{running:.4f}", "epoch": epoch + 1}
                if ratios:
                    postfix["ratio"] = f"{sum(ratios.values()) / len(ratios):.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if step % run.steps_per_epoch == 0:
                    _end_epoch(run, step)
                if step % config.save_every == 0 or step % run.steps_per_epoch == 0:
                    run.save(step)
    bar.close()


def _step(
    run: _Run,
    step: int,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None,
) -> tuple[float, dict[str, float]]:
    """Optimiser step ``step`` (0-based, global: every rank is at the same step).

    Returns:
        (the BCE, averaged over the ranks; table -> realized ratio, empty without a budget).
    """
    config = run.config
    for layer in run.layers.values():
        layer.temperature = _temperature_at(config, step, run.total_steps)
    # The AMTL learning rate decays linearly to 0: under STE the hard lengths keep flipping
    # while it is large, and the budget can only be met once they settle.
    run.optimizer.param_groups[1]["lr"] = config.amtl_lr * (1 - step / run.total_steps)
    try:
        loss = bce_step(run.ddp, run.optimizer, features, labels, penalty, run.world)
    except TrainingError as exc:
        # bce_step did not apply the faulty step: keep this state resumable, unless the weights
        # themselves went bad, then the last save stays the good one. Under DDP every rank gets
        # here at the same step (bce_step checks the loss of all ranks, and marks its error),
        # with the same weights; an error of one rank alone cannot be saved collectively.
        if not raised_on_every_rank(exc) and run.world.active:
            raise
        if _all_finite(run.model):
            run.save(step)
            where = f"the state before step {step + 1} is saved in `{run.state_dir}`"
        else:
            where = f"the last good state is in `{run.state_dir}`"
        reason = str(exc).split(";")[0]
        error = TrainingError(
            f"{reason} at step {step + 1}; {where} - lower the learning rate "
            "(--lr / --amtl-lr) or check the data for extreme values"
        )
        if raised_on_every_rank(exc):
            mark_every_rank(error)
        raise error from None
    ratios: dict[str, float] = {}
    if config.target_ratio is not None:
        ratios = apply_budget_(run.layers, config.target_ratio)
    return loss, ratios


def _end_epoch(run: _Run, step: int) -> None:
    """Validate, record the epoch, and save its weights if it is the best so far."""
    config, progress_state = run.config, run.progress
    epoch = len(progress_state["history"]) + 1
    scores = evaluate(run.model, run.valid_data.batches(config.batch_size), run.world)
    for path, layer in run.layers.items():
        # Identical weights give identical lengths; a cheap proof that the ranks agree.
        run.world.check_same(f"row lengths of `{path}`", layer.lengths())
    ratios = {path: layer.realized_ratio() for path, layer in run.layers.items()}
    meets_budget = config.target_ratio is None or all(
        abs(r - config.target_ratio) <= BUDGET_TOLERANCE for r in ratios.values()
    )
    record = {
        "epoch": epoch, "step": step, **scores, "ratios": ratios, "meets_budget": meets_budget
    }
    progress_state["history"].append(record)
    best = progress_state["best"]
    # An epoch that meets the budget always beats one that does not; then higher AUC wins.
    better = best is None or (meets_budget, _finite(scores["auc"])) > (
        best["meets_budget"], _finite(best["auc"])
    )
    if better:
        progress_state["best"] = record
        with run.world.errors_agreed():
            if run.world.is_main:
                run.state_dir.mkdir(parents=True, exist_ok=True)
                atomic_save_safetensors(run.model.state_dict(), run.state_dir / "best.safetensors")


def _finish(
    run: _Run,
    inputs: _Inputs,
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: Path,
    overwrite: bool,
) -> FinetuneResult:
    """Restore the best epoch, take AMTL off, score the result and write the run directory."""
    config, world = run.config, run.world
    best = run.progress["best"]
    best_weights = run.state_dir / "best.safetensors"
    with world.errors_agreed():
        if best is not None and best_weights.exists():
            run.model.load_state_dict(load_file(str(best_weights)))
    amtl_state = {
        f"{path}.{k}": v.detach().to("cpu", copy=True)
        for path, layer in run.layers.items()
        for k, v in layer.state_dict().items()
    }
    model, lengths = detach_amtl(run.model, merge=True)
    after = evaluate(model, run.valid_data.batches(config.batch_size), world)
    per_table, ratio = table_report(lengths, inputs.column_of, inputs.dims)
    collapsed = [path for path, table in per_table.items() if table["collapsed"]]
    if collapsed:
        warnings.warn(CollapseWarning(collapsed), stacklevel=3)  # at finetune's caller
    metrics = {
        "before": run.before,
        "after": after,
        "epochs": run.progress["history"],
        "best_epoch": None if best is None else best["epoch"],
        "tables": per_table,
        "memory_ratio": ratio,
        "target_ratio": config.target_ratio,
        "collapsed": collapsed,
        "world_size": world.size,
    }
    run_config = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "data": str(Path(data).resolve()),
        "valid": str(Path(valid).resolve()),
        "model": inputs.spec,
        "tables": inputs.column_of,
        "finetune": config.to_dict(),
        # config.batch_size rows per rank: each step saw world_size times as many.
        "world_size": world.size,
    }
    with world.errors_agreed():
        if world.is_main:
            write_run_dir(out, overwrite, model, inputs.spec, lengths, amtl_state, run_config,
                          metrics)
            shutil.rmtree(run.state_dir, ignore_errors=True)
    return FinetuneResult(run_dir=out, metrics=metrics, lengths=lengths)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


class CollapseWarning(UserWarning):
    """Fine-tuning cut every row of a table to length 1: the AMTL layer collapsed.

    Such a table keeps one value per row, which is rarely what the budget asked for; it usually
    means the memory price or the learning rate of the AMTL layers was too high.
    """

    def __init__(self, tables: list[str]) -> None:
        self.tables = tables
        names = ", ".join(f"`{t}`" for t in tables)
        super().__init__(
            f"AMTL collapsed every row of {names} to length 1; raise --target-ratio or lower "
            "--amtl-lr and fine-tune again"
        )


class _DeferredInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a flag that the loop checks between steps.

    An interrupt in the middle of an optimiser step would leave half-updated weights; deferring
    it lets the loop save a state that resumes exactly. A second Ctrl-C interrupts at once.
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
