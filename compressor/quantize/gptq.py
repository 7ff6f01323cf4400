"""GPTQ (Frantar et al. 2022), batched over experts, following IST-DASLab's `fasterquant`.

The Hessian H = sum x x^T of a matrix's inputs is accumulated elsewhere (the `add_batch` half,
calibration/); this file is the pure `fasterquant` half, on 3D tensors [E, ...]:
  dead inputs (diag(H) == 0) -> diag 1, weight column zeroed
  damping damp * mean(diag H), x10 per try per expert until both Choleskys succeed
  U = upper Cholesky factor of H^-1; column sweep with lazy block updates
  group params computed when the sweep reaches each group (standard), or all up front on the
  original column order ("static groups") with act_order and for ternary, so no g_idx is stored;
  ggml types (quantize/ggml.py) the same way with their blocks: a block's super-block and sub-block
  scales are fitted when the sweep reaches it and fixed, so the codes GPTQ chose are what is written.
Everything runs in float32.
"""
from dataclasses import dataclass
import warnings

import torch

from . import ggml
from .formats import QuantSpec, group_size_for
from .grid import dequantize_codes, expand_groups, group_params, quantize_codes
from .qweight import QuantizedWeight
from .rtn import check_finite, quantize_rtn


@dataclass
class GPTQResult:
    qweight: QuantizedWeight  # same leading shape as the W given ([out, in] or [E, out, in])
    damp_used: torch.Tensor   # [E] relative damping that made the Cholesky succeed; inf: gave up, RTN
    error: torch.Tensor       # [E] hessian_error(W, qweight.dequantize(), H)


def _as3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W - Wq) H (W - Wq)^T) per expert, the GPTQ objective. 2D inputs count as E = 1. -> [E]"""
    D = _as3d(W).float() - _as3d(Wq).float()       # [E, out, in]
    return ((D @ _as3d(H).float()) * D).sum((-2, -1))  # [E]


DEFAULT_DAMP = 0.01  # relative damping, a fraction of the mean Hessian diagonal (the recipe's quantization.damp)
DAMP_RESTART = 1e-5  # damp = 0 that fails continues with 1e-4, 1e-3, ...


def damp_schedule(damp: float, tries: int) -> list[float]:
    """Relative dampings to try: damp, 10 damp, 100 damp, ... (damp = 0: then 10 DAMP_RESTART, ...)."""
    if damp < 0 or tries < 1:
        raise ValueError(f"need damp >= 0 and max_damp_tries >= 1, got {damp}, {tries}")
    return [damp] + [(damp or DAMP_RESTART) * 10.0 ** t for t in range(1, tries)]


def inverse_cholesky(H: torch.Tensor, damp: float, tries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H [E, n, n] -> U [E, n, n] upper Cholesky factor of (H + d mean(diag H) I)^-1, damp_used [E].
    Each expert keeps the first d of the schedule that works; if none does it gets U = I (which
    makes GPTQ exactly RTN) and damp_used = inf, with a warning."""
    E, n, _ = H.shape
    base = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1)  # [E]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    U, damp_used = eye.repeat(E, 1, 1), torch.full((E,), float("inf"), dtype=torch.float64, device=H.device)
    todo = torch.arange(E, device=H.device)
    for d in damp_schedule(damp, tries):
        Hd = H[todo] + (d * base[todo])[:, None, None] * eye   # [e, n, n]
        L, info = torch.linalg.cholesky_ex(Hd)
        Ut, info_u = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        ok = (info == 0) & (info_u == 0) & torch.isfinite(Ut).flatten(1).all(1)
        U[todo[ok]], damp_used[todo[ok]] = Ut[ok], d
        todo = todo[~ok]
        if len(todo) == 0:
            break
    if len(todo):
        warnings.warn(f"GPTQ: Cholesky failed for experts {todo.tolist()} up to damp "
                      f"{damp_schedule(damp, tries)[-1]:g}; they fall back to RTN (damp_used = inf)")
    return U, damp_used


class IntGrid:
    """The int formats' and ternary's grid for the sweep: params (s, z) per (row, group) of `group` columns."""

    def __init__(self, spec: QuantSpec, n: int):
        self.spec, self.span = spec, group_size_for(spec, n)

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None):
        """W [E, out, cols] (whole groups) -> per-column s, z [E, out, cols] and the groups' (S, Z) [E, out, G].
        Min-max groups (`importance` is not used)."""
        S, Z = group_params(W, self.spec)
        cols = W.shape[-1]
        return expand_groups(S, self.span, cols), expand_groups(Z, self.span, cols), (S, Z)

    def quantize(self, w, s, z):
        return quantize_codes(w, s, z, self.spec)

    def dequantize(self, q, s, z):
        return dequantize_codes(q, s, z)

    def result(self, codes: torch.Tensor, pieces) -> QuantizedWeight:
        S, Z = (torch.cat(p, dim=-1) for p in zip(*pieces))
        codes = codes.to(torch.int8 if self.spec.format == "ternary" else torch.uint8)
        return QuantizedWeight(self.spec, codes, S.half(), Z.half() if self.spec.has_zeros else None)


