"""Fine-tune a trained model with AMTL attached (warm start, paper Section 3.4).

``finetune`` loads every trained weight, attaches AMTL to the chosen embedding tables, trains the
model and the AMTL layers together (task loss + optional memory-budget penalty), keeps the best
validation epoch (with a budget, epoch 0 is a candidate too: the trained model cut to the budget
before any step), and writes the run directory (run_dir.py). Under torchrun the same function
runs data-parallel, one rank per process (training/distributed.py, docs/scaling.md).

The pieces, in order: :func:`~amtl_compress.training.request.prepare` (load and check the
:class:`FinetuneRequest`, count frequencies), :func:`_start` (attach AMTL, optimiser, resume:
training/resume.py), :func:`_score_start` (epoch 0), :func:`_train` (the step loop, with
:func:`_step` and :func:`_end_epoch`),
:func:`_finish` (best epoch, detach, write the run directory).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.core.amtl import AMTL
from amtl_compress.data import CTRData
from amtl_compress.errors import TrainingError
from amtl_compress.models.adapters.call import ModelCall
from amtl_compress.run_dir import resume_dir, table_report, write_run_dir
from amtl_compress.surgery.attach import (
    amtl_layers,
    amtl_parameters,
    attach_amtl_,
    dense_parameters,
    detach_amtl,
    table_parameters,
)
from amtl_compress.training.budget import AMTLBudget
from amtl_compress.training.config import FinetuneConfig
from amtl_compress.training.distributed import (
    World,
    mark_every_rank,
    process_group,
    raised_on_every_rank,
    wrap_ddp,
)
from amtl_compress.training.launch import DeferredInterrupt
from amtl_compress.training.loop import bce_step, evaluate, read_batches, sync_batch
from amtl_compress.training.request import FinetuneRequest, Inputs, prepare
from amtl_compress.training.result import (
    UNSEEN_SHARE,
    BudgetWarning,
    CollapseWarning,
    FinetuneResult,
    UnseenRowsWarning,
)
from amtl_compress.training.resume import resume_or_restart, save_state
from amtl_compress.training.targets import resolve_table_targets

__all__ = [
    "BUDGET_TOLERANCE", "BudgetWarning", "CollapseWarning", "FinetuneConfig", "UnseenRowsWarning",
    "FinetuneRequest", "FinetuneResult", "finetune",
]

#: How close the realized memory ratio must land to ``target_ratio`` for an epoch to count as
#: meeting the budget.
BUDGET_TOLERANCE = 0.02

#: The best epoch's weights, kept in the resume directory until the run directory is written.
_BEST_FILE = "best.safetensors"


def _temperature_at(config: FinetuneConfig, step: int, total_steps: int) -> float:
    start = config.amtl.temperature
    if config.final_temperature is None or total_steps <= 1:
        return start
    frac = min(step / (total_steps - 1), 1.0)
    return start * (config.final_temperature / start) ** frac


@dataclass
class _Run:
    """A fine-tuning run in progress on one rank (of ``world``)."""

    config: FinetuneConfig
    world: World
    model: nn.Module  # AMTL attached; evaluated and saved
    ddp: nn.Module  # what the steps call: ``model`` in DistributedDataParallel, or ``model``
    layers: dict[str, AMTL]
    budget: AMTLBudget | None  # None: no target ratio (the paper's loss)
    optimizer: torch.optim.Optimizer
    train_data: CTRData
    valid_data: CTRData
    state_dir: Path
    progress: dict[str, Any]  # step, history, best, config, world_size: the resumable part
    before: dict[str, float]
    steps_per_epoch: int
    call: ModelCall  # how the steps and evaluations call the model (adapter, probs or logits)

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
    adapter: str | None = None,
    output: str | None = None,
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
        out: run directory to create (written atomically; run_dir.py lists its files).
        config: the run's hyper-parameters.
        model_factory: ``package.module:function`` building the model; optional when the
            checkpoint carries a model spec (the reference DLRM does).
        counts_file: per-column frequency counts to use instead of counting ``data``.
        resume: continue from ``<out>.resume`` if an interrupted run with the same config left it.
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar on stderr (rank 0 only), and what the model's output was
            taken for.
        adapter: how batches reach the model (models/adapters): ``"features"``
            (``model(batch_dict)``), ``"dlrm"`` (facebookresearch/dlrm's ``DLRM_Net``,
            docs/dlrm.md), ``"torchrec"``; None or ``"auto"``: the one the checkpoint's model
            spec records, else detected from the model. Recorded in the run's model spec.
        output: ``"logits"`` or ``"probs"``, what the model returns; None or ``"auto"``: the
            spec's, else decided on the first validation batch (a Sigmoid last, or outputs all in
            [0, 1], means probabilities). Probabilities are trained with their own binary
            cross-entropy. The decision is in ``metrics.json`` (``"model_output"``).

    Warns:
        CollapseWarning: a table's rows were all cut to length 1.
        BudgetWarning: no epoch met the budget (the run is still written, from the best epoch;
            ``metrics.json`` has ``"budget_met": false`` and the tables that missed).
        UnseenRowsWarning: frequencies counted on ``data`` (no ``counts_file``) and more than
            half of a table's rows never occur in it (``metrics.json``: ``unseen_rows``).
    """
    request = FinetuneRequest(checkpoint, data, valid, Path(out), config, model_factory,
                              counts_file, resume, overwrite, progress, adapter, output)
    with process_group() as world:
        # A call, so that its DDP model is gone when the process group is torn down.
        return _finetune(request, world)


