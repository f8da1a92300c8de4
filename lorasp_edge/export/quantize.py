"""Weight-only block quantization for onnxruntime's MatMulNBits: which linear layers get how many bits,
and their weights as the operator's packed blocks.

    W (out, in) fp32 --block of `block_size` along in--> q = round(W / scale) + zero_point, 4 or 8 bits
        B (out, blocks, block * bits / 8) uint8, scales (out, blocks) fp32, zero_points (out, ceil(blocks * bits / 8)) uint8

Asymmetric blocks (a zero point per block), packed by onnxruntime's own quantizer
(`DefaultWeightOnlyQuantizer.qbits_block_quant`), the layout MatMulNBits and GatherBlockQuantized read
(onnxruntime docs/ContribOperators.md).
"""

from __future__ import annotations

import numpy as np
import torch

# Kept at 8 bits in a 4-bit model, with the lm_head: llama.cpp's Q4_K_M mix keeps attention.wv and
# feed_forward.w2 at higher precision (ggerganov/llama.cpp PR #1684, "k-quants"); up_proj is added
# because a trained adapter merged into SmolLM2-135M left v/down alone at +17.4% held-out perplexity,
# and with up_proj at +8.8% for +12% size (docs/export.md).
INT4_KEEP_8BIT = ("v_proj", "down_proj", "up_proj")
HEAD_BITS = 8  # the lm_head (and a tied embedding table) in every quantized model
# MatMulNBits' accuracy_level 4 quantizes the activations to int8 per block and multiplies with
# integer dot products (VNNI/AMX where the CPU has them); 0 dequantizes the weights to fp32 first.
DEFAULT_ACCURACY_LEVEL = 4
DEFAULT_BLOCK_SIZE = 32


def check_arguments(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, not {block_size}")


def linear_bits(name: str, bits: int | None, keep_8bit: tuple[str, ...] = INT4_KEEP_8BIT) -> int | None:
    """Bits of the linear layer `name` (PEFT short name) in a model quantized to `bits` (None: fp32)."""
    if bits is None:
        return None
    return 8 if bits == 8 or name in keep_8bit else 4


def quantize_linear(weight: torch.Tensor, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An nn.Linear weight (out, in) as MatMulNBits' B, scales and zero points."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    check_arguments(bits, block_size)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    return DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight.float().t().contiguous().numpy())


def quantized_bytes(rows: int, cols: int, bits: int, block_size: int) -> int:
    """Bytes of `quantize_linear`'s arrays for a (rows = out, cols = in) weight."""
    blocks = (cols + block_size - 1) // block_size
    per_byte = 8 // bits
    return rows * blocks * (block_size // per_byte) + 4 * rows * blocks + rows * ((blocks + per_byte - 1) // per_byte)
