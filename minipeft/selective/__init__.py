"""Selective methods: train a chosen subset of the base model's own parameters (as sparse deltas)."""
from .bitfit import BitFitConfig, bias_changes, count_bias_parameters
from .sparse import SelectiveConfig, SparseConfig, SparseDeltaLayer, delta_summary, plan_selection

__all__ = ["BitFitConfig", "bias_changes", "count_bias_parameters", "SelectiveConfig", "SparseConfig",
           "SparseDeltaLayer", "delta_summary", "plan_selection"]
