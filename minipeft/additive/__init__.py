"""Additive methods: new trainable modules, vectors or inputs next to the frozen model (adapters, soft prompts,
prefixes, (IA)³ scaling vectors)."""
from .adapter import AdapterConfig, BottleneckAdapter, adapter_macs_per_token
from .ia3 import IA3Config, IA3Layer, ia3_vectors
from .prompt_tuning import PromptTuningConfig, PrependedPrompt, SoftPrompt, nearest_tokens
from .p_tuning import PTuningConfig, PromptEncoder, p_tuning_parameter_count, to_prompt_tuning
from .prefix_tuning import Prefix, PrefixTuningConfig, prefix_attention_mass

__all__ = ["AdapterConfig", "BottleneckAdapter", "adapter_macs_per_token",
           "PromptTuningConfig", "PrependedPrompt", "SoftPrompt", "nearest_tokens",
           "PTuningConfig", "PromptEncoder", "p_tuning_parameter_count", "to_prompt_tuning",
           "PrefixTuningConfig", "Prefix", "prefix_attention_mass",
           "IA3Config", "IA3Layer", "ia3_vectors"]
