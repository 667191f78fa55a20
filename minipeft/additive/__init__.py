"""Additive methods: new trainable modules or inputs next to the frozen model (adapters, soft prompts)."""
from .adapter import AdapterConfig, BottleneckAdapter, adapter_macs_per_token
from .prompt_tuning import PromptTuningConfig, SoftPrompt, nearest_tokens

__all__ = ["AdapterConfig", "BottleneckAdapter", "adapter_macs_per_token", "PromptTuningConfig", "SoftPrompt",
           "nearest_tokens"]
