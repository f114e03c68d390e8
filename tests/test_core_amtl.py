"""The AMTL layer: masks (Eq. 1, 4-8), twins weighting (Eq. 2-3), warm start, persistence."""

from __future__ import annotations

import json

import pytest
import torch

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.budget import apply_budget_
from amtl_compress.core.frequency import frequency_features
from amtl_compress.errors import ConfigError, DataError

D = 8


def counts_fixture() -> torch.Tensor:
    """int64 (40,) with repeated counts (U < N) and unseen rows."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(40, generator=g) ** 3 * 200).long()


def scrambled(config: AMTLConfig | None = None, seed: int = 0) -> AMTL:
    """An AMTL layer whose last layers are random, so rows get different lengths."""
    torch.manual_seed(seed)
    layer = AMTL(counts_fixture(), D, config or AMTLConfig())
    with torch.no_grad():
        for branch in (layer.h_aml, layer.l_aml):
            if branch is not None:
                branch[-1].weight.normal_(0, 2.0)
                branch[-1].bias.normal_(0, 2.0)
    return layer


def is_prefix_mask(m: torch.Tensor, length: torch.Tensor) -> bool:
    want = (torch.arange(m.shape[-1]) < length.unsqueeze(-1)).to(m.dtype)
    return torch.equal(m, want)


# ---- Eq. 1/6: prefix masks --------------------------------------------------------------


def test_hard_mask_is_a_prefix_of_length_argmax_plus_one() -> None:
    layer = scrambled().eval()
    ids = torch.arange(40).reshape(5, 8)
    m = layer.mask(ids)
    assert m.shape == (5, 8, D) and m.dtype == torch.float32
    lengths = layer.lengths()
    assert lengths.dtype == torch.int64 and lengths.shape == (40,)
    assert is_prefix_mask(m, lengths[ids])
    argmax = layer.logits(layer.freq_index).argmax(-1)
    assert torch.equal(lengths, argmax + 1)
    assert len(set(lengths.tolist())) > 1  # the check is not vacuous
    assert lengths.min() >= 1 and lengths.max() <= D


def test_ste_forward_equals_hard_mask_exactly_and_has_gradients() -> None:
    layer = scrambled().train()
    ids = torch.randint(0, 40, (64,))
    m = layer.mask(ids)
    assert m.requires_grad
    assert is_prefix_mask(m.detach(), layer.lengths()[ids])
    # Eq. 8: the backward pass is that of the soft mask built from t_hat (Eq. 7)
    weights = torch.randn(64, D)
    (m * weights).sum().backward()
    ste_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    freq = layer.freq_index[ids]
    t_hat = torch.softmax(layer.logits(freq) / layer.temperature, -1)
    soft = t_hat.flip(-1).cumsum(-1).flip(-1)
    (soft * weights).sum().backward()
    for ste, ref in zip(ste_grads, [p.grad for p in layer.parameters()], strict=True):
        # Same maths, summed in another order (per distinct count vs per id): float rounding.
        torch.testing.assert_close(ste, ref, rtol=1e-4, atol=1e-4)


def test_nste_forward_is_the_soft_mask_and_eval_is_hard() -> None:
    layer = scrambled(AMTLConfig(straight_through=False), seed=1).train()
    layer.temperature = 0.7
    ids = torch.arange(40)
    m = layer.mask(ids)
    t_hat = torch.softmax(layer.logits(layer.freq_index) / 0.7, -1)
    want = torch.stack([t_hat[:, j:].sum(-1) for j in range(D)], dim=-1)  # m_j = P(k >= j)
    torch.testing.assert_close(m, want)
    assert not torch.equal(m, (m > 0.5).float())  # really soft
    layer.eval()
    assert is_prefix_mask(layer.mask(ids), layer.lengths())


def test_gradients_reach_both_branches() -> None:
    layer = scrambled().train()
    (layer.mask(torch.arange(40)) * torch.randn(40, D)).sum().backward()
    for branch in (layer.h_aml, layer.l_aml):
        assert branch[-1].weight.grad.abs().sum() > 0
        assert branch[0].weight.grad.abs().sum() > 0


def test_single_branch_ablation_has_one_branch() -> None:
    layer = scrambled(AMTLConfig(twins=False))
    assert layer.l_aml is None
    assert all(name.startswith("h_aml.") for name, _ in layer.named_parameters())
    u = torch.arange(layer.num_frequencies)
    torch.testing.assert_close(
        layer.logits(u), layer.branch_logits(layer.features, layer.prior, layer.price_scale)[0]
    )
    (layer.mask(torch.arange(40)) * torch.randn(40, D)).sum().backward()
    assert layer.h_aml[-1].weight.grad.abs().sum() > 0


# ---- Eq. 2-3: twins weighted by alpha ------------------------------------------------------


def test_alpha_increases_with_count() -> None:
    layer = AMTL(counts_fixture(), D)
    order = torch.argsort(layer.distinct_counts)
    alpha = layer.alpha[order]
    assert torch.all(alpha[1:] > alpha[:-1])
    assert torch.all((alpha > 0) & (alpha < 1))


def test_logits_are_alpha_weighted_branches() -> None:
    layer = scrambled()
    u = torch.tensor([0, 3, 5])
    s = layer.features[u]
    a = layer.alpha[u].unsqueeze(1)
    h, low = layer.branch_logits(s, layer.prior[u], layer.price_scale[u])
    want = a * h + (1 - a) * low
    got = layer.logits(u)
    assert got.shape == (3, D)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(h, low)  # the weighting matters


def test_plain_head_is_the_papers_mlp() -> None:
    layer = scrambled(AMTLConfig(head="plain"))
    s = layer.features
    h, low = layer.branch_logits(s, layer.prior)
    torch.testing.assert_close(h, layer.h_aml(s))
    torch.testing.assert_close(low, layer.l_aml(s))


@pytest.mark.parametrize("head", ["unit", "price"])
def test_unit_heads_read_unit_rms_activations(head: str) -> None:
    layer = scrambled(AMTLConfig(head=head))
    s, prior = layer.features, layer.prior
    hidden = layer.h_aml[:-1](s)
    unit = hidden / hidden.square().mean(dim=-1, keepdim=True).sqrt()
    last = layer.h_aml[-1]
    want = last(unit, prior) if head == "price" else last(unit)
    torch.testing.assert_close(layer.branch_logits(s, prior)[0], want)
    # Scaling a row's hidden activation does not change its logits: no row's length depends
    # on the norm of its activation.
    with torch.no_grad():
        layer.h_aml[-3].weight.mul_(7.0)
        layer.h_aml[-3].bias.mul_(7.0)
    torch.testing.assert_close(layer.branch_logits(s, prior)[0], want)


def test_unit_head_keeps_a_dead_activation_finite() -> None:
    layer = AMTL(counts_fixture(), D, AMTLConfig(head="unit"))
    with torch.no_grad():
        layer.h_aml[-3].bias.fill_(-1e3)  # every last hidden unit dead: phi = 0
    h, _ = layer.branch_logits(layer.features, layer.prior)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, layer.h_aml[-1].bias.expand_as(h))


def test_price_head_logits_are_shared_logits_minus_a_row_price() -> None:
    layer = scrambled(AMTLConfig(head="price"))
    s, prior = layer.features, layer.prior
    last = layer.h_aml[-1]
    phi = layer.h_aml[:-1](s)
    phi = phi / phi.square().mean(dim=-1, keepdim=True).sqrt()
    rho = phi @ last.weight.T + last.offset + last.slope * prior
    grid = torch.arange(1, D + 1) / D
    torch.testing.assert_close(layer.branch_logits(s, prior)[0], last.bias - rho * grid)
    # A larger row price never gives a longer row: the argmax is non-increasing in rho.
    rhos = torch.linspace(-5, 5, 101).unsqueeze(1)
    lengths = (last.bias - rhos * grid).argmax(dim=-1)
    assert torch.all(lengths.diff() <= 0)


@pytest.mark.parametrize("dim", [2, 16, 512])
@pytest.mark.parametrize("prior", [0.5, 0.99])
def test_frequency_prior_keeps_the_warm_start_and_orders_lengths_under_a_price(
    dim: int, prior: float
) -> None:
    counts = torch.cat([torch.zeros(30, dtype=torch.long), (1000 / torch.arange(1, 300)).long()])
    # The prior is divided by the price scale m = exp(gamma (1 - 2 percentile)); prior / m falls
    # with the count only while gamma <= 0.5, so the prior is tested at that scale.
    config = AMTLConfig(frequency_prior=prior, price_scale=0.5, price_rule="rank")
    layer = AMTL(counts, dim, config)
    assert torch.equal(layer.lengths(), torch.full((counts.numel(),), dim))  # exact warm start
    # prior = B (1 - 2 percentile) / m: decreasing in the count, m * prior within (-B, B).
    order = torch.argsort(layer.distinct_counts)
    assert torch.all(layer.prior[order].squeeze(1).diff() < 0)
    apply_budget_({"t": layer}, 0.6 if dim == 2 else 0.4)
    lengths = layer.lengths()
    by_count = lengths[torch.argsort(counts, stable=True)]
    assert torch.all(by_count.diff() >= 0)  # lengths rise with the count
    assert by_count[-1] > by_count[0]


# ---- warm start ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 16, 512])
@pytest.mark.parametrize(
    "config",
    [AMTLConfig(), AMTLConfig(twins=False, hidden_dims=()), AMTLConfig(head="plain")],
)
def test_warm_start_is_full_length(dim: int, config: AMTLConfig) -> None:
    counts = torch.cat([torch.zeros(5, dtype=torch.long), torch.randint(1, 10**6, (200,))])
    layer = AMTL(counts, dim, config)
    assert torch.equal(layer.lengths(), torch.full((205,), dim))
    assert layer.realized_ratio() == 1.0
    for training in (True, False):
        layer.train(training)
        assert torch.equal(layer.mask(torch.arange(205)), torch.ones(205, dim))


def test_warm_start_gradient_reaches_last_layer_weights() -> None:
    layer = AMTL(counts_fixture(), D).train()
    layer.expected_ratio().backward()
    assert layer.h_aml[-1].weight.grad.abs().sum() > 0
    assert layer.l_aml[-1].weight.grad.abs().sum() > 0


def test_init_margin_sets_the_logit_ramp() -> None:
    layer = AMTL(counts_fixture(), 5, AMTLConfig(init_margin=2.0, frequency_prior=0.0))
    logits = layer.logits(torch.arange(layer.num_frequencies))
    ramp = 2.0 * torch.log1p(torch.arange(5.0)) / torch.log(torch.tensor(5.0))
    torch.testing.assert_close(logits, ramp.expand_as(logits))
    steps = ramp.diff()
    assert torch.all(steps > 0) and torch.all(steps.diff() < 0)  # increasing, concave


# ---- only distinct frequencies go through the MLPs ----------------------------------------


def test_mask_runs_branches_only_on_distinct_frequencies() -> None:
    layer = scrambled()
    seen: list[int] = []
    layer.h_aml[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    layer.l_aml[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    ids = torch.tensor([[3, 3, 3, 7], [7, 3, 12, 3]])
    distinct = torch.unique(layer.freq_index[ids]).numel()
    m = layer.mask(ids)
    assert seen == [distinct, distinct]
    assert m.shape == (2, 4, D)
    torch.testing.assert_close(m[0, 0], m[1, 3])  # gathered back per id


def test_expected_and_realized_ratio_are_row_weighted() -> None:
    layer = scrambled()
    lengths = layer.lengths()
    assert layer.realized_ratio() == pytest.approx(lengths.sum().item() / (40 * D))
    t_hat = torch.softmax(layer.logits(layer.freq_index) / layer.temperature, -1)
    per_row = (t_hat * torch.arange(1, D + 1)).sum(-1) / D
    ratio = layer.expected_ratio()
    assert ratio.requires_grad
    assert ratio.item() == pytest.approx(per_row.mean().item(), rel=1e-5)


def test_temperature_is_validated_and_used() -> None:
    layer = scrambled()
    hot = layer.expected_ratio().item()
    layer.temperature = 0.01
    cold = layer.expected_ratio().item()
    assert cold == pytest.approx(layer.realized_ratio(), abs=1e-3)  # T -> 0: soft == hard
    assert hot != pytest.approx(cold, abs=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        layer.temperature = 0.0


# ---- frequency features ---------------------------------------------------------------------


def test_frequency_table_groups_rows_by_count() -> None:
    counts = torch.tensor([5, 0, 5, 2, 0, 0, 9])
    table = frequency_features(counts)
    assert table.counts.tolist() == [0, 2, 5, 9]
    assert table.rows_per_freq.tolist() == [3, 1, 2, 1]
    assert torch.equal(table.counts[table.freq_index], counts)
    assert table.features.shape == (4, 3) and table.features.dtype == torch.float32
    assert table.alpha.dtype == torch.float32
    w = table.rows_per_freq.double() / 7
    # columns standardised over the rows
    mean = (w[:, None] * table.features.double()).sum(0)
    std = (w[:, None] * (table.features.double() - mean) ** 2).sum(0).sqrt()
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # ranks: increasing with count; unseen flag only on count 0
    assert torch.all(table.features[1:, 1] > table.features[:-1, 1])
    assert table.features[0, 2] > 0 and torch.all(table.features[1:, 2] < 0)
    # alpha = sigmoid(standardised log(1 + q)) (Eq. 3)
    x = torch.log1p(table.counts.double())
    z = (x - (w * x).sum()) / (w * (x - (w * x).sum()) ** 2).sum().sqrt()
    torch.testing.assert_close(table.alpha, torch.sigmoid(z).float())


def test_alpha_is_spread_around_half_for_power_law_counts() -> None:
    counts = (10**5 / torch.arange(1, 5001, dtype=torch.float64) ** 1.1).long()
    alpha = frequency_features(counts).alpha[frequency_features(counts).freq_index]
    assert 0.3 < alpha.median() < 0.7
    assert alpha.quantile(0.1) < 0.3 and alpha.quantile(0.9) > 0.7


def test_one_distinct_count_gives_alpha_half_and_zero_features() -> None:
    table = frequency_features(torch.full((6,), 3))
    assert table.alpha.tolist() == [0.5]
    assert torch.equal(table.features, torch.zeros(1, 3))


@pytest.mark.parametrize(
    ("counts", "culprit"),
    [
        (torch.tensor([1.0, 2.0]), "integer dtype"),
        (torch.tensor([[1, 2]]), "1-D"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        (torch.tensor([3, -1]), "non-negative"),
    ],
)
def test_bad_counts_raise_data_error(counts: torch.Tensor, culprit: str) -> None:
    with pytest.raises(DataError, match=culprit):
        AMTL(counts, D)


# ---- config and persistence ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        AMTLConfig(),
        AMTLConfig(hidden_dims=(), twins=False, straight_through=False, temperature=0.3),
        AMTLConfig(hidden_dims=(64, 16, 8), init_margin=0.5),
        AMTLConfig(price_rule="rank", price_scale=4.0),
    ],
)
def test_config_json_round_trip(config: AMTLConfig) -> None:
    back = AMTLConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert isinstance(back.hidden_dims, tuple)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"hidden_dims": (32, 0)}, "hidden_dims"),
        ({"hidden_dims": (32.0,)}, "hidden_dims"),
        ({"twins": 1}, "twins"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"init_margin": -1.0}, "init_margin"),
        ({"version": 4}, "version"),
        ({"version": 1}, "version"),  # version 1 had no head: only head="plain" is version 1
        ({"version": 2}, "version"),  # version 2 had no price_rule: only "rank" is version 2
        ({"price_rule": "count"}, "price_rule"),
        ({"head": "norm"}, "head"),
        ({"frequency_prior": 1.0}, "frequency_prior"),
        ({"frequency_prior": -0.1}, "frequency_prior"),
    ],
)
def test_config_validation(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        AMTLConfig(**kwargs)


def test_version_1_config_keeps_its_meaning() -> None:
    old = {k: v for k, v in AMTLConfig().to_dict().items() if k not in ("head", "price_rule")}
    config = AMTLConfig.from_dict(old | {"version": 1})
    assert (config.head, config.price_rule, config.version) == ("plain", "rank", 1)
    assert AMTLConfig.from_dict(config.to_dict()) == config
    assert AMTLConfig().version == 3 and AMTLConfig().head == "price"


def test_version_2_config_keeps_its_meaning() -> None:
    new_keys = ("price_rule", "price_scale")
    old = {k: v for k, v in AMTLConfig().to_dict().items() if k not in new_keys}
    config = AMTLConfig.from_dict(old | {"version": 2})
    assert (config.price_rule, config.price_scale, config.version) == ("rank", 2.0, 2)
    assert AMTLConfig.from_dict(config.to_dict()) == config
    # a version 2 dict that named its gamma keeps it
    assert AMTLConfig.from_dict(old | {"version": 2, "price_scale": 0.5}).price_scale == 0.5
    assert (AMTLConfig().price_rule, AMTLConfig().price_scale) == ("log_count", 2.0)


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="tau"):
        AMTLConfig.from_dict({"tau": 1.0})


def test_state_dict_round_trip_restores_params_and_buffers() -> None:
    layer = scrambled().eval()
    state = layer.state_dict()
    assert {"freq_index", "alpha", "features", "rows_per_freq", "distinct_counts"} <= set(state)
    fresh = AMTL(counts_fixture(), D).eval()
    assert not torch.equal(fresh.lengths(), layer.lengths())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.lengths(), layer.lengths())
    ids = torch.arange(40)
    assert torch.equal(fresh.mask(ids), layer.mask(ids))
    for name, tensor in state.items():
        assert torch.equal(fresh.state_dict()[name], tensor)


# ---- price scale ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["rank", "log_count"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("prior", [0.0, 0.9])
def test_price_scale_keeps_the_warm_start(rule: str, gamma: float, prior: float) -> None:
    counts = torch.cat([torch.zeros(30, dtype=torch.long), (1000 / torch.arange(1, 300)).long()])
    config = AMTLConfig(price_scale=gamma, frequency_prior=prior, price_rule=rule)
    layer = AMTL(counts, 64, config)
    assert torch.equal(layer.lengths(), torch.full((counts.numel(),), 64))
    # rare rows pay more than frequent ones
    order = torch.argsort(layer.distinct_counts)
    m = layer.price_scale[order].squeeze(1)
    assert torch.all(m.diff() < 0) if gamma else torch.all(m == 1)


def test_log_count_rule_makes_lengths_grow_like_log_count() -> None:
    counts = torch.cat([torch.zeros(100), torch.full((100,), 2), torch.full((100,), 30),
                        torch.full((100,), 1022)]).long()
    layer = AMTL(counts, 64, AMTLConfig(price_rule="log_count", price_scale=1.0))
    log_count = torch.log2(2.0 + layer.distinct_counts.double())  # 1, 2, 5, 10
    m = layer.price_scale.squeeze(1).double()
    # m_i * log2(2 + q_i) is one constant: G, the rows' geometric mean of log2(2 + q)
    geo_mean = torch.exp(torch.log(log_count).mean())
    torch.testing.assert_close(m * log_count, torch.full_like(m, float(geo_mean)))
    realized = apply_budget_({"t": layer}, 0.2)["t"]
    assert abs(realized - 0.2) <= 0.02
    lengths = layer.lengths().double()
    per_count = torch.stack([lengths[counts == q].mean() for q in (0, 2, 30, 1022)])
    # L ~ 1 / price: lengths in the ratio of log2(2 + q) (up to rounding to whole dims)
    torch.testing.assert_close(per_count / per_count[0], log_count, atol=0.0, rtol=0.25)


def test_log_count_rule_keeps_similar_counts_at_similar_lengths() -> None:
    # every count in 200..400: log2(2 + q) spans 1.1x, so lengths hardly spread, where the rank
    # rule spreads them e^(2 gamma)-fold whatever the counts are
    counts = torch.arange(200, 401).long()
    spread = {}
    for rule, gamma in (("log_count", 1.0), ("rank", 1.0)):
        layer = AMTL(counts, 64, AMTLConfig(price_rule=rule, price_scale=gamma))
        apply_budget_({"t": layer}, 0.25)
        spread[rule] = int(layer.lengths().max() - layer.lengths().min())
    assert spread["log_count"] <= 2 < spread["rank"]


def test_price_scale_spreads_lengths_by_frequency_under_a_budget() -> None:
    counts = torch.cat([torch.zeros(30, dtype=torch.long), (1000 / torch.arange(1, 300)).long()])
    spread = {}
    for gamma in (0.0, 0.5, 1.0):
        layer = AMTL(counts, 64, AMTLConfig(price_scale=gamma, frequency_prior=0.0,
                                            price_rule="rank"))
        realized = apply_budget_({"t": layer}, 0.25)["t"]
        assert abs(realized - 0.25) <= 0.02
        by_count = layer.lengths()[torch.argsort(counts, stable=True)]
        assert torch.all(by_count.diff() >= 0)  # never shorter for a more frequent row
        spread[gamma] = int(by_count[-1] - by_count[0])
    # one price for every row: every row has the same logits, so the same length
    assert spread[0.0] == 0 and 0 < spread[0.5] < spread[1.0]


def test_price_scale_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^AMTLConfig `price_scale` must be a number in"):
        AMTLConfig(price_scale=-1.0)
