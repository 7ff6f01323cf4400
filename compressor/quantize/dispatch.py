"""One entry point for every quantizer: `quantize_with(W, spec, H, method)` picks GPTQ, RTN on importance-searched
scales (imatrix) or plain RTN; pass 1's candidates (measure.py) and pass 2 (apply_plan.py) both call it.

  gptq     GPTQ with H, each expert's (or linear's) input Hessian: rounding errors fed back into later columns
  imatrix  round-to-nearest, each group's (or ggml block's) scales searched for the least rounding error weighted
           by H's diagonal, the calibration inputs' mean square per column: llama.cpp's importance matrix. A fraction
           of GPTQ's time (no column sweep, no Cholesky) for part of its gain
  rtn      round-to-nearest on min-max grids (ggml types: their weights' own searched scales); needs no data
Without H (an expert too few tokens reached, a data-free pass) every method is RTN. Ternary keeps absmean scales."""
import torch

from .formats import QuantSpec
from .gptq import DEFAULT_DAMP, gptq_quantize
from .qweight import QuantizedWeight
from .rtn import quantize_rtn

METHODS = ("gptq", "imatrix", "rtn")
DATA_METHODS = ("gptq", "imatrix")  # the methods that use calibration inputs (Hessians)
NO_HESSIAN_FORMATS = ("keep", "drop")  # formats no method quantizes with a Hessian (fp16 cast, zeros)


def quantize_with(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, method: str = "gptq",
                  **gptq_kw) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """W [..., out, in] (H [..., in, in] or None) -> (QuantizedWeight, GPTQ's damp_used [...] or None).
    gptq_kw (damp, block_size, act_order) go to gptq_quantize; imatrix uses damp as its floor (column_importance)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "rtn" or H is None or spec.format in NO_HESSIAN_FORMATS:
        return quantize_rtn(W, spec), None
    H = H.to(W.device)
    if method == "imatrix":
        return quantize_rtn(W, spec, importance=column_importance(H, gptq_kw.get("damp", DEFAULT_DAMP))), None
    res = gptq_quantize(W, H, spec, **gptq_kw)
    return res.qweight, res.damp_used


def column_importance(H: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H [..., in, in] -> [..., in]: the diagonal of GPTQ's damped Hessian, diag(H) + damp * mean(diag H), the
    weight of each column's squared rounding error. The floor keeps columns no calibration input reached (a dead
    neuron feeding `down`) in the fit: with no weight at all, a block of them would get any scale. A Hessian with
    nothing in it (no token reached the expert) gives uniform importance: the weights' own error."""
    d = H.diagonal(dim1=-2, dim2=-1).float().clamp(min=0)
    mean = d.mean(-1, keepdim=True)
    return torch.where(mean > 0, d + damp * mean, torch.ones_like(d))


def quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, method: str = "gptq",
             **gptq_kw) -> QuantizedWeight:
    """W [..., out, in] -> QuantizedWeight (quantize_with's first result). Options the method does not use are
    refused: they would silently do nothing (imatrix uses only damp, rtn none)."""
    unused = set(gptq_kw) - {"gptq": set(gptq_kw), "imatrix": {"damp"}}.get(method, set())
    if unused:
        raise ValueError(f"options {sorted(unused)} given but {method!r} does not use them")
    return quantize_with(W, spec, H, method, **gptq_kw)[0]
