"""Packed integer codes: the storage layout of a coded summary (a flow's `vflow.Codes`), shared by
the reference interpreter, the summary store and both kernel backends.

A coded summary holds, per page and KV head, `r` rows of `c` integer codes in [0, 2**bits - 1]
(`lowbit`: one row per token of the page, one code per key channel). It is stored as uint8
`[..., r, bits * ceil(c / 8)]`: each row is `bits` bit planes of ceil(c / 8) bytes, plane b first
holding bit b of every code; within a plane, byte w holds channels 8w..8w+7, channel 8w+j at bit j
(LSB first, numpy's `packbits(bitorder="little")`). So a code takes exactly `bits` bits when c is a
multiple of 8 (2 bits, page 16, head_dim 128: 512 bytes per page and KV head), the planes of any
width decode alike (no code straddles a byte), and

    code[t, d] = sum_b ((byte[t, b * ceil(c / 8) + d // 8] >> (d % 8)) & 1) << b

is what the kernels compute per channel.
"""

from __future__ import annotations

import torch

CODE_DTYPE = torch.uint8
"""Storage dtype of packed codes."""
MAX_CODE_BITS = 8
"""Widest code (bits per value) a coded summary may declare."""


def packed_width(c: int, bits: int) -> int:
    """Bytes a row of `c` codes of `bits` bits takes: bits * ceil(c / 8)."""
    return bits * -(-c // 8)


def code_bits(width: int, c: int) -> int:
    """The code width (bits) of packed rows of `width` bytes holding `c` codes (inverse of
    `packed_width`; width must be a multiple of ceil(c / 8))."""
    return width // -(-c // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., packed_width(c, bits)] from codes [..., c] (any real dtype on any device): each
    value rounded to the nearest integer (halves to even, as torch.round) and clamped to
    [0, 2**bits - 1], then packed as the module doc says."""
    c = codes.shape[-1]
    w = -(-c // 8)
    x = codes.round().clamp(0, 2 ** bits - 1).to(torch.int32)
    x = torch.nn.functional.pad(x, (0, 8 * w - c)).reshape(*x.shape[:-1], w, 8)
    shifts = torch.arange(8, dtype=torch.int32, device=x.device)
    planes = [(((x >> b) & 1) << shifts).sum(-1) for b in range(bits)]         # each [..., w]
    return torch.cat(planes, -1).to(CODE_DTYPE)


def unpack_codes(packed: torch.Tensor, bits: int, c: int) -> torch.Tensor:
    """int32 [..., c]: the codes of packed rows uint8 [..., packed_width(c, bits)]."""
    w = -(-c // 8)
    x = packed.to(torch.int32).reshape(*packed.shape[:-1], bits, w, 1)
    shifts = torch.arange(8, dtype=torch.int32, device=x.device)
    planes = ((x >> shifts) & 1).reshape(*packed.shape[:-1], bits, 8 * w)[..., :c]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=x.device))[:, None]
    return (planes * weights).sum(-2, dtype=torch.int32)