def _finetune(request: FinetuneRequest, world: World) -> FinetuneResult:
    inputs = prepare(request, world)
    run = _start(request, inputs, world)
    if run.budget is not None and run.progress["step"] == 0 and not run.progress["history"]:
        _score_start(run)
    _train(run, request.progress)
    return _finish(request, run, inputs)


def _start(request: FinetuneRequest, inputs: Inputs, world: World) -> _Run:
    """Score the trained model, attach AMTL, build the optimiser and restore an interrupted run."""
    config, model = request.config, inputs.model
    if request.progress and world.is_main and not inputs.call.is_plain:
        tqdm.write(inputs.call_note, file=sys.stderr)
    if request.counts_file is None and world.is_main:
        _warn_unseen_rows(inputs.counts)
    before = evaluate(model, inputs.valid_data.batches(config.batch_size), world, inputs.call)
    with world.errors_agreed():
        targets = resolve_table_targets(config, inputs, request.progress and world.is_main)
        # Tables built with sparse=True (dlrm's) would give Adam sparse gradients, which it
        # refuses: they are trained with dense ones. The saved weights do not record the flag.
        dense_gradients_(model)
        attach_amtl_(model, inputs.counts, config.amtl)
        layers = amtl_layers(model)
        optimizer = torch.optim.Adam(_param_groups(model, config))
    state_dir = resume_dir(request.out)
    # How the model is called is part of the run: resuming with another adapter or output
    # reading would continue on a different loss.
    config_json = json.dumps({**config.to_dict(), "model_call": {
        "adapter": inputs.call.adapter.name, "output": inputs.call.output}}, sort_keys=True)
    progress_state = resume_or_restart(
        state_dir, model, optimizer, config_json, request.resume, world
    )
    with world.errors_agreed():
        # Prices for the saved step: at step 0 with a warmup the ratio is 1 and nothing is cut.
        budget = None if targets is None else AMTLBudget(
            model, targets, total_steps=inputs.steps_per_epoch * config.epochs,
            warmup=config.budget_warmup, weight=config.budget_weight,
            step=progress_state["step"],
        )
    # After the resume: DDP broadcasts rank 0's weights as they are now (the same on every rank:
    # the same checkpoint, seed, counts and state file; the broadcast makes sure of it).
    ddp = wrap_ddp(model, world)
    return _Run(config, world, model, ddp, layers, budget, optimizer, inputs.train_data,
                inputs.valid_data, state_dir, progress_state, before, inputs.steps_per_epoch,
                inputs.call)


