"""Tensors on the wire: messages (a channel, a batch index and some tensors) packed into one int64 header and one
byte buffer, and back. Pure torch; no pickle anywhere (torch.distributed's object collectives pickle, so they are not
used). Unpacked tensors are fresh allocations, so what a rank computes from a tensor it received is what it would
compute from the sender's own copy."""

from __future__ import annotations

from typing import NamedTuple

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
CODE = {d: i for i, d in enumerate(DTYPES)}


class Message(NamedTuple):
    channel: int  # what the tensors are (the calls of one expert, a block's batch log, ...)
    batch: int  # the global index of the calibration batch they come from (-1: none)
    tensors: list[torch.Tensor]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def pack(messages: list[Message], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (header int64 [h], data uint8 [d]) on `device`."""
    header, chunks = [], []
    for m in messages:
        header += [m.channel, m.batch, len(m.tensors)]
        for t in m.tensors:
            header += [CODE[t.dtype], t.dim(), *t.shape]
            chunks.append(_bytes(t).to(device))
    data = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8, device=device)
    return torch.tensor(header, dtype=torch.int64).to(device), data


def unpack(header: torch.Tensor, data: torch.Tensor) -> list[Message]:
    """Inverse of pack (the tensors on data's device)."""
    h, out, pos, at = header.tolist(), [], 0, 0
    while pos < len(h):
        channel, batch, n = h[pos:pos + 3]
        pos += 3
        tensors = []
        for _ in range(n):
            dtype, ndim = DTYPES[h[pos]], h[pos + 1]
            shape = h[pos + 2:pos + 2 + ndim]
            pos += 2 + ndim
            size = dtype.itemsize * _numel(shape)
            tensors.append(data[at:at + size].clone().view(dtype).reshape(shape))
            at += size
        out.append(Message(channel, batch, tensors))
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
