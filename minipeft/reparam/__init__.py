"""Reparameterization methods: the update of a frozen weight is expressed in a cheaper form (low rank, ...)."""
from .lora import LoRAConfig, LoRAEmbedding, LoRALinear, loraplus_param_groups
from .dora import DoRAConfig, DoRALinear, magnitude_direction_change
from .adalora import (AdaLoRAConfig, AdaLoRALinear, RankAllocator, budget_schedule, rank_allocation, sensitivity,
                      smooth_importance, triplet_scores)
from .lora_fa import FrozenProjection, LoRAFAConfig, LoRAFALinear, saved_activation_bytes
from .vera import VeRAConfig, VeRALinear, VeRAShared
from .melora import MELoRAConfig, MELoRALinear
from .moslora import MoSLoRAConfig, MoSLoRALinear
from .monteclora import MonteCLoRAConfig, MonteCLoRALinear
from .propulsion import PropulsionConfig, PropulsionLayer, propulsion_scales

__all__ = ["LoRAConfig", "LoRAEmbedding", "LoRALinear", "loraplus_param_groups",
           "DoRAConfig", "DoRALinear", "magnitude_direction_change",
           "AdaLoRAConfig", "AdaLoRALinear", "RankAllocator", "budget_schedule", "rank_allocation", "sensitivity",
           "smooth_importance", "triplet_scores",
           "LoRAFAConfig", "LoRAFALinear", "FrozenProjection", "saved_activation_bytes",
           "VeRAConfig", "VeRALinear", "VeRAShared", "MELoRAConfig", "MELoRALinear", "MoSLoRAConfig", "MoSLoRALinear",
           "MonteCLoRAConfig", "MonteCLoRALinear", "PropulsionConfig", "PropulsionLayer", "propulsion_scales"]
