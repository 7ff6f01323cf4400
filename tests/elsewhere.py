"""A compute device that is not the CPU, on a machine that has only a CPU (tests only).

PyTorch's PrivateUse1 backend slot, renamed "elsewhere" and backed in Python: an `Elsewhere` tensor reports device
elsewhere:0 and holds a host tensor; every aten op on it runs on the host tensors and wraps its results again, and an
op that mixes it with a host tensor of one or more dimensions fails as it would on a GPU ("Expected all tensors to be
on the same device"), as does .numpy(). Code that allocates on a hard-coded device, or forgets to move a tensor, fails
here as it would on CUDA. Importing this module registers the device (once per process).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

NAME = "elsewhere"
_setup_privateuseone_for_python_backend(NAME)
DEVICE = torch.device(NAME, 0)
HOST = torch.device("cpu")
aten = torch.ops.aten
TRANSFERS = (aten._to_copy.default, aten.copy_.default, aten._copy_from.default)


def _unwrap(a):
    return a.inner if isinstance(a, Elsewhere) else a


def _host_kwargs(kwargs: dict) -> dict:
    kw = dict(tree_map(_unwrap, kwargs))
    if "device" in kw:
        kw["device"] = HOST
    return kw


class Elsewhere(torch.Tensor):
    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=DEVICE, requires_grad=inner.requires_grad)
        t.inner = inner
        return t

    def __repr__(self):
        return f"Elsewhere({self.inner!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:  # as on a GPU: read through to the host
            return args[0].inner.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):  # list indices: built on the host, moved
            fix = lambda i: torch.tensor(i).to(DEVICE) if isinstance(i, list) else i
            index = args[1]
            args = (args[0], tuple(map(fix, index)) if isinstance(index, tuple) else fix(index), *args[2:])
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and not isinstance(a, Elsewhere)
                and a.dim() > 0]
        if host and func not in TRANSFERS:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! ({func})")
        inner = tree_map(_unwrap, args)
        if func is aten.histc.default and not inner[0].is_floating_point():  # CUDA has an integer histc, the CPU not
            out = func(inner[0].float(), *inner[1:], **_host_kwargs(kwargs)).to(inner[0].dtype)
        else:
            out = func(*inner, **_host_kwargs(kwargs))
        if func is aten._to_copy.default and kwargs.get("device") is not None and torch.device(kwargs["device"]) == HOST:
            return out
        if func is aten.copy_.default or (func._schema.is_mutable and func.__name__.endswith("_")
                                          and isinstance(args[0], Elsewhere)):
            return args[0]  # in place: the host tensor inside args[0] changed
        return tree_map(lambda o: Elsewhere(o) if isinstance(o, torch.Tensor) else o, out)


def _fallback(op, *args, **kwargs):
    """Ops dispatched to the device with no Elsewhere argument: factories (device=elsewhere), copies from the host."""
    out = op(*tree_map(_unwrap, args), **_host_kwargs(kwargs))
    return tree_map(lambda o: o if isinstance(o, Elsewhere) or not isinstance(o, torch.Tensor) else Elsewhere(o), out)


_LIBRARY = torch.library.Library("_", "IMPL")
_LIBRARY.fallback(_fallback, "PrivateUse1")


class elsewhere_factories(TorchFunctionMode):
    """torch.tensor(data, device=elsewhere) is built on the host and moved (its direct path asserts in the
    dispatcher for a Python backend). Enter it around code that runs on DEVICE."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type == NAME:
            return func(*args, **{**kwargs, "device": HOST}).to(DEVICE)
        return func(*args, **kwargs)
