"""Budget planning: how much validation AUC each table loses when cut to a ratio of its dims,
measured without training, so that a user can choose ``target_ratio`` per table (docs/planning.md).

For each chosen table and each ratio r of a grid, the table is rotated onto its principal axes
exactly as ``finetune``'s default ``ordering="pca"`` does at attach time (core/rotation.py), every
row keeps its first k = max(1, round(r * D)) rotated dims (the rest set to 0: a uniform AMTL
mask, Eq. 1, of length k for every row), and the model is scored on the validation data. One
table is cut at a time, the others stay as trained; ratio 1.0 is the trained model itself. The
cut model is a point of the space AMTL fine-tuning searches at budget r (every row at length k),
before any step: the curve is what the budget costs with no training at all.

Cost: one validation pass per table and distinct k (plus one for the trained model); no
gradient, no optimiser state.

A little over 400 lines: the curves, the recommendation and the one-call :func:`plan` share
their input checks, which run before any evaluation; the plot is drawn by ``_svg.py``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from amtl_compress._io import atomic_write_text
from amtl_compress._svg import HLine, line_chart
from amtl_compress.checkpoint import load_model
from amtl_compress.core.rotation import onto_principal_axes, unrotated, with_rotation
from amtl_compress.data import CTRData, open_data
from amtl_compress.errors import ConfigError, DataError
from amtl_compress.models.adapters.call import (
    ModelCall,
    adapter_list_padding,
    check_model_call,
    first_batch,
    recorded_output,
    resolve_adapter,
)
from amtl_compress.surgery.attach import select_tables
from amtl_compress.surgery.targets import field_column
from amtl_compress.training.distributed import World
from amtl_compress.training.loop import evaluate

#: The ratios ``plan`` tries when none are given: 0.1, 0.2, ..., 1.0.
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: Validation AUC a table may lose to truncation in the recommendation (0.2 AUC points).
DEFAULT_MAX_AUC_DROP = 0.002
#: Slack on the comparison ``AUC(1.0) - AUC(r) <= max_auc_drop``, so that a drop equal to the
#: limit in decimal (0.80 - 0.78 vs 0.02) is not refused for a binary rounding error.
_TIE = 1e-12

Curves = dict[str, list[tuple[float, float]]]


def kept_dims(ratio: float, dim: int) -> int:
    """Dims every row keeps at ``ratio`` of a table D = ``dim`` wide: max(1, round(ratio * D))."""
    return max(1, min(dim, round(ratio * dim)))


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """The grid ``ratios`` sorted ascending without repeats, with 1.0 (the trained model) added.

    Raises:
        ConfigError: an empty grid, or a ratio outside (0, 1] (NaN included).
    """
    ratios = list(ratios)
    if not ratios:
        raise ConfigError(
            "`ratios` is empty; pass at least one ratio in (0, 1], e.g. `ratios=0.1,0.2,0.5`"
        )
    grid = {1.0}
    for r in ratios:
        value = _number(r)
        if not 0.0 < value <= 1.0:  # NaN fails too
            raise ConfigError(
                f"`ratios` holds {r}, outside (0, 1]; each ratio is kept dims / D of a table"
            )
        grid.add(value)
    return sorted(grid)


def _number(value: object) -> float:
    """``value`` as a float (NaN for what is not a number, which every range check refuses)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def parse_ratios(text: str) -> list[float]:
    """``"0.1,0.2, 0.5"`` -> [0.1, 0.2, 0.5] (the CLI's ``--ratios``); checked by
    :func:`check_ratios`, which also adds 1.0.

    Raises:
        ConfigError: an entry that is not a number, or as :func:`check_ratios`.
    """
    ratios = []
    for part in text.split(","):
        part = part.strip()
        try:
            ratios.append(float(part))
        except ValueError:
            raise ConfigError(
                f"`ratios` entry `{part}` is not a number; pass comma-separated ratios such as "
                "`ratios=0.1,0.2,0.5`"
            ) from None
    return check_ratios(ratios)


