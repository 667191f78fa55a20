"""Selective methods: train a chosen subset of the base model's own parameters (as sparse deltas; RoCoFT:
whole rows or columns as (k, d_in) slices)."""
from .bitfit import BitFitConfig, bias_changes, count_bias_parameters
from .sparse import SelectiveConfig, SparseConfig, SparseDeltaLayer, delta_summary, plan_selection
from .rocoft import RoCoFTConfig, RoCoFTLinear, weight_change

__all__ = ["BitFitConfig", "bias_changes", "count_bias_parameters", "SelectiveConfig", "SparseConfig",
           "SparseDeltaLayer", "delta_summary", "plan_selection", "RoCoFTConfig", "RoCoFTLinear", "weight_change"]
