"""Round-to-nearest quantization, group-wise, batched over any leading (expert) dims."""
import torch

from ..errors import NonFiniteError
from . import ggml
from .formats import QuantSpec, group_size_for
from .grid import expand_groups, group_params, quantize_codes
from .qweight import QuantizedWeight, dropped


def check_finite(name: str, x: torch.Tensor) -> None:
    """NonFiniteError (a ValueError) naming the tensor when it holds NaN or inf (callers add the layer/expert name)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan = int(torch.isnan(x).sum())
        raise NonFiniteError(f"{name} contains non-finite values: {n_nan} NaN, {int(bad.sum()) - n_nan} inf "
                         f"of {x.numel()} (shape {tuple(x.shape)})")


def codes_from_params(W: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """W [..., out, in] on given group params S, Z [..., out, G] (float32, fp16-exact)."""
    n = W.shape[-1]
    gs = group_size_for(spec, n)
    q = quantize_codes(W.float(), expand_groups(S, gs, n), expand_groups(Z, gs, n), spec)  # [..., out, in]
    dtype = torch.int8 if spec.format == "ternary" else torch.uint8
    zeros = Z.half() if spec.has_zeros else None
    return QuantizedWeight(spec, q.to(dtype), S.half(), zeros)


def quantize_rtn(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """W [..., out, in] -> QuantizedWeight: min-max (asym) / absmax (sym) / absmean (ternary) per
    (row, group); a ggml type's own blocks (quantize/ggml.py); 'keep' casts to fp16, 'drop' gives zeros.
    `importance` [..., in] (W's leading dims, one weight >= 0 per input column: the calibration inputs' mean square,
    llama.cpp's importance matrix): the scales are searched for the least rounding error weighted by it instead
    (grid.searched_params, ggml.fit_matrix); the codes are still each weight's nearest on its grid."""
    if W.dim() < 2:
        raise ValueError(f"W must be [..., out, in], got shape {tuple(W.shape)}")
    check_finite("W", W)
    if importance is not None:
        if importance.shape != W.shape[:-2] + W.shape[-1:]:
            raise ValueError(f"importance must be [..., in] = {tuple(W.shape[:-2] + W.shape[-1:])} for W "
                             f"{tuple(W.shape)}, got {tuple(importance.shape)}")
        check_finite("importance", importance)
        importance = importance.float().clamp(min=0)[..., None, :]
    if spec.format == "drop":
        return dropped(W.shape, spec, W.device)
    if spec.format == "keep":
        if W.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError("W exceeds the fp16 range; 'keep' stores fp16")
        return QuantizedWeight(spec, W.to(torch.float16))
    if spec.ggml is not None:
        header = ggml.fit_matrix(spec.ggml, W, importance)
        return QuantizedWeight(spec, ggml.quantize_matrix(spec.ggml, W, header), header=header)
    S, Z = group_params(W, spec, importance)  # [..., out, G]
    return codes_from_params(W, S, Z, spec)
