"""The memory budget: a price on kept length, solved so the realized ratio lands on R."""

from __future__ import annotations

import pytest
import torch

from amtl_compress.core.amtl import AMTL
from amtl_compress.core.budget import apply_budget_, realized_ratio_at, solve_price
from amtl_compress.errors import ConfigError

N, D = 2000, 16


def zipf_counts(seed: int) -> torch.Tensor:
    """int64 (N,): count of the r-th most frequent row ~ 20000 / r, 100 rows never seen."""
    g = torch.Generator().manual_seed(seed)
    counts = (20000 / torch.arange(1, N + 1, dtype=torch.float64)).long()
    counts[torch.randperm(N, generator=g)[:100]] = 0
    return counts[torch.randperm(N, generator=g)]


def train_with_budget(target: float, seed: int, steps: int = 300) -> tuple[AMTL, list[float]]:
    """Fit a reconstruction task that prefers long rows, under the budget.

    Row i should reproduce a random embedding whose dim j has variance 1 / (j + 1); its error is
    weighted by the row's count, so frequent rows and leading dims matter most.
    """
    torch.manual_seed(seed)
    counts = zipf_counts(seed)
    layer = AMTL(counts, D)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(N, D, generator=g) / torch.arange(1, D + 1).sqrt()
    weight = (counts / counts.sum()).float().unsqueeze(1)
    ids = torch.arange(N)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    realized = [apply_budget_({"t": layer}, target)["t"]]
    for _ in range(steps):
        loss = 10 * (weight * ((1 - layer.mask(ids)) * emb) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        realized.append(apply_budget_({"t": layer}, target)["t"])
    return layer, realized


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_realized_ratio_lands_on_target_at_every_step(target: float) -> None:
    layer, realized = train_with_budget(target, seed=0)
    # Rows sharing a frequency move together, so a step can only reach the ratios its groups
    # allow; the final ratio and nearly every step land within 0.02.
    assert abs(realized[-1] - target) <= 0.02
    off = [abs(r - target) > 0.02 for r in realized]
    assert sum(off) <= 0.05 * len(off)
    assert layer.lengths().sum().item() / (N * D) == pytest.approx(layer.realized_ratio())
    # The budget is spent on frequent rows: they keep more dims than unseen ones.
    counts = zipf_counts(0)
    lengths = layer.lengths()
    assert lengths[counts >= 100].float().mean() > lengths[counts == 0].float().mean()


def test_solve_price_picks_the_reachable_ratio_nearest_the_target() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 8, generator=g, dtype=torch.float64)
    rows = torch.randint(1, 50, (40,), generator=g)
    # Brute force: the reachable ratios over a fine grid of prices.
    prices = torch.linspace(-200, 200, 40001).tolist()
    reachable = {realized_ratio_at(logits, rows, p) for p in prices}
    assert realized_ratio_at(logits, rows, 0.0) < 0.8  # 0.8 needs a negative price
    for target in (0.2, 0.35, 0.5, 0.8, 0.95):
        mu = solve_price(logits, rows, target)
        got = realized_ratio_at(logits, rows, mu)
        best = min(abs(r - target) for r in reachable)
        assert abs(got - target) == pytest.approx(best, abs=1e-12)


def test_no_price_when_already_under_budget_and_warm_start_is_kept() -> None:
    layer = AMTL(torch.tensor([0, 1, 1, 5, 50]), 4)
    assert apply_budget_({"t": layer}, 1.0) == {"t": 1.0}
    assert float(layer.price) == 0.0
    assert torch.equal(layer.lengths(), torch.full((5,), 4))


def test_a_layer_that_keeps_too_little_is_paid_back_up_to_the_target() -> None:
    # Momentum can carry the rows below R after the price has fallen to 0; the equality budget
    # then subsidises length (a negative price) instead of leaving the ratio under R.
    layer = AMTL(torch.tensor([0, 1, 1, 5, 50, 7, 3, 2]), 8)
    with torch.no_grad():
        layer.h_aml[-1].bias.copy_(-(torch.arange(8.0) ** 2))  # prefer length 1
        layer.l_aml[-1].bias.copy_(-(torch.arange(8.0) ** 2))
    assert apply_budget_({"t": layer}, 0.125)["t"] == pytest.approx(0.125)
    assert float(layer.price) == 0.0
    ratios = apply_budget_({"t": layer}, 0.5)
    assert abs(ratios["t"] - 0.5) <= 1 / 8 and float(layer.price) < 0
    assert ratios["t"] == layer.realized_ratio()


def test_price_enters_selection_and_state_dict() -> None:
    layer = AMTL(torch.tensor([0, 1, 1, 5, 50]), 4)
    ratios = apply_budget_({"t": layer}, 0.5)
    assert ratios["t"] == pytest.approx(0.5) and float(layer.price) > 0
    restored = AMTL(torch.tensor([0, 1, 1, 5, 50]), 4)
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored.lengths(), layer.lengths())
    assert layer.mask(torch.arange(5)).sum(-1).tolist() == layer.lengths().tolist()


def test_unreachable_target_is_a_config_error() -> None:
    layer = AMTL(torch.tensor([0, 1, 5]), 4)
    with pytest.raises(ConfigError) as info:
        apply_budget_({"t": layer}, 0.2)
    assert str(info.value) == (
        "target ratio 0.2 is out of reach for table `t` (D = 4: every row keeps at least 1 "
        "value, so R >= 0.2500); choose a larger `target_ratio`"
    )


def test_reported_ratio_is_the_layers_own_after_the_price_is_stored() -> None:
    layer, realized = train_with_budget(0.3, seed=1, steps=40)
    # The price is stored in the layer's float32 buffer; the ratio apply_budget_ reports must be
    # the one the layer then selects.
    assert realized[-1] == layer.realized_ratio()
