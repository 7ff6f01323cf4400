"""Where tensors live, decided in this one place.

The model is held on the HOST (CPU memory; a streamed model's layers stay on disk until their turn). The compute
device (recipe `execution.device`: cpu, cuda or auto) receives one decoder layer at a time in fp32, with the
calibration activations, the statistics and GPTQ; Hessians may stay on the HOST (`execution.hessians: cpu`) when
the device is short of memory. What the host needs back (measurements for the LP, packed tensors to write) is moved
to the HOST. Every other module allocates on the device of the tensors it is given, never on a named device.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserError

HOST = torch.device("cpu")


def resolve(name: str) -> torch.device:
    """`cpu`, `cuda` (this process's GPU: LOCAL_RANK under torchrun) or `auto` (cuda when available) -> a device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return HOST
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); install "
                              "the CUDA build of torch for your driver, or pass --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    raise DeviceError(f"unknown device {name!r}: use cpu, cuda or auto")


class DeviceError(UserError, ValueError):
    """A --device this machine's torch cannot use."""


def hessian_device(where: str) -> torch.device | None:
    """recipe `execution.hessians`: "cpu" keeps Hessians on the host; "device": None, with the work."""
    return HOST if where == "cpu" else None


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first tensor that is not on the meta device (HOST when there is none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return HOST


def to_device(value, device: torch.device, memo: dict | None = None):
    """Tensors in `value` (a tensor, or tuples / lists / dicts of them) on `device`; each tensor moved once (decoder
    layers share masks and rotary tables); anything else as it is."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))  # keep value alive so its id is not reused
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        moved = [to_device(v, device, memo) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # a namedtuple, or not
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    return value
