"""The reference DLRM and model specs (how to rebuild a model from a checkpoint)."""

from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import build_model, model_spec_for

__all__ = ["DLRM", "DLRMConfig", "build_model", "model_spec_for"]