def _train(run: _Run, progress: bool) -> None:
    """The step loop, from the saved step to the last: epoch ends, periodic saves, Ctrl-C."""
    config, world = run.config, run.world
    penalty = None
    if run.budget is not None and config.budget_weight > 0:
        penalty = run.budget.penalty
    step = run.progress["step"]
    bar = tqdm(
        total=run.total_steps, initial=step, desc="finetune", unit="step", file=sys.stderr,
        disable=not progress or not world.is_main, dynamic_ncols=True,
    )
    running = None
    run.model.train()
    with DeferredInterrupt() as interrupt:
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
        loss = bce_step(run.ddp, run.optimizer, features, labels, penalty, run.world,
                        run.call)
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
            "(`lr` / `amtl_lr`) or check the data for extreme values"
        )
        if raised_on_every_rank(exc):
            mark_every_rank(error)
        raise error from None
    ratios: dict[str, float] = {}
    if run.budget is not None:
        ratios = run.budget.step()  # the price for the next step's scheduled ratio
    return loss, ratios


def _score_start(run: _Run) -> None:
    """Epoch 0: the trained weights cut to the budget by the starting lengths, scored and kept
    as a candidate like every epoch.

    Fine-tuning is then judged against its own starting point: where training does not pay
    (a model already at its optimum, steps too large for it), the cut model is kept, with the
    lengths AMTL's layer gives each row's frequency before any step.
    """
    budget = run.budget
    assert budget is not None  # only called with a budget
    budget.solve(budget.targets)  # R itself, not the warmup's first ratio
    _record_epoch(run, 0, 0, warming_up=False)
    budget.solve()  # back to the schedule (no step taken: the same prices as before)


