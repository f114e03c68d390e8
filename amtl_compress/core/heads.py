"""The branch networks of an AMTL layer (paper Sec. 2.2.2) and their last layers ("heads").

A branch (h-AML or l-AML) is an MLP over the frequency attributes s_i. Its last layer is either
the paper's linear map to D logits (``head="plain"``, ``"unit"``) or a :class:`PriceHead`: the
logits shared by all rows minus one price per row on kept length (``head="price"``,
``"price_plain"``; docs/amtl.md, "Allocation follows frequency"). :func:`warm_start_` sets the
last layer so every row starts at full length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def length_grid(embedding_dim: int, like: Tensor) -> Tensor:
    """(D,) kept fraction of choice p: (p + 1) / D, the dtype and device of ``like``."""
    grid = torch.arange(1, embedding_dim + 1, device=like.device, dtype=like.dtype)
    return grid / embedding_dim


def priced_length(price: Tensor | float, scale: Tensor, like: Tensor) -> Tensor:
    """(U', D) price of each length choice: ``price * m_i * (p + 1) / D``.

    The one expression the layer selects with and the budget solves with
    (:func:`~amtl_compress.core.budget.realized_ratio_at`), so both round alike.

    Args:
        price: mu, a scalar (0-d tensor or float) in ``like``'s dtype.
        scale: float (U', 1), m_i of the rows.
        like: float (U', D), for D, dtype and device.
    """
    return price * scale * length_grid(like.shape[-1], like)


def branch(
    in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, price_head: bool = False
) -> nn.Sequential:
    """One AML: h_l = ReLU(W_l^T h_{l-1} + b_l), last layer linear (Sec. 2.2.2)."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(PriceHead(in_dim, out_dim) if price_head else nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class PriceHead(nn.Module):
    """Last layer ``h_L = b - rho * (1..D) / D``: shared logits minus a row price on length.

    ``rho = w^T phi + c + slope * prior`` is one number per row; ``b`` (D,) is shared by all
    rows, so every row's logits have the same shape and its price alone moves its argmax (to
    shorter lengths as it grows, whatever ``b`` is). Parameters: ``weight`` w (1, in) and
    ``bias`` b (D,) (nn.Linear's names, so the warm start and the tests treat both heads
    alike), ``offset`` c (1,), ``slope`` (1,).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, in_dim))
        self.offset = nn.Parameter(torch.zeros(1))
        # rho's direct path from the frequency prior (AMTL.prior, one number per row).
        self.slope = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def row_price(self, phi: Tensor, prior: Tensor) -> Tensor:
        """float (U', 1): rho of each row from phi (U', in) and the prior (U', 1)."""
        return phi @ self.weight.T + self.slope * prior + self.offset

    def forward(self, phi: Tensor, prior: Tensor, scale: Tensor | None = None) -> Tensor:
        rho = self.row_price(phi, prior)
        if scale is not None:
            rho = rho * scale
        return self.bias - rho * length_grid(self.bias.numel(), phi)


def _unit_rms(x: Tensor) -> Tensor:
    """x / RMS(x) over the last dim (float (..., w)); an all-zero row stays 0 (no NaN)."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True).clamp_min(_RMS_FLOOR))


#: Floor of the mean square in :func:`_unit_rms`: only an all-zero (dead ReLU) row is near it.
_RMS_FLOOR = 1e-12


def run_branch(
    branch: nn.Sequential, s: Tensor, unit: bool, prior: Tensor, scale: Tensor | None = None
) -> Tensor:
    """h_L of one AML for inputs s (U', z); with ``unit`` the last layer reads phi / RMS(phi);
    a price head's row price is multiplied by ``scale`` (U', 1) when given."""
    phi = branch[:-1](s)
    if unit:
        phi = _unit_rms(phi)
    last = branch[-1]
    if isinstance(last, PriceHead):
        return last(phi, prior, scale)
    return last(phi)


def warm_start_(branch: nn.Sequential, ramp: Tensor, slope: float = 0.0) -> None:
    """Zero the last layer's weights and set its bias to ``ramp`` so every input gives ``ramp``."""
    last = branch[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(ramp)
        if isinstance(last, PriceHead):
            last.offset.zero_()
            last.slope.fill_(slope)
