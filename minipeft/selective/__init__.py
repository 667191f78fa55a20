"""Selective methods: train a chosen subset of the base model's own parameters (as sparse deltas; RoCoFT:
whole rows or columns as (k, d_in) slices). FISH, PaFi, ID3 and the random baseline choose entries by a
score (masks.py); BitFit takes every bias."""
from .bitfit import BitFitConfig, bias_changes, count_bias_parameters
from .sparse import (SelectiveConfig, SparseConfig, SparseDeltaLayer, delta_summary, plan_selection,
                     selected_entries)
from .masks import RandomMaskConfig, ScoredSelectionConfig, eligible_parameters, top_k
from .fish import FISHConfig, fisher_scores
from .pafi import PaFiConfig
from .id3 import ID3Config, ID3Grower, ID3Layer, id3_budget_used
from .rocoft import RoCoFTConfig, RoCoFTLinear, weight_change

__all__ = ["BitFitConfig", "bias_changes", "count_bias_parameters", "SelectiveConfig", "SparseConfig",
           "SparseDeltaLayer", "delta_summary", "plan_selection", "selected_entries", "RandomMaskConfig", "ScoredSelectionConfig",
           "eligible_parameters", "top_k", "FISHConfig", "fisher_scores", "PaFiConfig", "ID3Config", "ID3Grower",
           "ID3Layer", "id3_budget_used", "RoCoFTConfig", "RoCoFTLinear", "weight_change"]
