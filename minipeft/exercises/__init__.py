"""Property checks for the exercises at the end of each chapter. Each prints PASS/FAIL with a hint.

    from minipeft.exercises import check_lora_linear
    check_lora_linear(MyLoRALinear)
"""
from ._runner import run_checks
from .lora import check_lora_grads, check_lora_init, check_lora_linear

__all__ = ["run_checks", "check_lora_linear", "check_lora_grads", "check_lora_init"]
from .bitfit import check_biases_only, check_count_biases, check_key_bias_shift  # noqa: E402

__all__ += ["check_count_biases", "check_biases_only", "check_key_bias_shift"]
from .adapters import check_adapter_count, check_bottleneck_adapter  # noqa: E402
from .prompt_tuning import check_nearest_tokens, check_prepend_prompt, check_text_init  # noqa: E402

__all__ += ["check_bottleneck_adapter", "check_adapter_count", "check_prepend_prompt", "check_text_init",
            "check_nearest_tokens"]
