"""The Adaptively-Masked Twins-based Layer of one embedding table (paper Sec. 2.2, Eq. 1-8)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from amtl_compress._config import check_version, known_keys
from amtl_compress.core.frequency import FrequencyTable, frequency_features
from amtl_compress.core.heads import branch, priced_length, run_branch, warm_start_
from amtl_compress.core.rotation import ORDERINGS as _ORDERINGS
from amtl_compress.errors import ConfigError

#: Config versions this code reads. Version 1 predates ``head``: it always meant ``"plain"``;
#: version 2 predates ``price_rule``: it always meant ``"rank"``.
_CONFIG_VERSIONS = (1, 2, 3)
#: The last layer of each branch (see :class:`AMTLConfig` ``head``).
HEADS = ("price", "price_plain", "unit", "plain")
#: How a row's price factor m_i follows its frequency (see :class:`AMTLConfig` ``price_rule``).
PRICE_RULES = ("rank", "log_count")
#: ``AMTLConfig.price_scale``'s default (docs/amtl.md, "Choosing the default recipe").
PRICE_SCALE = 2.0
#: ``price_scale`` of version 1-2 configs that do not name one (the default they were written
#: under, with ``price_rule="rank"``).
_RANK_PRICE_SCALE = 2.0


@dataclass(frozen=True)
class AMTLConfig:
    """Hyper-parameters of every AMTL layer attached in one run.

    Args:
        hidden_dims: widths of the hidden layers of each branch MLP (ReLU between layers, the
            last layer is linear with D outputs). ``()`` makes each branch one linear layer.
        twins: True = the twin h-AML/l-AML branches weighted by alpha (Eq. 2); False = the
            single-branch AML ablation (Sec. 3.6).
        straight_through: True = the forward pass uses the hard mask and gradients flow through
            the tempered softmax (STE, Eq. 8); False = the AMTL-nSTE ablation: in training the
            soft mask from t_hat (Eq. 7) is used in the forward pass too. Evaluation always uses
            the hard mask.
        temperature: T of the tempered softmax (Eq. 7), > 0. Only the initial value: the layer's
            ``temperature`` attribute may be annealed during training.
        init_margin: at initialisation the logit of length p + 1 is
            ``init_margin * log(1 + p) / log(D)`` for every row: strictly increasing, so the full
            length wins, and the length-1 choice trails it by ``init_margin``; > 0. Larger = a
            longer, more confident start. The ramp is concave so that a memory budget's linear
            price on length (core/budget.py) can select every intermediate length at the start;
            a linear ramp would tie all lengths at one price.
        ordering: ``"pca"`` (the default: the recipe docs/benchmarks.md measured) = at attach,
            rotate the table onto its principal axes so the kept prefix holds the most energy,
            and rotate each looked-up row back (core/rotation.py; outputs unchanged at full
            length up to float rounding); ``"none"`` = mask the table's own dims (the paper,
            outputs unchanged bit for bit at attach). Not for EmbeddingBags with mode max.
        head: the last layer of each branch (our departure from the paper; docs/amtl.md,
            "Allocation follows frequency", has the measurements):

            * ``"price"`` (the default): ``h_L = b - rho * (1..D) / D``, a logit vector ``b``
              (D,) shared by all rows minus one *row price* ``rho = w^T phi' + c + slope *
              prior`` on kept length, where ``phi'`` is the last hidden activation divided by
              its root mean square and ``prior`` is the frequency prior (see
              ``frequency_prior``). A row's length is then a non-increasing function of its
              price, and no weight update moves one row's logits more than another's because
              its activation is larger.
            * ``"price_plain"``: the same with ``phi`` as is (ablation).
            * ``"unit"``: the paper's linear last layer (D free logits) reading ``phi'``.
            * ``"plain"``: the paper's linear last layer reading ``phi`` (version 1 configs
              mean this). The memory price in the loss then shortens rows in proportion to
              their hidden-activation norm, so lengths follow that norm, not the frequency.
        frequency_prior: the price heads' start value of ``slope``, in [0, 1); other heads
            ignore it. ``prior = B * (1 - 2 * percentile)`` per row (``percentile`` = the
            row's frequency rank in (0, 1), Sec. 2.2.1), where ``B`` is the largest row price
            at which the full length still wins at price 0. So at attach every row keeps its
            full length (the warm start stays exact), and under a memory budget frequent rows
            start longer than rare ones; ``slope`` is learned from there. 0 = no prior. The
            prior is divided by the price factor below (so it never breaks the warm start),
            and with ``price_rule="rank"`` prior / factor falls monotonically with frequency
            only for ``price_scale`` <= 0.5.
        price_scale: gamma in [0, 10]: the strength of ``price_rule``. 0 = one price for
            every row.
        price_rule: how the budget's price on a row's length (the learned row price and the
            budget's mu alike) is scaled by the row's training count q, so that rare rows pay
            more than frequent ones (kept length L ~ 1 / price on the concave ramp):

            * ``"log_count"`` (the default): by ``(G / log2(2 + q))^gamma``, G the geometric
              mean of ``log2(2 + q)`` over the rows, so lengths grow like
              ``log2(2 + q)^gamma``: about 1.6x from a row seen once to one seen 10 times,
              whatever the table's size. A table whose counts are all similar keeps similar
              lengths.
            * ``"rank"``: by ``exp(gamma * (1 - 2 * percentile))``, so lengths spread about
              ``e^(2 gamma)``-fold from the rarest to the most frequent rows, however similar
              their counts are (version 1-2 configs mean this, with gamma 2 by default).

            Unlike the prior neither has a bound: at price 0 (no budget, or the start of a
            gradual budget) they scale nothing, so the warm start stays exact.
        version: format version of this config, for reading old run directories. Version 1
            (written before ``head`` existed) reads as ``head="plain"``, version 1-2 (before
            ``price_rule``) as ``price_rule="rank"``.

    Raises:
        ConfigError: (a ValueError) a field has the wrong type or range.
    """

    hidden_dims: tuple[int, ...] = (32, 32)
    twins: bool = True
    straight_through: bool = True
    temperature: float = 1.0
    init_margin: float = 4.0
    ordering: str = "pca"
    head: str = "price"
    frequency_prior: float = 0.0
    price_scale: float = PRICE_SCALE
    price_rule: str = "log_count"
    version: int = 3

    def __post_init__(self) -> None:
        dims = self.hidden_dims
        if isinstance(dims, list):  # JSON has no tuples
            dims = tuple(dims)
            object.__setattr__(self, "hidden_dims", dims)
        if not isinstance(dims, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
        ):
            raise ConfigError(
                f"AMTLConfig `hidden_dims` must be a tuple of positive ints, got {dims!r}; "
                "e.g. (32, 32), or () for one linear layer"
            )
        for name in ("twins", "straight_through"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"AMTLConfig `{name}` must be True or False, got {getattr(self, name)!r}"
                )
        for name in ("temperature", "init_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"AMTLConfig `{name}` must be a number > 0, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"AMTLConfig `{name}` must be a finite number > 0, got {value!r}; e.g. 1.0"
                )
            object.__setattr__(self, name, float(value))
        if self.ordering not in _ORDERINGS:
            raise ConfigError(
                f"AMTLConfig `ordering` must be one of {list(_ORDERINGS)}, got {self.ordering!r}"
            )
        if self.head not in HEADS:
            raise ConfigError(
                f"AMTLConfig `head` must be one of {list(HEADS)}, got {self.head!r}"
            )
        prior = self.frequency_prior
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not (
            0.0 <= prior < 1.0
        ):
            raise ConfigError(
                f"AMTLConfig `frequency_prior` must be a number in [0, 1), got {prior!r}; "
                "e.g. 0.5, or 0 for no prior"
            )
        object.__setattr__(self, "frequency_prior", float(prior))
        gamma = self.price_scale
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (
            math.isfinite(gamma) and 0.0 <= gamma <= 10.0
        ):
            raise ConfigError(
                f"AMTLConfig `price_scale` must be a number in [0, 10], got {gamma!r}; "
                "e.g. 1.0, or 0 for one price for every row"
            )
        object.__setattr__(self, "price_scale", float(gamma))
        if self.price_rule not in PRICE_RULES:
            raise ConfigError(
                f"AMTLConfig `price_rule` must be one of {list(PRICE_RULES)}, got "
                f"{self.price_rule!r}"
            )
        check_version(AMTLConfig, self.version, _CONFIG_VERSIONS)
        if self.version == 1 and self.head != "plain":
            raise ConfigError(
                f"AMTLConfig `version` 1 has no `head` (it always meant \"plain\"), got "
                f"head={self.head!r}; use `version=3` for other heads"
            )
        if self.version < 3 and self.price_rule != "rank":
            raise ConfigError(
                f"AMTLConfig `version` {self.version} has no `price_rule` (it always meant "
                f"\"rank\"), got price_rule={self.price_rule!r}; use `version=3` for other rules"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``hidden_dims`` becomes a list)."""
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AMTLConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError, missing ones get defaults.

        A version 1 dict (written before ``head`` existed) keeps its meaning: ``head="plain"``
        (and ``frequency_prior=0.0``, which that head ignores); a version 1-2 dict (before
        ``price_rule``) reads as ``price_rule="rank"`` with that rule's default gamma.
        """
        data = known_keys(cls, d)
        if data.get("version") == 1:
            data.setdefault("head", "plain")
            data.setdefault("frequency_prior", 0.0)
        if data.get("version") in (1, 2):
            data.setdefault("price_rule", "rank")
            data.setdefault("price_scale", _RANK_PRICE_SCALE)
        return cls(**data)


class AMTL(nn.Module):
    """AMTL layer of one table: frequency attributes -> a prefix mask per row (Eq. 1-8).

    Row i of the table keeps dims ``0..k_i`` (Eq. 1), i.e. length k_i + 1 in [1, D]. k_i is the
    argmax of the logits ``h_L^(AMTL) = alpha_i h_L^(h-AML) + (1 - alpha_i) h_L^(l-AML)``
    (Eq. 2-5) of the row's frequency attributes. All rows with the same count share one decision,
    so the branch MLPs run over the U distinct counts, never over the N rows.

    Warm start guarantee: right after construction the logits of every row are a strictly
    increasing ramp (the last layer of each branch has zero weights and the bias ramp described
    in :class:`AMTLConfig`; the price heads subtract the frequency prior, which is bounded so
    the ramp stays increasing), so every row's argmax is D - 1, every hard mask is all ones and a
    model with the layer attached computes exactly what it computed before. Because the ramp
    lives in the biases, gradients reach the last layer's weights from the first step.

    Args:
        counts: int64 (N,); training-data occurrence count of every row (0 for unseen rows).
        embedding_dim: D >= 1, the width of the table.
        config: hyper-parameters (see :class:`AMTLConfig`).

    Buffers (persistent, so ``state_dict`` restores them): ``freq_index`` int64 (N,),
    ``distinct_counts`` int64 (U,), ``features`` float (U, z), ``alpha`` float (U,),
    ``rows_per_freq`` int64 (U,); see :class:`~amtl_compress.core.frequency.FrequencyTable`.
    """

    freq_index: Tensor
    distinct_counts: Tensor
    features: Tensor
    alpha: Tensor
    rows_per_freq: Tensor

    def __init__(self, counts: Tensor, embedding_dim: int, config: AMTLConfig = AMTLConfig()):
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int):
            raise ValueError(f"`embedding_dim` must be an int, got {embedding_dim!r}")
        if embedding_dim < 1:
            raise ValueError(f"`embedding_dim` must be >= 1, got {embedding_dim}")
        table = frequency_features(counts)
        self.config = config
        self.num_embeddings = int(counts.numel())
        self.embedding_dim = embedding_dim
        self.temperature = config.temperature
        self.register_buffer("freq_index", table.freq_index)
        self.register_buffer("distinct_counts", table.counts)
        self.register_buffer("features", table.features)
        self.register_buffer("alpha", table.alpha)
        self.register_buffer("rows_per_freq", table.rows_per_freq)
        # mu, the memory budget's price on kept length (core/budget.py); 0 = the paper's layer.
        self.register_buffer("price", torch.zeros((), dtype=table.features.dtype))

        z = table.features.shape[1]
        price_head = config.head.startswith("price")
        self.h_aml = branch(z, config.hidden_dims, embedding_dim, price_head)
        self.l_aml = (
            branch(z, config.hidden_dims, embedding_dim, price_head) if config.twins else None
        )
        ramp = config.init_margin * torch.log1p(torch.arange(embedding_dim, dtype=torch.float64))
        ramp = (ramp / max(math.log(embedding_dim), 1e-12)).float()
        warm_start_(self.h_aml, ramp, config.frequency_prior)
        if self.l_aml is not None:
            warm_start_(self.l_aml, ramp, config.frequency_prior)
        # The frequency prior of the price head: B * (1 - 2 * percentile), in (-B, B), where
        # B = D * (last step of the ramp) is the largest row price at which the full length
        # still wins at price 0 (the ramp is concave, so its last step is its smallest). With
        # |slope| < 1 every row starts at full length: the warm start stays exact.
        last_step = float(ramp[-1] - ramp[-2]) if embedding_dim > 1 else 0.0
        # m_i of AMTLConfig.price_rule / price_scale, (U, 1): row i's price on length, learned
        # (the price head's rho_i) and the budget's (mu) alike, is multiplied by m_i.
        scale = price_factors(table, config.price_rule, config.price_scale)
        # The prior is divided by m_i so that m_i * slope * prior_i stays under B: the warm
        # start holds for any price rule and scale.
        prior = embedding_dim * last_step * (1 - 2 * table.percentile.double()) / scale
        self.register_buffer("prior", prior.to(table.features.dtype).unsqueeze(1), persistent=False)
        self.register_buffer(
            "price_scale", scale.to(table.features.dtype).unsqueeze(1), persistent=False
        )

    @property
    def temperature(self) -> float:
        """T of the tempered softmax (Eq. 7), > 0; set it to anneal during training."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"AMTL `temperature` must be a finite number > 0, got {value}")
        self._temperature = value

    @property
    def num_frequencies(self) -> int:
        """U, the number of distinct counts of the table."""
        return int(self.rows_per_freq.numel())

    def logits(self, freq_ids: Tensor) -> Tensor:
        """h_L^(AMTL) (Eq. 2, alpha from Eq. 3) for some distinct frequencies.

        Args:
            freq_ids: int64 (U',), indices in [0, U) into the distinct counts.

        Returns:
            float (U', D), the layer's dtype (float32 by default); logit p scores length p + 1.
        """
        h, l_out = self.branch_logits(
            self.features[freq_ids], self.prior[freq_ids], self.price_scale[freq_ids]
        )
        if l_out is None:
            return h
        alpha = self.alpha[freq_ids].unsqueeze(-1)
        return alpha * h + (1 - alpha) * l_out

    def branch_logits(
        self, s: Tensor, prior: Tensor, scale: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """h_L of h-AML and of l-AML (None without ``twins``) for frequency attributes s.

        Args:
            s: float (U', z), rows of ``features``.
            prior: float (U', 1), the same rows of ``prior`` (read by the price head only).

        Returns:
            two float (U', D) tensors (or one and None). With ``head="unit"`` each branch's
            last layer reads its last hidden activation divided by its RMS.
        """
        unit = self.config.head in ("unit", "price")  # phi / RMS(phi)
        h = run_branch(self.h_aml, s, unit, prior, scale)
        return h, (None if self.l_aml is None else run_branch(self.l_aml, s, unit, prior, scale))

    def selection_logits(self, freq_ids: Tensor) -> Tensor:
        """The logits the length is selected from: ``h_p - price * m_i * (p + 1) / D``.

        With no memory budget ``price`` is 0 and these are the logits of Eq. 2. With a budget,
        ``price`` (mu, set by :func:`~amtl_compress.core.budget.apply_budget_`) is the
        Lagrange multiplier of the kept-length constraint (negative when it subsidises length),
        so the argmax of Eq. 5 and the tempered softmax of Eq. 7 trade the network's
        preference against memory. ``m_i`` (``price_scale``, 1 for every row at
        ``AMTLConfig.price_scale=0``) makes rare rows pay more for the same length.

        Args:
            freq_ids: int64 (U',), indices in [0, U).

        Returns:
            float (U', D).
        """
        h = self.logits(freq_ids)
        if not bool(self.price):
            return h
        return h - priced_length(self.price, self.price_scale[freq_ids], h)

    def _frequency_mask(self, freq_ids: Tensor) -> Tensor:
        """Mask (U', D) for distinct frequencies; see :meth:`mask`."""
        h = self.selection_logits(freq_ids)
        if self.training and not self.config.straight_through:
            # AMTL-nSTE: the relaxed selection t_hat (Eq. 7) is used as is.
            return _reverse_cumsum(torch.softmax(h / self.temperature, dim=-1))
        # Eq. 4-6 with t = one_hot(argmax): m_j = 1 for j <= k, built without the D x D matrix M.
        k = h.argmax(dim=-1, keepdim=True)
        hard = (torch.arange(self.embedding_dim, device=h.device) <= k).to(h.dtype)
        if not h.requires_grad:
            return hard
        # Eq. 8, moved behind the linear map of Eq. 6: M^T t_tilde = M^T t + (M^T t_hat - sg(.)).
        # Same gradient, but the forward value is exactly the 0/1 mask (t_hat + (t - t_hat)
        # rounds, and a 1 - ulp mask would change the embeddings).
        soft = _reverse_cumsum(torch.softmax(h / self.temperature, dim=-1))
        return hard + (soft - soft.detach())

    def mask(self, ids: Tensor) -> Tensor:
        """Prefix mask m_i (Eq. 1, 6) that the embeddings of the rows ``ids`` are multiplied by.

        The branch MLPs run only over the distinct frequencies that ``ids`` touch.

        Args:
            ids: int64 (any shape), row ids in [0, N).

        Returns:
            float (*ids.shape, D), the layer's dtype. In eval mode, and in training with
            ``straight_through``, the values are exactly 1.0 for dims ``0..k_i`` and 0.0 after,
            with STE gradients (Eq. 8) when grad is enabled; in training without
            ``straight_through`` (nSTE) they are ``m_j = P(k_i >= j)`` under t_hat (Eq. 7).
        """
        freq_ids, inverse = torch.unique(self.freq_index[ids], return_inverse=True)
        return self._frequency_mask(freq_ids)[inverse]

    @torch.no_grad()
    def _frequency_lengths(self) -> Tensor:
        """int64 (U,): hard length k + 1 of each distinct frequency."""
        freq_ids = torch.arange(self.num_frequencies, device=self.rows_per_freq.device)
        return self.selection_logits(freq_ids).argmax(dim=-1) + 1

    def lengths(self) -> Tensor:
        """int64 (N,): hard length k_i + 1 in [1, D] of every row (Eq. 5)."""
        return self._frequency_lengths()[self.freq_index]

    def expected_ratio(self) -> Tensor:
        """Differentiable memory ratio: mean over the N rows of E[k_i + 1] / D under t_hat (Eq. 7).

        Returns:
            float scalar in (0, 1]; rows are weighted through ``rows_per_freq``.
        """
        freq_ids = torch.arange(self.num_frequencies, device=self.rows_per_freq.device)
        t_hat = torch.softmax(self.selection_logits(freq_ids) / self.temperature, dim=-1)
        length = torch.arange(1, self.embedding_dim + 1, device=t_hat.device, dtype=t_hat.dtype)
        expected_length = t_hat @ length
        weight = self.rows_per_freq.to(t_hat.dtype) / self.num_embeddings
        return (weight * expected_length).sum() / self.embedding_dim

    def realized_ratio(self) -> float:
        """Kept values / (N * D) of the hard masks: sum of :meth:`lengths` / (N * D)."""
        kept = (self.rows_per_freq * self._frequency_lengths()).sum()
        return int(kept) / (self.num_embeddings * self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"num_frequencies={self.num_frequencies}, twins={self.config.twins}, "
            f"price={float(self.price):.4g}, "
            f"straight_through={self.config.straight_through}, temperature={self.temperature}"
        )


def price_factors(table: FrequencyTable, rule: str, gamma: float) -> Tensor:
    """m_i of every distinct count, float64 (U,): the factor on a row's price for length.

    ``"rank"``: ``exp(gamma * (1 - 2 * percentile))``. ``"log_count"``:
    ``(G / log2(2 + q))^gamma`` with G the geometric mean of ``log2(2 + q)`` over the N rows, so
    that on the concave ramp (L ~ 1 / price) kept lengths grow like ``log2(2 + q)^gamma``.
    """
    if rule == "rank":
        return torch.exp(gamma * (1 - 2 * table.percentile))
    log_count = torch.log2(2.0 + table.counts.double())
    weight = table.rows_per_freq.double() / float(table.rows_per_freq.sum())
    geo_mean = torch.exp((weight * torch.log(log_count)).sum())
    return (geo_mean / log_count) ** gamma


def _reverse_cumsum(t: Tensor) -> Tensor:
    """m_j = sum_{p >= j} t_p over the last dim: M^T t of Eq. 6 in O(D)."""
    return t.flip(-1).cumsum(-1).flip(-1)