def _check_drop(max_auc_drop: float) -> None:
    if not _number(max_auc_drop) >= 0:  # NaN fails too
        raise ConfigError(
            f"`max_auc_drop` must be >= 0, got {max_auc_drop}; pass e.g. `max_auc_drop=0.002` "
            "(0.2 AUC points)"
        )


def _resolve_tables(model: nn.Module, tables: Mapping[str, str]) -> dict[str, str]:
    """Module path -> column for the targets of ``tables``, as ``finetune`` resolves them, with
    every table checked as ``attach_amtl_`` (ordering pca) would check it."""
    if not tables:
        raise ConfigError("no `tables` given; name at least one embedding table to plan")
    selected = select_tables(model, tables, ordering="pca")
    return {
        path: field_column(target, tables[target], path)
        for path, (target, _) in selected.items()
    }


def _with_weight(table: nn.Module, weight: Tensor) -> nn.Module:
    """A copy of the plain ``table`` (same class and options) holding ``weight`` instead; the
    original and its parameters are not touched."""
    clone = copy.copy(table)
    clone._parameters = {**table._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
    clone._buffers = dict(table._buffers)
    clone._modules = dict(table._modules)
    return clone


class _Truncator:
    """One table rotated onto its principal axes as ``attach_amtl_(ordering="pca")`` does:
    W' = W R^{-1} (N, D), R the axes rounded to float16 values, composed with the rotation of a
    table rotated by an earlier run (``core.rotation.onto_principal_axes``)."""

    def __init__(self, table: nn.Module) -> None:
        plain, rotation = unrotated(table)
        self.plain = plain
        self.rotated, self.rotation = onto_principal_axes(plain.weight, rotation)

    def cut(self, k: int) -> nn.Module:
        """The table with every rotated row cut to its first ``k`` dims (the rest exact 0),
        followed by R: what a masked table of uniform length k outputs."""
        weight = self.rotated.clone()
        weight[:, k:] = 0.0
        return with_rotation(_with_weight(self.plain, weight), self.rotation)


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def truncation_curves(
    model: nn.Module,
    valid_data: CTRData | str | os.PathLike[str],
    tables: Mapping[str, str],
    ratios: Sequence[float] = DEFAULT_GRID,
    batch_size: int = 4096,
    label: str = "label",
    progress: bool = True,
    world: World | None = None,
    call: ModelCall | None = None,
) -> Curves:
    """Validation AUC of ``model`` with one table at a time cut to each ratio of its dims.

    Each table is rotated onto its principal axes (as ``finetune`` with ``ordering="pca"``) and
    every row keeps its first :func:`kept_dims` (ratio, D) dims; the other tables stay as
    trained. Everything is checked before the first evaluation. ``model`` is left exactly as it
    was (its modules are swapped for the evaluation and put back; no weight is written).

    Args:
        model: the trained model (any device; evaluated where it is).
        valid_data: validation data, opened (:func:`~amtl_compress.data.open_data`) or a path.
        tables: target -> data column feeding the table (a target is a module path, a path
            suffix or a regex, as ``FinetuneConfig.fields``).
        ratios: the grid, each in (0, 1]; 1.0 is always added.
        batch_size: rows per evaluation batch.
        label: the label column, when ``valid_data`` is a path.
        progress: a tqdm bar on stderr over the (table, ratio) pairs.
        world: the ranks of a data-parallel run: they share each evaluation and the bar shows
            on rank 0 only (``training/loop.py`` ``evaluate``).
        call: how to call the model (its adapter; logits or probabilities), default
            ``model(features)`` returning logits (``training/loop.py`` ``logits_of``).

    Returns:
        module path -> [(ratio, validation AUC)] ascending in ratio, in the model's module order;
        the point at 1.0 is the trained model's AUC (the same for every table).

    Raises:
        ConfigError: no tables, a bad grid or ``batch_size``.
        NoMatchingModuleError: a target matches no embedding table.
        SurgeryError: a table AMTL could not rotate (max pooling, shared, already wrapped).
        DataError: a column missing from the data, ids outside a table, or validation data
            whose AUC is undefined (one class only).
    """
    grid = check_ratios(ratios)
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
    if isinstance(valid_data, (str, os.PathLike)):
        padding = 0 if call is None else call.list_padding
        valid_data = open_data(valid_data, label=label, list_padding=padding)
    data = valid_data
    column_of = _resolve_tables(model, tables)
    modules = dict(model.named_modules())
    for path, column in column_of.items():
        data.validate_ids(column, modules[path].num_embeddings)

    def auc() -> float:
        return evaluate(model, data.batches(batch_size), world, call)["auc"]

    show = progress and (world is None or world.is_main)
    bar = tqdm(total=1 + len(column_of) * len(grid), desc="plan", unit="eval", file=sys.stderr,
               disable=not show, dynamic_ncols=True)
    with bar:
        bar.set_postfix_str("trained model")
        baseline = auc()
        bar.update()
        if not math.isfinite(baseline):
            raise DataError(
                f"the validation data `{data.path}` gives no AUC (it holds one class only); "
                "plan on data with both labels"
            )
        curves: Curves = {}
        for path in column_of:
            original = modules[path]
            dim = int(original.embedding_dim)
            truncator = _Truncator(original)
            by_k: dict[int, float] = {}
            points = []
            for ratio in grid:
                bar.set_postfix_str(f"{path} @ {ratio:g}")
                k = kept_dims(ratio, dim)
                if ratio == 1.0:
                    value = baseline
                elif k in by_k:  # another ratio of the grid rounds to the same k
                    value = by_k[k]
                else:
                    _swap(model, path, truncator.cut(k))
                    try:
                        value = by_k[k] = auc()
                    finally:
                        _swap(model, path, original)
                points.append((ratio, value))
                bar.update()
            curves[path] = points
    return curves


def recommend_ratios(curves: Mapping[str, Sequence[tuple[float, float]]],
                     max_auc_drop: float) -> dict[str, float]:
    """Per table, the smallest ratio of its curve whose AUC is within ``max_auc_drop`` of the
    curve's AUC at ratio 1.0 (``AUC(1.0) - AUC(r) <= max_auc_drop``; a ratio whose AUC is above
    that of 1.0 qualifies). 1.0 always qualifies, so a table where nothing smaller does gets 1.0.

    Args:
        curves: module path -> [(ratio, AUC)], as :func:`truncation_curves` returns.
        max_auc_drop: AUC each table may lose, >= 0 (0.002 = 0.2 AUC points).

    Returns:
        module path -> ratio, in the order of ``curves``.

    Raises:
        ConfigError: ``max_auc_drop`` < 0 or NaN, no curves, or a curve without ratio 1.0.
    """
    _check_drop(max_auc_drop)
    if not curves:
        raise ConfigError("no `curves` given; compute them with `truncation_curves`")
    chosen = {}
    for path, points in curves.items():
        full = [auc for ratio, auc in points if ratio == 1.0]
        if not full:
            raise ConfigError(
                f"the curve of `{path}` has no point at ratio 1.0 (the trained model); include "
                "1.0 in its ratios"
            )
        floor = full[0] - max_auc_drop - _TIE
        chosen[path] = min(ratio for ratio, auc in points if auc >= floor or ratio == 1.0)
    return chosen


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` found.

    Attributes:
        curves: module path -> [(ratio, validation AUC)], ascending in ratio.
        recommended: module path -> the smallest ratio within ``max_auc_drop`` (recommend_ratios).
        baseline_auc: validation AUC of the trained model (every curve's point at 1.0).
        max_auc_drop: the AUC each table was allowed to lose.
        dims: module path -> D, the table's width (k = max(1, round(ratio * D)) dims kept).
        plot: the SVG written, or None.
        output_note: what the model's output was taken for (logits or probabilities) and why.
    """

    curves: Curves
    recommended: dict[str, float]
    baseline_auc: float
    max_auc_drop: float
    dims: dict[str, int] = field(default_factory=dict)
    plot: Path | None = None
    output_note: str = ""

    def finetune_args(self) -> str:
        """The ``finetune`` options that ask for the recommended ratios, ready to paste:
        ``--target-ratio embeddings.user_id=0.3 --target-ratio embeddings.item_id=0.5``."""
        return " ".join(f"--target-ratio {path}={ratio:g}"
                        for path, ratio in self.recommended.items())


def plot_svg(result: Plan) -> str:
    """The curves of ``result`` as an SVG line chart: AUC against ratio per table, a dashed line
    at baseline - max_auc_drop, each table's recommended ratio ringed."""
    marks = {path: (ratio, dict(result.curves[path])[ratio])
             for path, ratio in result.recommended.items()}
    return line_chart(
        result.curves,
        title="Validation AUC after truncation to a ratio of the dims (no training)",
        x_label="kept ratio (dims kept / D, after the PCA rotation)",
        y_label="validation AUC",
        hlines=[HLine(result.baseline_auc - result.max_auc_drop,
                      f"trained {result.baseline_auc:.4f} - {result.max_auc_drop:g}")],
        marks=marks,
        mark_label="recommended",
    )


def _check_plot_path(plot: str | os.PathLike[str]) -> Path:
    path = Path(plot)
    if path.suffix.lower() != ".svg":
        raise ConfigError(
            f"`plot` must name an .svg file (the plot is SVG, drawn with no plotting library), "
            f"got `{path}`"
        )
    return path


def plan(
    checkpoint: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    fields: Mapping[str, str],
    ratios: Sequence[float] = DEFAULT_GRID,
    max_auc_drop: float = DEFAULT_MAX_AUC_DROP,
    model_factory: str | None = None,
    batch_size: int = 4096,
    label: str = "label",
    plot: str | os.PathLike[str] | None = None,
    progress: bool = True,
    adapter: str | None = None,
    output: str | None = None,
) -> Plan:
    """Truncation curves of a checkpoint's tables and the ratio to ask of ``finetune`` for each.

    Args:
        checkpoint: trained weights (.safetensors or .pt).
        valid: validation data (Parquet/CSV file, folder or glob; never the test split).
        fields: target -> data column, as ``FinetuneConfig.fields``.
        ratios: the grid, each in (0, 1]; 1.0 is always added.
        max_auc_drop: AUC each table may lose in the recommendation, >= 0.
        model_factory: ``package.module:function`` for a checkpoint without a model spec.
        batch_size: rows per evaluation batch.
        label: the label column.
        plot: if given, an ``.svg`` path to write the chart to (atomically).
        progress: a tqdm bar on stderr.
        adapter: how batches reach the model, as in ``finetune`` (None: recorded or detected).
        output: ``"logits"`` / ``"probs"`` / None (recorded, else decided on the first batch).

    Raises:
        As :func:`truncation_curves` and :func:`~amtl_compress.checkpoint.load_model`;
        ConfigError for a bad ``max_auc_drop`` or a ``plot`` that is not .svg, before anything
        is loaded; for no ``fields`` when the adapter has no default tables either.
    """
    check_ratios(ratios)
    _check_drop(max_auc_drop)
    plot_path = None if plot is None else _check_plot_path(plot)
    model, spec = load_model(checkpoint, model_factory)
    chosen = resolve_adapter(model, adapter, spec)
    data = open_data(valid, label=label, list_padding=adapter_list_padding(chosen))
    fields = dict(fields) or chosen.default_fields(model, data.columns)
    if not fields:
        raise ConfigError("no `fields` given; name at least one embedding table to plan")
    call, note = check_model_call(model, chosen, first_batch(data.batches(min(batch_size, 1024))),
                                  recorded_output(output, spec))
    curves = truncation_curves(model, data, fields, ratios, batch_size=batch_size,
                               progress=progress, call=call)
    modules = dict(model.named_modules())
    result = Plan(
        curves=curves,
        recommended=recommend_ratios(curves, max_auc_drop),
        baseline_auc=curves[next(iter(curves))][-1][1],
        max_auc_drop=float(max_auc_drop),
        dims={path: int(modules[path].embedding_dim) for path in curves},
        plot=plot_path,
        output_note="" if call.is_plain else note,
    )
    if plot_path is not None:
        atomic_write_text(plot_path, plot_svg(result))
    return result
