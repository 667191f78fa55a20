"""Reparameterization methods: the update of a frozen weight is expressed in a cheaper form (low rank, ...)."""
from .lora import LoRAConfig, LoRAEmbedding, LoRALinear, loraplus_param_groups
from .dora import DoRAConfig, DoRALinear, magnitude_direction_change

__all__ = ["LoRAConfig", "LoRAEmbedding", "LoRALinear", "loraplus_param_groups",
           "DoRAConfig", "DoRALinear", "magnitude_direction_change"]
