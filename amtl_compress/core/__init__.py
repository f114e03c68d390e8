"""The paper's math: frequency attributes, the AMTL layer (Eq. 1-8) and the memory budget."""

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.budget import apply_budget_, solve_price
from amtl_compress.core.frequency import FrequencyTable, frequency_features

__all__ = [
    "AMTL",
    "AMTLConfig",
    "FrequencyTable",
    "apply_budget_",
    "frequency_features",
    "solve_price",
]