class GGMLGrid:
    """A ggml type's grid for the sweep (quantize/ggml.py): each block's header (super-block and sub-block scales)
    is fitted when the sweep reaches the block, on the weights as GPTQ has updated them, then fixed."""

    def __init__(self, spec: QuantSpec, n: int):
        self.spec, self.t = spec, spec.ggml
        self.t.row_bytes(n)  # rows must be whole blocks
        self.span = self.t.block

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None):
        """`importance` [E, 1, cols]: each column's weight in the blocks' scale search (ggml.fit_matrix)."""
        header = ggml.fit_matrix(self.t, W, importance)
        a, b = ggml.per_column(self.t, header)
        return a, torch.zeros_like(a) if b is None else b, header

    def quantize(self, w, a, b):
        return ggml.quantize_codes(self.t, w, a, b)

    def dequantize(self, q, a, b):
        return ggml.dequantize_codes(q, a, b)

    def result(self, codes: torch.Tensor, pieces) -> QuantizedWeight:
        header = {k: torch.cat([p[k] for p in pieces], dim=2) for k in pieces[0]}  # blocks: dim 2 of [E, out, nb, ...]
        return QuantizedWeight(self.spec, codes.to(torch.int8), header=header)


def _sweep(W, U, grid, params, block_size):
    """The GPTQ column sweep. W [E, out, n] (modified in place), U [E, n, n] upper. `params`: per-column params
    (P1, P2) [E, out, n] fixed up front in sweep order (static groups), or None: the grid fits them as the sweep
    reaches each of its spans (groups, ggml blocks), weighting each column's rounding error as the sweep does,
    by 1 / U_cc^2 (the loss of rounding column c is ((w - q) / U_cc)^2). -> float codes Q [E, out, n], the fitted
    pieces"""
    E, out, n = W.shape
    static = params is not None
    pieces = []
    if static:
        P1, P2 = params
    else:       # blocks hold whole spans, so a span's columns are up to date when it starts
        P1, P2 = W.new_zeros(E, out, n), W.new_zeros(E, out, n)
        block_size = max(1, block_size // grid.span) * grid.span
        importance = U.diagonal(dim1=-2, dim2=-1).pow(-2)[:, None, :]  # [E, 1, n]
    Q = torch.zeros_like(W)                                   # [E, out, n] float codes
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]   # [E, out, b], [E, b, b]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % grid.span == 0:
                p1, p2, piece = grid.fit(W1[:, :, i:i + grid.span], importance[:, :, c:c + grid.span])
                P1[:, :, c:c + p1.shape[-1]], P2[:, :, c:c + p1.shape[-1]] = p1, p2
                pieces.append(piece)
            p1, p2 = P1[:, :, c], P2[:, :, c]                 # [E, out]
            w = W1[:, :, i]                                   # [E, out]
            q = grid.quantize(w, p1, p2)
            Q[:, :, c] = q
            err = (w - grid.dequantize(q, p1, p2)) / U1[:, i, i][:, None]  # [E, out]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]         # [E, out, b - i]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]               # lazy update of later blocks
    return Q, pieces


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = DEFAULT_DAMP,
                  block_size: int = 128, act_order: bool = False, max_damp_tries: int = 6) -> GPTQResult:
    """W [E, out, in] or [out, in], H [E, in, in] or [in, in] (a 2D H is shared by all experts).
    int formats, ternary and ggml types use GPTQ; 'keep' returns the fp16 weight and 'drop' zeros (damp 0).
    A block_size that is not a multiple of the group size is rounded to one (non-static groups)."""
    W3, H3 = _as3d(W), _as3d(H)
    if W3.dim() != 3 or H3.dim() != 3:
        raise ValueError(f"W must be [E, out, in] or [out, in] and H [E, in, in] or [in, in]; "
                         f"got {tuple(W.shape)}, {tuple(H.shape)}")
    E, out, n = W3.shape
    H3 = H3.expand(E, n, n) if H3.shape[0] == 1 else H3
    if H3.shape != (E, n, n):
        raise ValueError(f"H shape {tuple(H.shape)} does not match W shape {tuple(W.shape)}")
    check_finite("W", W3)
    check_finite("H", H3)
    if not (spec.is_int or spec.format == "ternary" or spec.ggml is not None):
        qw = quantize_rtn(W, spec)
        return GPTQResult(qw, W3.new_zeros(E, dtype=torch.float64), hessian_error(W, qw.dequantize(), H3))

    Wf, Hf = W3.float().clone(), H3.float().clone()          # [E, out, n], [E, n, n]
    diag = Hf.diagonal(dim1=-2, dim2=-1)                      # [E, n] view
    dead = diag == 0
    diag[dead] = 1.0
    Wf.masked_fill_(dead[:, None, :], 0.0)
    grid = GGMLGrid(spec, n) if spec.ggml is not None else IntGrid(spec, n)
    params = pieces = None
    if act_order or spec.format == "ternary":                 # static: every span fitted on the original order
        p1, p2, piece = grid.fit(Wf, diag[:, None, :])  # the Hessian's diagonal: the columns' input energy
        params, pieces = (p1, p2), [piece]
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, n]
        Wf = Wf.gather(2, perm[:, None, :].expand(E, out, n))
        Hf = Hf.gather(1, perm[:, :, None].expand(E, n, n)).gather(2, perm[:, None, :].expand(E, n, n))
        params = tuple(p.gather(2, perm[:, None, :].expand(E, out, n)) for p in params)
    U, damp_used = inverse_cholesky(Hf, damp, max_damp_tries)
    Q, fitted = _sweep(Wf, U, grid, params, block_size)
    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(E, out, n))
    qw = grid.result(Q, pieces or fitted)
    if W.dim() == 2:
        qw = qw.select(0)
    return GPTQResult(qw, damp_used, hessian_error(W, qw.dequantize(), H3))
