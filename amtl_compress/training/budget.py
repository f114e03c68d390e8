"""The memory budget in a training loop: :class:`AMTLBudget`, one object per run.

``finetune`` uses it, and so can a user's own loop (README, docs/amtl.md "The budget in your own
loop")::

    attach_amtl_(model, counts, AMTLConfig())
    budget = AMTLBudget(model, 0.4, total_steps=len(loader) * epochs, warmup=0.25)
    for features, labels in loader:
        loss = task_loss(model(features), labels) + budget.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        budget.step()          # re-solves each table's price at the scheduled ratio

It owns three things: the per-table targets (a float for every table, or targets keyed like
``FinetuneConfig.fields``), the schedule that anneals each table's ratio from 1 (nothing cut:
the warm start is kept) to its R over the first ``warmup`` share of the steps, and the
Lagrangian's memory term ``weight * sum_t mu_t * expected_ratio_t`` (core/budget.py). Without a
budget the paper's loss has no size term, and nothing is cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from amtl_compress.core.amtl import AMTL
from amtl_compress.core.budget import apply_budget_
from amtl_compress.errors import ConfigError
from amtl_compress.surgery.attach import amtl_layers
from amtl_compress.surgery.targets import target_matches

__all__ = ["AMTLBudget", "resolve_targets", "scheduled_ratio", "warmup_steps"]

TargetRatio = float | Mapping[str, float]


def resolve_targets(target_ratio: TargetRatio, paths: Iterable[str]) -> dict[str, float]:
    """Module path -> R for the tables at ``paths`` that have a target.

    Args:
        target_ratio: one R for every table, or target -> R where a target is a module path, a
            path suffix or a full-match regex (as in ``FinetuneConfig.fields``). Tables no
            target names get no budget (the paper's loss: their price stays 0).
        paths: module paths of the AMTL tables.

    Raises:
        ConfigError: a target matches none of ``paths``, or two targets give one table
            different ratios.
    """
    paths = list(paths)
    if not isinstance(target_ratio, Mapping):
        return {path: float(target_ratio) for path in paths}
    resolved: dict[str, float] = {}
    for key, ratio in target_ratio.items():
        hits = [p for p in paths if target_matches(key, p)]
        if not hits:
            names = ", ".join(f"`{p}`" for p in paths)
            raise ConfigError(
                f"`target_ratio` names `{key}`, which matches none of the compressed tables "
                f"({names}); key it like `fields`"
            )
        for path in hits:
            if path in resolved and resolved[path] != float(ratio):
                raise ConfigError(
                    f"`target_ratio` gives table `{path}` two ratios ({resolved[path]} and "
                    f"{float(ratio)}); name each table once"
                )
            resolved[path] = float(ratio)
    return {path: resolved[path] for path in paths if path in resolved}  # the model's order


def warmup_steps(warmup: float, total_steps: int | None) -> int:
    """Optimiser steps over which the ratio is annealed: ``round(warmup * total_steps)``.

    Raises:
        ConfigError: ``warmup`` outside [0, 1], or ``warmup > 0`` without ``total_steps``.
    """
    if not 0.0 <= warmup <= 1.0:
        raise ConfigError(f"`warmup` must be in [0, 1] (a share of the steps), got {warmup}")
    if warmup == 0:
        return 0
    if total_steps is None or total_steps < 1:
        raise ConfigError(
            "a budget warmup needs the run's length; pass `total_steps` (optimiser steps in all)"
        )
    return max(1, round(warmup * total_steps))


def scheduled_ratio(target: float, step: int, warmup: int) -> float:
    """The ratio a table should keep after ``step`` optimiser steps: linear from 1 to ``target``.

    Step 0 (right after attaching) keeps everything when ``warmup > 0``, so the trained model's
    outputs are untouched; from step ``warmup`` on it is ``target``.

    Args:
        target: R in (0, 1].
        step: optimiser steps done, >= 0.
        warmup: steps of the anneal (:func:`warmup_steps`); 0 = R from the start.
    """
    if warmup <= 0 or step >= warmup:
        return target
    return 1.0 - (1.0 - target) * step / warmup


class AMTLBudget:
    """The memory budget of the AMTL layers in ``model``: targets, schedule, price, penalty.

    Args:
        model: a model prepared by ``attach_amtl_`` (its AMTL layers are found by module path).
        target_ratio: R = kept values / (N * D) per table: one float for every table, or
            target -> R keyed like ``FinetuneConfig.fields`` (module path, suffix or regex;
            tables no key names keep the paper's loss, price 0).
        total_steps: optimiser steps of the whole run; needed when ``warmup > 0``.
        warmup: share of ``total_steps`` over which each table's ratio goes linearly from 1 to
            its R, in [0, 1]; 0 = R from step 0.
        weight: weight of the Lagrangian term in :meth:`penalty` (``FinetuneConfig.budget_weight``);
            0 = the price acts on the selection only.
        step: optimiser steps already done (a resumed run).

    Construction sets every price for ``step`` (ratio 1 at step 0 with a warmup: nothing cut).

    Raises:
        ConfigError: ``model`` has no AMTL layers, a target matches no table, an R is out of
            [1/D, 1], or the warmup is invalid.
    """

    def __init__(
        self,
        model: nn.Module,
        target_ratio: TargetRatio,
        total_steps: int | None = None,
        warmup: float = 0.0,
        weight: float = 1.0,
        step: int = 0,
    ) -> None:
        layers = amtl_layers(model)
        if not layers:
            raise ConfigError(
                "the model has no AMTL layers; call `attach_amtl_` before creating the budget"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"`weight` must be >= 0, got {weight}")
        self.targets = resolve_targets(target_ratio, layers)
        for path, ratio in self.targets.items():
            if not 0.0 < ratio <= 1.0:
                raise ConfigError(f"`target_ratio` of `{path}` must be in (0, 1], got {ratio}")
        self.layers: dict[str, AMTL] = {path: layers[path] for path in self.targets}
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps(warmup, total_steps)
        self.weight = weight
        self.steps_done = step
        self.realized = self.solve()

    def ratios(self, step: int | None = None) -> dict[str, float]:
        """Module path -> the scheduled ratio after ``step`` steps (default: now)."""
        step = self.steps_done if step is None else step
        return {p: scheduled_ratio(r, step, self.warmup_steps) for p, r in self.targets.items()}

    @property
    def warming_up(self) -> bool:
        """Whether the schedule has not reached the targets yet (no epoch then meets them)."""
        return self.steps_done < self.warmup_steps

    def penalty(self) -> torch.Tensor:
        """The Lagrangian's memory term ``weight * sum_t mu_t * expected_ratio_t``: add it to
        the loss before ``backward``. A 0-dim tensor; 0 when the weight or every price is 0.

        Its gradient shortens the rows the task does not defend (rare rows barely appear in
        batches). It is computed outside the model's forward, from the same weights on every
        rank, so under DDP the average of its (identical) gradients is itself.
        """
        if self.weight == 0 or not self.layers:
            return torch.zeros(())
        term = sum(layer.price * layer.expected_ratio() for layer in self.layers.values())
        return self.weight * term  # type: ignore[return-value]

    def step(self) -> dict[str, float]:
        """Call after each optimiser step: re-solve every price at the next scheduled ratio.

        Returns:
            module path -> realized ratio (kept values / (N * D)) after the update.
        """
        self.steps_done += 1
        self.realized = self.solve()
        return self.realized

    def solve(self, ratios: Mapping[str, float] | None = None) -> dict[str, float]:
        """Set every price for ``ratios`` (module path -> R; default: the schedule's ratios
        now) and return the realized ratios. ``finetune`` scores the model at the targets
        themselves before the first step this way, then calls it again without ``ratios``."""
        return apply_budget_(self.layers, self.ratios() if ratios is None else ratios)
