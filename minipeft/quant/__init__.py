"""Quantization for QLoRA: NF4 code book, blockwise 4-bit + double quantization, a frozen 4-bit linear
layer, a fused GPU dequantization kernel, and a paged (CPU-offloaded) AdamW."""
from .linear4bit import Linear4bit, base_weight_bytes_per_param, quantize_model
from .nf4 import (CODES, QuantState, bits_per_param, dequantize_4bit, dequantize_4bit_reference, fp4_code_values,
                  int4_code_values, nf4_code_values, pack_4bit, quantize_4bit, roundtrip_mse, unpack_4bit)
from .paged import PagedAdamW, optimizer_state_bytes

__all__ = ["CODES", "Linear4bit", "PagedAdamW", "QuantState", "base_weight_bytes_per_param", "bits_per_param",
           "dequantize_4bit", "dequantize_4bit_reference", "fp4_code_values", "int4_code_values",
           "nf4_code_values", "optimizer_state_bytes", "pack_4bit", "quantize_4bit", "quantize_model",
           "roundtrip_mse", "unpack_4bit"]
