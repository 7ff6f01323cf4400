"""One entry point: quantize(W, spec, H) picks GPTQ or RTN."""
import torch

from .formats import QuantSpec
from .gptq import gptq_quantize
from .qweight import QuantizedWeight
from .rtn import quantize_rtn

METHODS = ("gptq", "rtn")


def quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, method: str = "gptq",
             **gptq_kw) -> QuantizedWeight:
    """W [..., out, in] -> QuantizedWeight. GPTQ when method == "gptq" and H is given (W [E, out, in]
    or [out, in]); RTN (absmean for ternary) otherwise. gptq_kw go to gptq_quantize unchanged."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "rtn" or H is None:
        if gptq_kw:
            raise ValueError(f"GPTQ options {sorted(gptq_kw)} given but RTN was selected")
        return quantize_rtn(W, spec)
    return gptq_quantize(W, H, spec, **gptq_kw).qweight
