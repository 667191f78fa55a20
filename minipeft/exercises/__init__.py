"""Property checks for the exercises at the end of each chapter. Each prints PASS/FAIL with a hint.

    from minipeft.exercises import check_lora_linear
    check_lora_linear(MyLoRALinear)
"""
from ._runner import run_checks
from .adalora import check_budget_schedule, check_sensitivity, check_triplet_scores
from .adapters import check_adapter_count, check_bottleneck_adapter
from .bitfit import check_biases_only, check_count_biases, check_key_bias_shift
from .dora import check_dora_linear, check_dora_magnitude_grad, check_weight_norm
from .ia3 import check_ia3_layer, check_ia3_merge
from .lora import check_lora_grads, check_lora_init, check_lora_linear
from .lora_fa_vera import check_lora_fa_grad, check_vera_delta, check_vera_linear
from .melora_moslora import check_melora_branch, check_melora_delta, check_moslora_linear
from .monteclora import check_bartlett_wishart, check_dirichlet_kl, check_monteclora_layer
from .prompt_tuning import check_nearest_tokens, check_prepend_prompt, check_text_init
from .prediction_heads import check_mi_estimate, check_pooling, check_regression_head
from .prefix_tuning import check_prefix_attention, check_prefix_lambda
from .qlora import check_blockwise_absmax, check_nf4_codes, check_pack_4bit
from .rocoft_propulsion import check_propulsion_grad, check_propulsion_merge, check_rocoft_linear
from .scaling_out import check_loss_weights, check_mixed_lora, check_per_rank_bytes
from .selective import check_diagonal_fisher, check_top_k_mask, check_id3_step

__all__ = ["run_checks",
           "check_lora_linear", "check_lora_grads", "check_lora_init",                    # LoRA
           "check_weight_norm", "check_dora_linear", "check_dora_magnitude_grad",      # DoRA
           "check_nf4_codes", "check_blockwise_absmax", "check_pack_4bit",                # QLoRA
           "check_sensitivity", "check_budget_schedule", "check_triplet_scores",          # AdaLoRA
           "check_bottleneck_adapter", "check_adapter_count",                             # adapters
           "check_ia3_layer", "check_ia3_merge",                                          # (IA)³
           "check_prepend_prompt", "check_text_init", "check_nearest_tokens",             # prompt tuning
           "check_prefix_attention", "check_prefix_lambda",                               # prefix tuning
           "check_count_biases", "check_biases_only", "check_key_bias_shift",             # BitFit
           "check_lora_fa_grad", "check_vera_delta", "check_vera_linear",                 # LoRA-FA, VeRA
           "check_melora_delta", "check_melora_branch", "check_moslora_linear",           # MELoRA, MoSLoRA
           "check_bartlett_wishart", "check_dirichlet_kl", "check_monteclora_layer",      # MonteCLoRA
           "check_rocoft_linear", "check_propulsion_merge", "check_propulsion_grad",      # RoCoFT, Propulsion
           "check_diagonal_fisher", "check_top_k_mask", "check_id3_step",                 # FISH, PaFi, ID3
           "check_pooling", "check_regression_head", "check_mi_estimate",                 # prediction heads
           "check_loss_weights", "check_mixed_lora", "check_per_rank_bytes"]              # scaling out
