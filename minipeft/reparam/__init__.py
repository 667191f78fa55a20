"""Reparameterization methods: the update of a frozen weight is expressed in a cheaper form (low rank, ...)."""
from .lora import LoRAConfig, LoRALinear, loraplus_param_groups

__all__ = ["LoRAConfig", "LoRALinear", "loraplus_param_groups"]
