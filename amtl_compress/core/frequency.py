"""Frequency attributes s_i and twin weights alpha_i of one embedding table (paper Sec. 2.2).

Rows with the same count are indistinguishable to AMTL: their attributes, alpha and therefore
their mask are equal. So everything here is computed once per DISTINCT count (U of them, usually
U << N) and rows point to their distinct count through ``freq_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amtl_compress.errors import DataError

#: Names of the columns of :attr:`FrequencyTable.features`, in order (z = 3).
FEATURE_NAMES: tuple[str, ...] = ("log_count", "percentile", "unseen")


@dataclass(frozen=True)
class FrequencyTable:
    """Per-distinct-frequency inputs of an AMTL layer for one table of N rows.

    Attributes:
        freq_index: int64 (N,); row i uses distinct frequency ``freq_index[i]`` in [0, U).
        counts: int64 (U,); the distinct counts q, ascending.
        features: float32 (U, z), z = 3; the frequency attributes s (Sec. 2.2.1), columns
            :data:`FEATURE_NAMES`, each standardised over the N rows.
        alpha: float32 (U,); twin weight ``sigmoid(norm(log(1 + q)))`` in (0, 1) (Eq. 3).
        rows_per_freq: int64 (U,); how many rows have each distinct count (sums to N).
        percentile: float64 (U,); share of rows with a smaller count plus half the share with
            the same count, in (0, 1) (the ``percentile`` column before standardisation).
    """

    freq_index: Tensor
    counts: Tensor
    features: Tensor
    alpha: Tensor
    rows_per_freq: Tensor
    percentile: Tensor


def _standardize(x: Tensor, weight: Tensor) -> Tensor:
    """(x - mean) / std with row weights; a constant column becomes 0 rather than NaN."""
    mean = (weight * x).sum()
    std = (weight * (x - mean) ** 2).sum().sqrt()
    if std <= 1e-12:
        return torch.zeros_like(x)
    return (x - mean) / std


def frequency_features(counts: Tensor) -> FrequencyTable:
    """Group the rows of a table by count and build AMTL's inputs per distinct count.

    Args:
        counts: int64 (N,), N >= 1; how often each row id occurs in the training data (rows never
            seen have 0). Any integer dtype is accepted.

    Returns:
        The :class:`FrequencyTable`, on ``counts.device``. Attributes s_i (z = 3 columns):

        * ``log_count`` = log(1 + q): the count on the scale the paper's "appear times" varies on;
        * ``percentile`` = share of rows with a smaller count plus half the share with the same
          count, in (0, 1): the "frequency rank in this feature field" (Sec. 2.2.1) as a
          function of the count only, so tied rows share it;
        * ``unseen`` = 1 if q == 0: rows the data never touched keep their initial embedding and
          deserve their own decision.

        Each column is standardised over the N rows (weighted by ``rows_per_freq``) so the MLP
        sees inputs of unit scale whatever the table size.

        alpha_i = sigmoid(norm(log(1 + q_i))) (Eq. 3) where norm standardises over the N rows.
        The paper wants alpha spread smoothly around 1/2; raw counts follow a power law, so their
        z-scores pile up just below 0 for nearly every row (a few head rows inflate the std) and
        almost all rows would get the same alpha. log(1 + q) is close to normally spread.

    Raises:
        DataError: ``counts`` is not a non-empty 1-D tensor of non-negative integers.
    """
    if not isinstance(counts, Tensor) or counts.dim() != 1 or counts.numel() == 0:
        got = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
        raise DataError(
            f"`counts` must be a non-empty 1-D tensor with one count per row, got {got}; "
            "pass the (num_embeddings,) output of the frequency counter"
        )
    if counts.dtype == torch.bool or counts.is_floating_point() or counts.is_complex():
        raise DataError(
            f"`counts` must have an integer dtype, got {counts.dtype}; pass `counts.long()` "
            "of whole occurrence counts"
        )
    if int(counts.min()) < 0:
        raise DataError(
            f"`counts` must be non-negative, got a minimum of {int(counts.min())}; "
            "count occurrences in the training data"
        )
    counts = counts.long()
    n = counts.numel()
    distinct, freq_index, rows = torch.unique(
        counts, sorted=True, return_inverse=True, return_counts=True
    )
    weight = rows.double() / n

    log_count = torch.log1p(distinct.double())
    rows_below = torch.cumsum(rows, 0) - rows
    percentile = (rows_below.double() + 0.5 * rows.double()) / n
    unseen = (distinct == 0).double()

    norm_log_count = _standardize(log_count, weight)
    features = torch.stack(
        [norm_log_count, _standardize(percentile, weight), _standardize(unseen, weight)], dim=1
    )
    alpha = torch.sigmoid(norm_log_count)
    return FrequencyTable(
        freq_index=freq_index,
        counts=distinct,
        features=features.float(),
        alpha=alpha.float(),
        rows_per_freq=rows,
        percentile=percentile,
    )


#: Frequency groups of the paper's Fig. 3: G0 (rarest rows) .. G6 (most frequent rows).
NUM_FREQUENCY_GROUPS = 7


def frequency_group_means(
    values: Tensor, counts: Tensor, groups: int = NUM_FREQUENCY_GROUPS
) -> list[float]:
    """Mean of ``values`` over ``groups`` equal-size groups of rows by ascending count.

    The paper's Fig. 3 reads kept length this way: G0 holds the rarest rows, the last group the
    most frequent. Rows with equal counts keep their row order (a stable sort), so a group
    boundary may split rows that share a count.

    Args:
        values: (N,) any real dtype, e.g. the kept lengths of a table.
        counts: (N,) integer training counts of the same rows.
        groups: how many groups, >= 1 (fewer rows than groups give empty groups, reported as
            NaN).

    Returns:
        ``groups`` floats, G0 first.
    """
    order = torch.argsort(counts, stable=True)
    parts = torch.tensor_split(values[order].double(), groups)
    return [float(p.mean()) if p.numel() else float("nan") for p in parts]


def rank_correlation(values: Tensor, counts: Tensor) -> float:
    """Spearman's rho between ``values`` and ``counts`` over a table's rows (ties get their
    average rank); 0.0 when either is constant.

    Args:
        values: (N,) any real dtype, e.g. the kept lengths of a table.
        counts: (N,) the training counts of the same rows.

    Returns:
        rho in [-1, 1]: +1 when the values rise with the count.
    """

    def ranks(x: Tensor) -> Tensor:
        _, inverse, n = torch.unique(x.double(), return_inverse=True, return_counts=True)
        ends = torch.cumsum(n, 0).double()
        return (ends - (n.double() - 1) / 2)[inverse]

    a, b = ranks(values), ranks(counts)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom else 0.0
