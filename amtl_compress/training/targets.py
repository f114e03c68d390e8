"""What each compressed table is asked to keep: ``FinetuneConfig.target_ratio`` resolved to
module path -> R (docs/amtl.md, "Per-table targets and auto").

One R for every table, a dict keyed like ``fields``, or ``"auto"``: the training-free truncation
plan of the trained model on the validation data (amtl_compress/planning.py) picks each R.
"""

from __future__ import annotations

from collections.abc import Mapping

from amtl_compress import planning
from amtl_compress.training.budget import resolve_targets
from amtl_compress.training.config import AUTO, FinetuneConfig
from amtl_compress.training.request import Inputs

#: The ratios the truncation plan scores for ``target_ratio="auto"`` (1.0: the trained model);
#: those under a table's 1/D are left out for it (every row keeps at least one value).
AUTO_RATIO_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def resolve_table_targets(
    config: FinetuneConfig, inputs: Inputs, progress: bool
) -> dict[str, float] | None:
    """Module path -> R of every table with a budget, or None without one.

    Raises:
        ConfigError: a key of a ``target_ratio`` dict matches none of the chosen tables (keys
            are matched against module paths the way ``fields`` targets are).
    """
    if config.target_ratio is None:
        return None
    if config.target_ratio == AUTO:
        return plan_ratios(inputs, config, progress)
    assert isinstance(config.target_ratio, (float, int, Mapping))
    return resolve_targets(config.target_ratio, inputs.column_of)


def plan_ratios(inputs: Inputs, config: FinetuneConfig, progress: bool) -> dict[str, float]:
    """``target_ratio="auto"``: each table's R from the training-free truncation plan of the
    trained model (before AMTL is attached) on the validation data: the smallest ratio of
    :data:`AUTO_RATIO_GRID` whose AUC is within ``config.max_auc_drop`` of the trained model's.

    Returns:
        module path -> R, at least the table's 1/D.
    """
    smallest = max(1.0 / d for d in inputs.dims.values())
    grid = [r for r in AUTO_RATIO_GRID if r >= smallest]
    curves = planning.truncation_curves(
        inputs.model, inputs.valid_data, dict(inputs.column_of), grid,
        batch_size=config.batch_size, label=config.label, progress=progress, call=inputs.call,
    )
    ratios = planning.recommend_ratios(curves, config.max_auc_drop)
    return {path: max(float(ratios[path]), 1.0 / inputs.dims[path]) for path in inputs.column_of}
