"""FP8 quantization of checkpoints (and the way back), streamed tensor by tensor from disk to disk."""

from moeify.quant.dequantize import dequantize_checkpoint
from moeify.quant.quantize import QuantizeResult, quantize_fp8

__all__ = ["QuantizeResult", "dequantize_checkpoint", "quantize_fp8"]
