"""Reparameterization methods: the update of a frozen weight is expressed in a cheaper form (low rank, ...)."""
from .lora import LoRAConfig, LoRAEmbedding, LoRALinear, loraplus_param_groups
from .dora import DoRAConfig, DoRALinear, magnitude_direction_change
from .adalora import (AdaLoRAConfig, AdaLoRALinear, RankAllocator, budget_schedule, rank_allocation, sensitivity,
                      smooth_importance, triplet_scores)

__all__ = ["LoRAConfig", "LoRAEmbedding", "LoRALinear", "loraplus_param_groups",
           "DoRAConfig", "DoRALinear", "magnitude_direction_change",
           "AdaLoRAConfig", "AdaLoRALinear", "RankAllocator", "budget_schedule", "rank_allocation", "sensitivity",
           "smooth_importance", "triplet_scores"]
