"""Quantization for QLoRA: NF4 code book, blockwise 4-bit + double quantization, a frozen 4-bit linear
layer, a fused GPU dequantization kernel, a paged (CPU-offloaded) AdamW, and QLoRA (LoRA on the 4-bit base)."""
from .linear4bit import Linear4bit, base_weight_bytes_per_param, linear_4bit, quantize_model
from .nf4 import (CODES, QuantState, bits_per_param, dequantize_4bit, dequantize_4bit_reference, fp4_code_values,
                  int4_code_values, nf4_code_values, pack_4bit, quantize_4bit, roundtrip_mse, unpack_4bit)
from .paged import PagedAdamW, optimizer_state_bytes
from .qlora import QLoRAConfig, dequantize_and_merge, merge_error, quantize_base

__all__ = ["CODES", "Linear4bit", "PagedAdamW", "QLoRAConfig", "QuantState",
           "base_weight_bytes_per_param", "bits_per_param", "dequantize_4bit", "dequantize_4bit_reference",
           "dequantize_and_merge", "fp4_code_values", "int4_code_values", "linear_4bit", "merge_error",
           "nf4_code_values", "optimizer_state_bytes", "pack_4bit", "quantize_4bit", "quantize_base",
           "quantize_model", "roundtrip_mse", "unpack_4bit"]
