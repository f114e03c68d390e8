"""Fine-tune a trained model with AMTL attached (warm start, paper Section 3.4).

``finetune`` loads every trained weight, attaches AMTL to the chosen embedding tables, trains the
model and the AMTL layers together (task loss + optional memory-budget penalty), keeps the best
validation epoch, and writes the run directory described in docs/design.md.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from amtl_compress._io import atomic_directory, atomic_save_safetensors, atomic_write_text
from amtl_compress.checkpoint import load_model
from amtl_compress.core.amtl import AMTLConfig
from amtl_compress.core.budget import apply_budget_
from amtl_compress.data.counts import count_frequencies, read_counts
from amtl_compress.data.dataset import TabularData
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
from amtl_compress.training.loop import bce_step, evaluate
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
        batch_size: rows per optimiser step.
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


def _table_report(
    lengths: dict[str, torch.Tensor], fields: dict[str, str], dims: dict[str, int]
) -> tuple[dict[str, Any], float]:
    per_table: dict[str, Any] = {}
    kept = total = 0
    for path, lens in lengths.items():
        n, d = lens.numel(), dims[path]
        per_table[path] = {
            "column": fields[path],
            "rows": n,
            "dim": d,
            "avg_kept_dim": float(lens.double().mean()),
            "memory_ratio": float(lens.sum()) / (n * d),
            # Every row cut to one value: the layer collapsed (see CollapseWarning).
            "collapsed": bool(n and d > 1 and int(lens.max()) == 1),
        }
        kept += int(lens.sum())
        total += n * d
    return per_table, (kept / total if total else 1.0)


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

    Args:
        checkpoint: trained weights (``.safetensors``, or a ``.pt`` state_dict).
        data: training data (Parquet or CSV, docs/data.md).
        valid: validation data; AUC/logloss before training and after every epoch, best epoch kept.
        out: run directory to create (written atomically; see docs/design.md for its files).
        config: the run's hyper-parameters.
        model_factory: ``package.module:function`` building the model; optional when the
            checkpoint carries a model spec (the reference DLRM does).
        counts_file: per-column frequency counts to use instead of counting ``data``.
        resume: continue from ``<out>.resume`` if an interrupted run with the same config left it.
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar on stderr.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory `{out}` exists; pass --overwrite or choose another --out"
        )
    if not config.fields:
        raise AmtlError("no --field given; name at least one embedding table to compress")
    torch.manual_seed(config.seed)
    model, spec = load_model(checkpoint, model_factory)
    train_data = TabularData.open(data, label=config.label)
    valid_data = TabularData.open(valid, label=config.label)

    # Validate the whole request before any long work: targets, columns, id ranges.
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
            counts[path] = count_frequencies(data, column, num_rows[path])

    before = evaluate(model, valid_data.batches(config.batch_size))
    attach_amtl_(model, counts, config.amtl)
    layers = amtl_layers(model)
    optimizer = torch.optim.Adam(
        [
            {"params": model_parameters(model), "lr": config.lr},
            {"params": amtl_parameters(model), "lr": config.amtl_lr},
        ]
    )

    steps_per_epoch = train_data.num_batches(config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    state_dir = _resume_dir(out)
    progress_state: dict[str, Any] = {
        "step": 0,
        "history": [],
        "best": None,
        "config": config_json,
    }
    if resume and has_state(state_dir):
        saved = load_state(state_dir, model, optimizer)
        if saved.get("config") != config_json:
            raise RunDirError(
                f"`{state_dir}` holds an interrupted run with a different configuration; "
                "rerun with the same options, or pass --no-resume to start over"
            )
        progress_state = saved
    elif state_dir.exists():
        shutil.rmtree(state_dir)
    if config.target_ratio is not None:
        ratios = apply_budget_(layers, config.target_ratio)  # train under the budget from step 0
    penalty = None
    if config.target_ratio is not None and config.budget_weight > 0:

        def penalty() -> torch.Tensor:
            # The Lagrangian's memory term: its gradient shortens rows the task does not defend
            # (rare rows barely appear in batches, so without it they keep their start length).
            term = sum(layer.price * layer.expected_ratio() for layer in layers.values())
            return config.budget_weight * term

    step = progress_state["step"]
    bar = tqdm(
        total=total_steps, initial=step, desc="finetune", unit="step", file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )
    running = None
    model.train()
    with _DeferredInterrupt() as interrupt:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = train_data.batches(
                config.batch_size, shuffle=True, seed=config.seed * 100_003 + epoch
            )
            for i, (features, labels) in enumerate(batches):
                if i < skip:
                    continue  # already done before the interruption
                for layer in layers.values():
                    layer.temperature = _temperature_at(config, step, total_steps)
                # The AMTL learning rate decays linearly to 0: under STE the hard lengths keep
                # flipping while it is large, and the budget can only be met once they settle.
                optimizer.param_groups[1]["lr"] = config.amtl_lr * (1 - step / total_steps)
                try:
                    loss = bce_step(model, optimizer, features, labels, penalty)
                except TrainingError as exc:
                    # bce_step did not apply the faulty step: keep this state resumable, unless
                    # the weights themselves went bad, then the last save stays the good one.
                    if _all_finite(model):
                        progress_state["step"] = step
                        save_state(state_dir, model, optimizer, progress_state)
                        where = f"the state before step {step + 1} is saved in `{state_dir}`"
                    else:
                        where = f"the last good state is in `{state_dir}`"
                    reason = str(exc).split(";")[0]
                    raise TrainingError(
                        f"{reason} at step {step + 1}; {where} - lower the learning rate "
                        "(--lr / --amtl-lr) or check the data for extreme values"
                    ) from None
                if config.target_ratio is not None:
                    ratios = apply_budget_(layers, config.target_ratio)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                step += 1
                postfix = {"loss": f"{running:.4f}", "epoch": epoch + 1}
                if config.target_ratio is not None:
                    postfix["ratio"] = f"{sum(ratios.values()) / len(ratios):.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if step % steps_per_epoch == 0:
                    _end_epoch(model, layers, valid_data, config, progress_state, step, state_dir)
                if step % config.save_every == 0 or step % steps_per_epoch == 0:
                    progress_state["step"] = step
                    save_state(state_dir, model, optimizer, progress_state)
                if interrupt.requested:  # Ctrl-C: stop between steps with a resumable state
                    progress_state["step"] = step
                    save_state(state_dir, model, optimizer, progress_state)
                    raise KeyboardInterrupt
    bar.close()

    best = progress_state["best"]
    best_weights = state_dir / "best.safetensors"
    if best is not None and best_weights.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(best_weights)))
    amtl_state = {
        f"{path}.{k}": v.detach().clone()
        for path, layer in layers.items()
        for k, v in layer.state_dict().items()
    }
    model, lengths = detach_amtl(model, merge=True)
    after = evaluate(model, valid_data.batches(config.batch_size))
    per_table, ratio = _table_report(lengths, column_of, dims)
    collapsed = [path for path, table in per_table.items() if table["collapsed"]]
    if collapsed:
        warnings.warn(CollapseWarning(collapsed), stacklevel=2)
    metrics = {
        "before": before,
        "after": after,
        "epochs": progress_state["history"],
        "best_epoch": None if best is None else best["epoch"],
        "tables": per_table,
        "memory_ratio": ratio,
        "target_ratio": config.target_ratio,
        "collapsed": collapsed,
    }
    run_config = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "data": str(Path(data).resolve()),
        "valid": str(Path(valid).resolve()),
        "model": spec,
        "tables": column_of,
        "finetune": config.to_dict(),
    }
    from amtl_compress.checkpoint import save_checkpoint

    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp / "model.safetensors", model.state_dict(), spec)
        atomic_save_safetensors(lengths, tmp / "lengths.safetensors")
        atomic_save_safetensors(amtl_state, tmp / "amtl.safetensors")
        atomic_write_text(tmp / "config.json", json.dumps(run_config, indent=2))
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2))
    shutil.rmtree(state_dir, ignore_errors=True)
    return FinetuneResult(run_dir=out, metrics=metrics, lengths=lengths)


def _end_epoch(
    model: nn.Module,
    layers: dict[str, Any],
    valid_data: TabularData,
    config: FinetuneConfig,
    progress_state: dict[str, Any],
    step: int,
    state_dir: Path,
) -> None:
    """Validate, record the epoch, and save its weights if it is the best so far."""
    epoch = len(progress_state["history"]) + 1
    scores = evaluate(model, valid_data.batches(config.batch_size))
    ratios = {path: layer.realized_ratio() for path, layer in layers.items()}
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
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(model.state_dict(), state_dir / "best.safetensors")


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
