"""LoRA-SP freezing masks: which entries of each LoRA matrix stay frozen.

LoRA-SP (Wu et al. 2024, arXiv 2403.08822) freezes a random half of LoRA's parameters:

    y = W0 x + (alpha / r) * B (A x),   A: r x d_in,  B: d_out x r
    frozen(A) = M_A,  frozen(B) = M_B,  |M| = round(ratio * numel),  drawn uniformly without replacement

Each mask comes from its own generator, seeded by sha256(run seed, module qualified name, "A"|"B",
draw index). A mask therefore depends on nothing but those four values: not on the order modules
are visited in, the process, or the device. On disk a mask is bit-packed (numpy.packbits order:
row-major, most significant bit first), one uint8 tensor per LoRA matrix.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def mask_seed(seed: int, module_name: str, part: str, draw: int = 0) -> int:
    """A 63-bit generator seed for one LoRA matrix (`part` is "A" or "B")."""
    key = f"lorasp|{seed}|{module_name}|{part}|{draw}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def frozen_count(numel: int, ratio: float) -> int:
    # Python's round() rounds half to even; numel * ratio is exact for ratio 0.5 and even numel.
    return int(round(ratio * numel))


def draw_frozen_mask(shape: torch.Size | tuple, ratio: float, seed: int, module_name: str, part: str, draw: int = 0) -> torch.Tensor:
    """A bool tensor of `shape` with exactly round(ratio * numel) True (frozen) entries."""
    numel = int(np.prod(shape))
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, module_name, part, draw))
    frozen = torch.zeros(numel, dtype=torch.bool)
    frozen[torch.randperm(numel, generator=generator)[: frozen_count(numel, ratio)]] = True
    return frozen.view(*shape)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 entries a byte)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


def unpack(packed: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).view(*shape)
