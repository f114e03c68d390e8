"""The default adapter: ``model(features)``, the model contract of docs/data.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amtl_compress.models.adapters import register_adapter


class FeaturesAdapter:
    """Calls ``model(features)`` with the batch dict itself (docs/data.md, "Your model")."""

    name = "features"

    def forward(self, model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``model(features)``: the model's output for the batch dict (column -> (B,) / (B, L))."""
        return model(features)

    def default_fields(self, model: nn.Module, columns: Sequence[str]) -> dict[str, str]:
        """No default: the user names the tables (``fields``)."""
        return {}


FEATURES = register_adapter(FeaturesAdapter())
