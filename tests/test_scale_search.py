"""The scale search (quantize/scale_search.py) against the min-max grid, against a brute-force search, with
importance, and through the ggml types that use it (quantize/ggml.py)."""

from contextlib import nullcontext

import pytest
import torch

from compressor.quantize import ggml, scale_search
from compressor.quantize.ggml import GGML_TYPES


def groups(n_groups: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian groups, one weight in four of the groups an outlier (x6): what real weight rows look like."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_groups, n, generator=g)
    outlier = torch.rand(n_groups, generator=g) < 0.25
    x[outlier, 0] *= 6
    return x


def sym_error(x, a, qmin, qmax, w=None):
    w = torch.ones_like(x) if w is None else w
    safe = torch.where(a == 0, 1.0, a)[..., None]
    q = torch.round(x / safe).clamp(qmin, qmax)
    return (w * (x - a[..., None] * q) ** 2).sum(-1)


def affine_error(x, a, b, qmax, w=None):
    w = torch.ones_like(x) if w is None else w
    safe = torch.where(a == 0, 1.0, a)[..., None]
    q = torch.round((x - b[..., None]) / safe).clamp(0, qmax)
    return (w * (x - a[..., None] * q - b[..., None]) ** 2).sum(-1)


@pytest.mark.parametrize("qmin,qmax", [(-2, 1), (-4, 3), (-8, 7), (-32, 31)])
def test_symmetric_never_worse_than_min_max_and_better_on_average(qmin, qmax):
    x = groups(2000, 16)
    a = scale_search.search_symmetric(x, qmin, qmax)
    with scale_search.min_max():
        a0 = scale_search.search_symmetric(x, qmin, qmax)
    assert torch.equal(a0, x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / qmin)
    e, e0 = sym_error(x, a, qmin, qmax), sym_error(x, a0, qmin, qmax)
    assert (e <= e0 * (1 + 1e-5) + 1e-7).all()
    assert e.sum() < 0.97 * e0.sum()


@pytest.mark.parametrize("qmax,zero_in_range", [(3, True), (15, True), (31, True), (15, False), (31, False)])
def test_affine_never_worse_than_min_max_and_keeps_its_constraints(qmax, zero_in_range):
    x = groups(2000, 32, seed=1) + (0.5 if not zero_in_range else 0.0)
    a, b = scale_search.search_affine(x, qmax, zero_in_range=zero_in_range)
    with scale_search.min_max():
        a0, b0 = scale_search.search_affine(x, qmax, zero_in_range=zero_in_range)
    e, e0 = affine_error(x, a, b, qmax), affine_error(x, a0, b0, qmax)
    assert (e <= e0 * (1 + 1e-5) + 1e-7).all()
    assert e.sum() < 0.99 * e0.sum()
    assert (a >= 0).all()
    if zero_in_range:
        assert (b <= 0).all()


def test_symmetric_close_to_brute_force():
    """A fine scan over every step from 0 to twice the min-max one, each rounded to nearest: the search (11
    candidates and a refit) is within 1% of the best on average and never far from it."""
    qmin, qmax = -4, 3
    x = groups(300, 16, seed=2)
    a = scale_search.search_symmetric(x, qmin, qmax)
    a0 = x.gather(-1, x.abs().argmax(-1, keepdim=True)) / qmin  # [G, 1]
    scan = a0 * torch.linspace(0.05, 2.0, 4000)[None, :]         # [G, S]
    q = torch.round(x[:, None, :] / scan[..., None]).clamp(qmin, qmax)
    best = ((x[:, None, :] - scan[..., None] * q) ** 2).sum(-1).amin(-1)
    e = sym_error(x, a, qmin, qmax)
    assert (e >= best * (1 - 1e-4) - 1e-7).all()  # the scan is the optimum up to its resolution
    assert e.sum() <= 1.01 * best.sum()
    assert (e <= 1.25 * best + 1e-6).all()


def test_affine_close_to_brute_force():
    qmax = 3
    x = groups(100, 16, seed=3)
    a, b = scale_search.search_affine(x, qmax, zero_in_range=True)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    steps = (hi - lo)[:, None] / qmax * torch.linspace(0.3, 1.5, 160)[None, :]           # [G, S]
    offsets = lo[:, None] * torch.linspace(0.0, 1.2, 120)[None, :]                       # [G, O] (all <= 0)
    A, B = steps[:, :, None], offsets[:, None, :]                                        # [G, S, 1], [G, 1, O]
    q = torch.round((x[:, None, None, :] - B[..., None]) / A[..., None]).clamp(0, qmax)  # [G, S, O, n]
    err = ((x[:, None, None, :] - A[..., None] * q - B[..., None]) ** 2).sum(-1)
    best = err.flatten(1).amin(-1)
    e = affine_error(x, a, b, qmax)
    lo0, a0 = lo, (hi - lo) / qmax
    e0 = affine_error(x, a0, lo0, qmax)
    assert e0.sum() > 1.15 * best.sum()  # 2-bit groups: min-max is far from the best grid
    assert e.sum() <= 1.04 * best.sum()  # the search is close to it


def test_importance_moves_the_grid_to_what_matters():
    """Zero importance on the outlier: the search ignores it and rounds the other weights on a finer grid than when
    every weight counts, and its weighted error is the lowest of the two."""
    qmin, qmax = -4, 3
    x = groups(500, 16, seed=4)
    x[:, 0] = 8.0  # an outlier in every group
    w = torch.ones_like(x)
    w[:, 0] = 0.0
    a_w = scale_search.search_symmetric(x, qmin, qmax, w)
    a_u = scale_search.search_symmetric(x, qmin, qmax)
    assert (a_w.abs() < a_u.abs()).float().mean() > 0.95
    assert sym_error(x, a_w, qmin, qmax, w).sum() < 0.2 * sym_error(x, a_u, qmin, qmax, w).sum()


def test_an_all_zero_group_stays_zero():
    x = torch.zeros(3, 16)
    assert torch.equal(scale_search.search_symmetric(x, -4, 3), torch.zeros(3))
    a, b = scale_search.search_affine(x, 15, zero_in_range=True)
    assert torch.equal(affine_error(x, a, b, 15), torch.zeros(3))
    with pytest.raises(ValueError, match="odd number"):
        scale_search.search_symmetric(x, -4, 3, steps=4)


@pytest.mark.parametrize("name", [n for n, t in GGML_TYPES.items() if n not in ("q8_0", "tq1_0", "tq2_0")])
def test_ggml_types_fit_with_less_error_than_min_max_and_stay_exact(name):
    """Through each ggml type: the fitted header rounds a weight matrix with less squared error than the min-max
    header (the sub-block scales are then stored as the type stores them), and its bytes decode to the same codes
    and header (what llama.cpp reads is what was evaluated)."""
    t = GGML_TYPES[name]
    W = groups(64, 512, seed=5).reshape(64, 512) * 0.02
    err = {}
    for search in (True, False):
        with (scale_search.min_max() if not search else nullcontext()):
            h = ggml.fit_matrix(t, W)
        q = ggml.quantize_matrix(t, W, h)
        err[search] = (ggml.dequantize_matrix(t, q, h) - W).pow(2).sum().item()
        q2, h2 = ggml.decode_matrix(t, ggml.encode_matrix(t, q, h), W.shape[-1])
        assert torch.equal(q2, q) and all(torch.equal(h2[k].to(h[k].dtype), h[k]) for k in h)
    assert err[True] < 0.98 * err[False], err


def test_gptq_on_a_ggml_type_uses_the_search():
    """GPTQ's output error on a k-quant is lower with the searched block scales than with min-max ones."""
    from compressor.quantize.formats import QuantSpec
    from compressor.quantize.gptq import gptq_quantize

    g = torch.Generator().manual_seed(6)
    X = torch.randn(2048, 256, generator=g) * torch.linspace(0.2, 3, 256)  # columns of unequal energy
    W = groups(32, 256, seed=7) * 0.02
    H = X.T @ X / X.shape[0]
    spec = QuantSpec("q3_k")
    err = {}
    for search in (True, False):
        with (scale_search.min_max() if not search else nullcontext()):
            r = gptq_quantize(W, H, spec)
        err[search] = ((r.qweight.dequantize().float() - W) @ X.T).pow(2).sum().item()
    assert err[True] < err[False], err
