"""Table-driven bit packing along the last dim (one independent bitstream per row).

Codes of `bits` bits form an LSB-first bitstream: code i occupies stream bits [bits*i, bits*(i+1)),
byte j holds stream bits [8j, 8j+8). The work is done in blocks of k codes = m bytes
(k * bits == 8 * m); the table below is the only per-width knowledge. The stream is truncated to
ceil(n * bits / 8) bytes (the cut bytes would only hold zero padding).
"""
import math

import torch
import torch.nn.functional as F

BLOCKS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}  # bits -> (codes per block, bytes per block)
TRITS_PER_BYTE = 5                                     # 3^5 = 243 <= 256


def _word(m: int) -> torch.dtype:
    """The integer type that holds a block of m bytes as one word (int5's 5 bytes need 64 bits)."""
    return torch.int32 if m < 4 else torch.int64


def _block(bits: int) -> tuple[int, int]:
    if bits not in BLOCKS:
        raise ValueError(f"bits must be one of {sorted(BLOCKS)}, got {bits}")
    return BLOCKS[bits]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] in [0, 2^bits) -> uint8 [..., ceil(n * bits / 8)]."""
    k, m = _block(bits)
    n = codes.shape[-1]
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes out of range for {bits}-bit packing (max {int(codes.max())})")
    x = F.pad(codes.to(_word(m)), (0, -n % k)).unflatten(-1, (-1, k))       # [..., nb, k]
    word = (x << (bits * _arange(k, x))).sum(-1, keepdim=True, dtype=x.dtype)
    out = (word >> (8 * _arange(m, x))) & 0xFF           # [..., nb, m]
    return out.flatten(-2)[..., : math.ceil(n * bits / 8)].to(torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    k, m = _block(bits)
    nb = math.ceil(n / k)
    x = F.pad(packed.to(_word(m)), (0, nb * m - packed.shape[-1])).unflatten(-1, (nb, m))  # [..., nb, m]
    word = (x << (8 * _arange(m, x))).sum(-1, keepdim=True, dtype=x.dtype)
    out = (word >> (bits * _arange(k, x))) & (2 ** bits - 1)  # [..., nb, k]
    return out.flatten(-2)[..., :n].to(torch.uint8).contiguous()


_POW3 = [3 ** i for i in range(TRITS_PER_BYTE)]


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, dtype=like.dtype, device=like.device)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits [..., n] in {-1, 0, 1} -> uint8 [..., ceil(n / 5)], base-3 digits t + 1, LSB first."""
    n = trits.shape[-1]
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise ValueError("trits must be in {-1, 0, 1}")
    x = F.pad(trits.to(torch.int32) + 1, (0, -n % TRITS_PER_BYTE), value=1)    # [..., 5 * nb]
    x = x.unflatten(-1, (-1, TRITS_PER_BYTE))                                   # [..., nb, 5]
    return (x * x.new_tensor(_POW3)).sum(-1, dtype=torch.int32).to(torch.uint8).contiguous()


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_trits: uint8 [..., ceil(n / 5)] -> int8 [..., n]."""
    x = packed.to(torch.int32).unsqueeze(-1)                                    # [..., nb, 1]
    digits = x // x.new_tensor(_POW3) % 3                    # [..., nb, 5]
    return (digits.flatten(-2)[..., :n] - 1).to(torch.int8).contiguous()