def _end_epoch(run: _Run, step: int) -> None:
    """Validate, record the epoch, and save its weights if it is the best so far."""
    # During the warmup the scheduled ratio is still above R: such an epoch misses the budget.
    warming_up = run.budget is not None and run.budget.warming_up
    _record_epoch(run, step // run.steps_per_epoch, step, warming_up)


def _record_epoch(run: _Run, epoch: int, step: int, warming_up: bool) -> None:
    """Validate the model as it is, append the epoch's record, and save its weights if it is
    the best so far."""
    config, progress_state = run.config, run.progress
    scores = evaluate(run.model, run.valid_data.batches(config.batch_size), run.world,
                      run.call)
    for path, layer in run.layers.items():
        # Identical weights give identical lengths; a cheap proof that the ranks agree.
        run.world.check_same(f"row lengths of `{path}`", layer.lengths())
    ratios = {path: layer.realized_ratio() for path, layer in run.layers.items()}
    meets_budget = run.budget is None or (
        not warming_up and not _missed(run.budget.targets, ratios)
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
                atomic_save_safetensors(run.model.state_dict(), run.state_dir / _BEST_FILE)


def _warn_unseen_rows(counts: dict[str, torch.Tensor]) -> None:
    """Warn (:class:`UnseenRowsWarning`) about tables where most rows have count 0."""
    zeros = {path: (int((count == 0).sum()), count.numel()) for path, count in counts.items()}
    unseen = {path: z for path, z in zeros.items() if z[0] > UNSEEN_SHARE * z[1]}
    if unseen:
        warnings.warn(UnseenRowsWarning(unseen), stacklevel=5)  # at finetune's caller


def _finish(request: FinetuneRequest, run: _Run, inputs: Inputs) -> FinetuneResult:
    """Restore the best epoch, take AMTL off, score the result and write the run directory."""
    config, world = run.config, run.world
    best = run.progress["best"]
    best_weights = run.state_dir / _BEST_FILE
    with world.errors_agreed():
        if best is not None and best_weights.exists():
            run.model.load_state_dict(load_file(str(best_weights)))
    amtl_state = {
        f"{path}.{k}": v.detach().to("cpu", copy=True)
        for path, layer in run.layers.items()
        for k, v in layer.state_dict().items()
    }
    model, lengths = detach_amtl(run.model, merge=True)
    after = evaluate(model, run.valid_data.batches(config.batch_size), world, run.call)
    per_table, ratio = table_report(lengths, inputs.column_of, inputs.dims, inputs.counts)
    collapsed = [path for path, table in per_table.items() if table["collapsed"]]
    if collapsed:
        warnings.warn(CollapseWarning(collapsed), stacklevel=3)  # at finetune's caller
    targets = None if run.budget is None else run.budget.targets
    budget_met = None if best is None or targets is None else bool(best["meets_budget"])
    missed: dict[str, dict[str, float]] = {}
    budget_summary = None
    if budget_met is False:
        missed = _missed(targets or {}, best["ratios"])
        during_warmup = (run.budget is not None and best["epoch"] > 0
                         and best["step"] < run.budget.warmup_steps)
        warning = BudgetWarning(missed, best["epoch"], during_warmup)
        warnings.warn(warning, stacklevel=3)
        budget_summary = "budget NOT met: " + str(warning)
    elif budget_met:
        budget_summary = f"budget met by the kept epoch {best['epoch']}"
        if best["epoch"] == 0:
            budget_summary += (" (the trained model cut to the budget before any step: no "
                               "fine-tuned epoch scored higher on validation)")
    metrics = {
        "before": run.before,
        "after": after,
        "epochs": run.progress["history"],
        "best_epoch": None if best is None else best["epoch"],
        "tables": per_table,
        "memory_ratio": ratio,
        "target_ratio": config.target_ratio,
        "target_ratios": targets,  # resolved: module path -> R
        "budget_warmup_steps": None if run.budget is None else run.budget.warmup_steps,
        "budget_met": budget_met,  # None without a budget
        "budget_missed": missed,  # module path -> {"target", "realized"} of the kept epoch
        "budget_summary": budget_summary,  # the line `finetune` ends with; None without a budget
        "collapsed": collapsed,
        "world_size": world.size,
        # What the loss and the metrics took the model's output for, and why.
        "model_output": {
            "adapter": run.call.adapter.name, "output": run.call.output, "note": inputs.call_note,
            "printed": not run.call.is_plain,  # by the CLI: all but model(features) -> logits
        },
    }
    run_config = {
        "checkpoint": str(Path(request.checkpoint).resolve()),
        "data": str(Path(request.data).resolve()),
        "valid": str(Path(request.valid).resolve()),
        "model": inputs.spec,
        "tables": inputs.column_of,
        "finetune": config.to_dict(),
        "target_ratios": targets,  # resolved: module path -> R (a dict or "auto" in "finetune")
        # config.batch_size rows per rank: each step saw world_size times as many.
        "world_size": world.size,
    }
    with world.errors_agreed():
        if world.is_main:
            write_run_dir(request.out, request.overwrite, model, inputs.spec, lengths,
                          amtl_state, run_config, metrics)
            shutil.rmtree(run.state_dir, ignore_errors=True)
    return FinetuneResult(run_dir=request.out, metrics=metrics, lengths=lengths)


def _param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Adam's groups: 0 = the tables at ``lr``, 1 = the AMTL layers at ``amtl_lr`` (its lr
    decays, _step), 2 = the dense parameters at ``dense_lr``; with ``dense_lr == 0`` they are
    frozen instead (``requires_grad=False``, so backward skips their weight gradients; the
    gradients still flow through them to the tables)."""
    groups = [
        {"params": table_parameters(model), "lr": config.lr},
        {"params": amtl_parameters(model), "lr": config.amtl_lr},
    ]
    dense = dense_parameters(model)
    if config.dense_lr > 0:
        groups.append({"params": dense, "lr": config.dense_lr})
    else:
        for p in dense:
            p.requires_grad_(False)
    return groups


def dense_gradients_(model: nn.Module) -> list[str]:
    """Make every ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model`` give dense gradients
    (``sparse=False``); returns the paths of the tables that had ``sparse=True``.

    Adam (the fine-tuning optimiser) refuses sparse gradients, and its moments are per value
    anyway, so a dense gradient costs no more memory than Adam's own state. Only the flag changes:
    the weights, and hence the saved state_dict, are untouched.
    """
    switched = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            module.sparse = False
            switched.append(path)
    return switched


def _missed(targets: dict[str, float], ratios: dict[str, float]) -> dict[str, dict[str, float]]:
    """The tables whose realized ratio is more than :data:`BUDGET_TOLERANCE` over their R (a
    memory budget is an upper bound: a table that keeps less than R meets it)."""
    return {
        path: {"target": r, "realized": ratios[path]}
        for path, r in targets.items()
        if ratios[path] - r > BUDGET_TOLERANCE
    }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
