"""Pass 1 (MeasurePass): the eps[expert][format] table measured with GPTQ candidates on request."""

from __future__ import annotations

import torch

from compressor import api
from compressor.arch.view import find_moe_blocks
from compressor.calibration.layerwise import layerwise
from compressor.config import Recipe, apply_overrides
from compressor.io.models import load_model, load_tokenizer
from compressor.measure import MeasurePass
from tiny import save_tiny

FORMATS = ["int2", "int3", "int4"]


def measure(model, blocks, windows, quantizer):
    m = MeasurePass(blocks, FORMATS, 16, False, quantizer, {"damp": 0.01, "block_size": 16, "act_order": False})
    layerwise(model, windows, m)
    return m.results


def tiny_problem(model_type: str, where):
    """(model, its MoE blocks, 8 calibration windows of 48 tokens) of a tiny random model saved under `where`."""
    src = save_tiny(model_type, where)
    model = load_model(src)
    recipe = apply_overrides(Recipe(), {"calibration.samples": 8, "calibration.seq_len": 48,
                                        "calibration.text": str(src / "calib.txt")})
    return model, find_moe_blocks(model), api.calibration_data(recipe, load_tokenizer(src))


def test_gptq_candidates_lower_the_measured_output_error(tmp_path):
    model, blocks, windows = tiny_problem("mixtral", tmp_path / "m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rtn, gptq = measure(model, blocks, windows, "rtn"), measure(model, blocks, windows, "gptq")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "measurement changed the model"
    for r, g in zip(rtn, gptq):
        assert torch.equal(r.count, g.count) and r.total_tokens == g.total_tokens  # same tokens, counted once
        assert torch.allclose(r.weight_sum, g.weight_sum)  # routing statistics of the Hessian forward, reused
        assert torch.allclose(r.out_energy * torch.ones(()), g.out_energy * torch.ones(()))
        # GPTQ minimises the Hessian-weighted error: never above RTN's per expert (up to float noise) ...
        assert (g.hess_err <= r.hess_err * (1 + 1e-4) + 1e-6).all()
        # ... and the block-output error it causes, summed over experts, falls for every format
        assert (g.eps_sq.sum(0) < r.eps_sq.sum(0)).all(), (g.eps_sq.sum(0), r.eps_sq.sum(0))
        # more bits, less error, with either quantizer
        assert (r.eps_sq.sum(0).diff() < 0).all() and (g.eps_sq.sum(0).diff() < 0).all()


def test_imatrix_candidates_lower_the_hessian_error_of_rtn(tmp_path):
    """The imatrix quantizer collects the Hessians first (as GPTQ does) and its candidates' Hessian-weighted error,
    summed over each block's experts, is below RTN's for every format."""
    model, blocks, windows = tiny_problem("qwen2_moe", tmp_path / "m")
    rtn, imx = measure(model, blocks, windows, "rtn"), measure(model, blocks, windows, "imatrix")
    for r, m in zip(rtn, imx):
        assert torch.equal(r.count, m.count)
        assert (m.hess_err.sum(0) < r.hess_err.sum(0)).all(), (m.hess_err.sum(0), r.hess_err.sum(0))
