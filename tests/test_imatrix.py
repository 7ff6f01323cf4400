"""`--method imatrix`: round-to-nearest on scales searched for the error weighted by each column's input energy
(quantize/grid.searched_params for the int formats, the ggml types' own search), against min-max, against a
brute-force scan, through the dispatch both passes use, and end to end against RTN and GPTQ."""

from __future__ import annotations

import pytest
import torch

from compressor.quantize import QuantSpec, hessian_error, quantize, quantize_rtn, quantize_with, scale_search
from compressor.quantize.dispatch import column_importance
from compressor.quantize.grid import dequantize_codes, find_params, quantize_codes, searched_params
from compressor.quantize.scales import fp16_round

INT_CASES = [("int2", False), ("int3", False), ("int4", False), ("int5", False), ("int6", False), ("int8", False),
             ("int2", True), ("int4", True), ("int6", True)]


def problem(groups: int = 400, n: int = 16, seed: int = 0):
    """Gaussian groups with an x6 outlier in one of four, and heavy-tailed importance (a few columns carry most of
    the input energy, as in real layers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, generator=g)
    x[torch.rand(groups, generator=g) < 0.25, 0] *= 6
    return x, torch.rand(groups, n, generator=g) ** 3


def weighted_error(x, w, s, z, spec):
    q = quantize_codes(x, s[..., None], z[..., None], spec)
    return (w * (x - dequantize_codes(q, s[..., None], z[..., None])) ** 2).sum(-1)


@pytest.mark.parametrize("fmt,sym", INT_CASES)
def test_int_grids_never_worse_than_min_max_and_much_better_on_average(fmt, sym):
    spec = QuantSpec(fmt, 16, sym)
    x, w = problem()
    s, z = searched_params(x, spec, w)
    s0, z0 = find_params(x, spec)
    e, e0 = weighted_error(x, w, s, z, spec), weighted_error(x, w, s0, z0, spec)
    assert (e <= e0).all()  # min-max is a candidate, scored exactly as what is written
    assert e.sum() < 0.9 * e0.sum()
    assert torch.equal(s, fp16_round(s)) and (s > 0).all()  # scales as every format stores them
    assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 2 ** spec.bits - 1).all()
    if sym:
        assert (z == 2 ** (spec.bits - 1)).all()  # the symmetric grid's zero point stays implicit
    with scale_search.min_max():
        assert all(torch.equal(a, b) for a, b in zip(searched_params(x, spec, w), (s0, z0)))


@pytest.mark.parametrize("fmt,sym", [("int2", False), ("int3", False), ("int2", True)])
def test_int_grid_search_is_near_a_brute_force_scan(fmt, sym):
    """Every fp16 step from 0.2 to 2 times the min-max one (600 of them), with every integer zero point: the search's
    11 candidates get within 25% of the scan's best in sum where min-max is 50-100% above it."""
    spec = QuantSpec(fmt, 16, sym)
    x, w = problem(200, seed=1)
    s0, z0 = find_params(x, spec)
    best = torch.full((x.shape[0],), float("inf"))
    zeros = [z0] if sym else [torch.full_like(z0, k) for k in range(2 ** spec.bits)]
    for f in torch.linspace(0.2, 2.0, 600):
        for z in zeros:
            best = torch.minimum(best, weighted_error(x, w, fp16_round(s0 * f), z, spec))
    e = weighted_error(x, w, *searched_params(x, spec, w), spec)
    e0 = weighted_error(x, w, s0, z0, spec)
    assert e0.sum() > 1.4 * best.sum()
    assert e.sum() < 1.25 * best.sum()


def test_importance_of_the_columns_decides_the_grid():
    """Ten times the importance on the group's small weights: their error falls and the outlier's rises."""
    spec = QuantSpec("int2", 16, False)
    x, _ = problem(300, seed=2)
    x[:, 0] = 8.0
    w = torch.ones_like(x)
    w[:, 1:] = 10.0
    s, z = searched_params(x, spec, w)
    s_u, z_u = searched_params(x, spec, torch.ones_like(x))
    err = lambda s, z: (x - dequantize_codes(quantize_codes(x, s[..., None], z[..., None], spec), s[..., None],
                                             z[..., None])) ** 2
    assert err(s, z)[:, 1:].sum() < 0.8 * err(s_u, z_u)[:, 1:].sum()
    assert err(s, z)[:, 0].sum() > err(s_u, z_u)[:, 0].sum()


def test_ternary_keeps_absmean_whatever_the_importance():
    x, w = problem(50)
    spec = QuantSpec("ternary", 16)
    assert all(torch.equal(a, b) for a, b in zip(searched_params(x, spec, w), find_params(x, spec)))


def test_column_importance_is_the_damped_diagonal_and_uniform_without_data():
    X = torch.randn(2, 64, 8)
    X[1] = 0  # no token reached expert 1
    X[0, :, 3] = 0  # a dead input column of expert 0
    H = X.transpose(1, 2) @ X
    imp = column_importance(H, damp=0.1)
    d = H[0].diagonal()
    assert torch.allclose(imp[0], d + 0.1 * d.mean())
    assert imp[0, 3] > 0  # the floor keeps a dead column in the fit
    assert torch.equal(imp[1], torch.ones(8))


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "q2_k", "q3_k", "q4_0", "q4_k", "q6_k"])
def test_imatrix_lowers_the_output_error_of_rtn(fmt):
    """Inputs whose columns differ in energy (the Hessian's diagonal spans 1e-2..1e2): the output error
    tr(dW H dW^T) of imatrix is below RTN's (for ggml types: RTN on the weights' own searched scales) for every
    expert; through quantize_with, as both passes call it; rows of 256 so every ggml type applies."""
    g = torch.Generator().manual_seed(3)
    E, out, n = 3, 32, 256
    W = torch.randn(E, out, n, generator=g)
    X = torch.randn(E, 512, n, generator=g) * torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)]
    H = X.transpose(1, 2) @ X / 512
    spec = QuantSpec(fmt, 64, False)
    rtn, damp = quantize_with(W, spec, H, "rtn")
    imx, damp_i = quantize_with(W, spec, H, "imatrix")
    assert damp is None and damp_i is None
    assert torch.equal(rtn.dequantize(), quantize_rtn(W, spec).dequantize())
    assert torch.equal(imx.dequantize(), quantize_rtn(W, spec, column_importance(H)).dequantize())
    e_rtn, e_imx = hessian_error(W, rtn.dequantize(), H), hessian_error(W, imx.dequantize(), H)
    assert (e_imx < e_rtn).all(), (e_imx / e_rtn)


def test_without_a_hessian_imatrix_is_rtn_and_bad_importance_is_refused():
    W = torch.randn(2, 8, 64)
    spec = QuantSpec("int3", 32)
    assert torch.equal(quantize_with(W, spec, None, "imatrix")[0].codes, quantize_rtn(W, spec).codes)
    with pytest.raises(ValueError, match=r"importance must be \[..., in\]"):
        quantize_rtn(W, spec, torch.ones(2, 8, 64))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(W, spec, torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_with(W, spec, None, "awq")
    H = torch.eye(64).expand(2, 64, 64) * torch.linspace(0.1, 10, 64)
    assert not torch.equal(quantize(W, spec, H, "imatrix", damp=0.5).codes, quantize(W, spec, H, "imatrix").codes)
    with pytest.raises(ValueError, match=r"options \['block_size'\] given but 'imatrix' does not use them"):
        quantize(W, spec, H, "imatrix", damp=0.5, block_size=64)
