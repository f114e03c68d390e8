"""Optional memory budget for AMTL: a per-table price on kept length, solved exactly each step.

The paper has no size term; users come for memory. For a target ratio R (kept values / (N * D)
of each table) we add the constraint ``realized_ratio_t ~= R`` and relax it with a Lagrange
multiplier mu_t, a *price* on kept length that enters the selection itself:

    k_i = argmax_p ( h_{i,p} - mu_t * (p + 1) / D )                       (Eq. 5, priced)
    t_hat_i = softmax( (h_i - mu_t * (1..D) / D) / T )                    (Eq. 7, priced)

so the tempered softmax maximises ``E[h] - mu_t * E[kept length] / D + T * entropy``: a penalty on
the expected kept length with multiplier mu_t. Instead of a dual-ascent step, mu_t is set after
every optimiser step to the value whose hard lengths land closest to R. The realized ratio is a
non-increasing step function of mu (each row's argmax moves to shorter lengths as mu grows), so
bisection finds that value exactly. Memory is spent per row, not per lookup, so the ratio is
measured over all N rows, through the U distinct frequencies weighted by how many rows share
each one.

The constraint is an equality, so mu_t is not restricted to mu_t >= 0: when the network alone
would keep less than R (the optimiser's momentum and the loss's price term can carry rows past
the target), a negative price pays rows to keep length, and the layer lands on R from below too.

Why not the usual dual-ascent multiplier: under the straight-through estimator it does not hold
the ratio, because the hard lengths swing across a plateau of near-equal logits faster than a
multiplier can follow (docs/amtl.md, "Why not dual ascent", has the figures).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from amtl_compress.core.amtl import AMTL
from amtl_compress.core.heads import length_grid, priced_length
from amtl_compress.errors import ConfigError

_BISECTION_STEPS = 60


def realized_ratio_at(
    logits: Tensor, rows_per_freq: Tensor, price: float, scale: Tensor | None = None
) -> float:
    """Kept values / (N * D) of the hard selection of ``logits`` at ``price``.

    Args:
        logits: float (U, D), the un-priced logits of the U distinct frequencies.
        rows_per_freq: int64 (U,), rows sharing each frequency (sums to N).
        price: mu (any sign).
        scale: float (U, 1), each frequency's price factor m_i (``AMTL.price_scale``); None = 1.
    """
    d = logits.shape[-1]
    if scale is None:
        priced = price * length_grid(d, logits)
    else:
        priced = priced_length(price, scale, logits)
    # .max().indices is argmax (the first maximum on ties), 2-3x faster on (U, D); this runs
    # ~30 times per table per optimiser step.
    lengths = (logits - priced).max(dim=-1).indices + 1
    return float((rows_per_freq * lengths).sum()) / (float(rows_per_freq.sum()) * d)


@torch.no_grad()
def solve_price(
    logits: Tensor, rows_per_freq: Tensor, target_ratio: float, scale: Tensor | None = None
) -> float:
    """The price mu whose realized ratio is closest to ``target_ratio`` (ties: the lower ratio).

    Rows that share a frequency share their length, so the reachable ratios are a finite set;
    the result is the reachable ratio nearest R, from above or below. The budget is an equality
    (land on R), so mu may be negative: a subsidy on length for a layer that would otherwise keep
    less than R, e.g. once the optimiser's momentum has carried the rows past the target.

    Args:
        logits: float (U, D), the un-priced logits (:meth:`AMTL.logits`) of all frequencies.
        rows_per_freq: int64 (U,).
        target_ratio: R in [1/D, 1].
        scale: float (U, 1), each frequency's price factor m_i > 0; None = 1 for all.

    Returns:
        mu as a float; 0.0 when the un-priced selection already keeps exactly R.
    """
    d = logits.shape[-1]
    at_zero = realized_ratio_at(logits, rows_per_freq, 0.0, scale)
    if at_zero == target_ratio or d == 1:
        return 0.0

    # Search over prices representable in the logits' dtype, evaluated with the same arithmetic
    # as AMTL.selection_logits: the price is stored in a buffer of that dtype, and rounding a
    # double price into it could move the selection across the jump it was chosen at.
    def representable(x: float) -> float:
        return float(torch.tensor(x, dtype=logits.dtype))

    # Past |mu| * min m_i = D * (max h - min h) one more value of length changes every priced
    # logit by more than any two logits differ: every row keeps length 1 (mu > 0) or D (mu < 0).
    spread = float(logits.max() - logits.min()) if logits.numel() else 0.0
    smallest = float(scale.min()) if scale is not None and scale.numel() else 1.0
    bound = representable((d * spread * (1 + 1e-6) + 1e-6) / smallest)

    def ratio(mu: float) -> float:
        return realized_ratio_at(logits, rows_per_freq, mu, scale)

    # The realized ratio is non-increasing in mu: keep ratio(lo) > R >= ratio(hi), or the mirror.
    if at_zero > target_ratio:
        lo, hi = 0.0, bound
        while ratio(hi) > target_ratio:
            hi *= 2  # rounding in a low-precision dtype can leave a row just short of length 1
    else:
        lo, hi = -bound, 0.0
        while ratio(lo) <= target_ratio and ratio(lo) < 1.0:
            lo *= 2
    for _ in range(_BISECTION_STEPS):
        mid = representable(0.5 * (lo + hi))
        if mid in (lo, hi):
            break  # no representable price between them
        if ratio(mid) <= target_ratio:
            hi = mid
        else:
            lo = mid
    above, below = ratio(lo), ratio(hi)
    return lo if above - target_ratio < target_ratio - below else hi


@torch.no_grad()
def apply_budget_(
    layers: Mapping[str, AMTL], target_ratio: float | Mapping[str, float]
) -> dict[str, float]:
    """Set every layer's ``price`` so its realized ratio lands as close to its R as it can.

    Call it once after attaching and after every optimiser step (``AMTLBudget`` in
    training/budget.py does both, with R annealed from 1 over a warmup).

    Args:
        layers: table name (module path) -> its AMTL layer.
        target_ratio: R, kept values / (N * D) for EACH table, in [1/D, 1]; or module path ->
            that table's R, with an entry for every layer in ``layers``.

    Returns:
        table name -> realized ratio after the update.

    Raises:
        ConfigError: an R out of [1/D, 1], or a layer with no entry in the mapping.
    """
    realized: dict[str, float] = {}
    for name, layer in layers.items():
        if isinstance(target_ratio, Mapping):
            if name not in target_ratio:
                raise ConfigError(
                    f"no target ratio for table `{name}`; give `target_ratio` an entry for "
                    "every layer, keyed by module path"
                )
            ratio = float(target_ratio[name])
        else:
            ratio = float(target_ratio)
        if not 1.0 / layer.embedding_dim <= ratio <= 1.0:
            raise ConfigError(
                f"target ratio {ratio} is out of reach for table `{name}` (D = "
                f"{layer.embedding_dim}: every row keeps at least 1 value, so R >= "
                f"{1 / layer.embedding_dim:.4f}); choose a larger `target_ratio`"
            )
        freq_ids = torch.arange(layer.num_frequencies, device=layer.rows_per_freq.device)
        logits = layer.logits(freq_ids)
        price = solve_price(logits, layer.rows_per_freq, ratio, layer.price_scale)
        layer.price.fill_(price)
        # The same arithmetic as layer.realized_ratio(), without a second pass of the MLPs.
        realized[name] = realized_ratio_at(logits, layer.rows_per_freq, price, layer.price_scale)
    return realized
