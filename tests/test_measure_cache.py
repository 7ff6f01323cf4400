"""The pass-1 measurement cache: a plan that differs only in budget or objective reuses the measurements (the
same analysis as measuring again); anything pass 1 depends on changing, or a damaged entry, measures again."""

from __future__ import annotations

import json
import os

import pytest

from compressor import api
from compressor.pipeline import driver, pass1
from compressor.assets import MEASUREMENTS_DIR
from tiny import budget_recipe, save_tiny

FORMATS = ["keep", "int4", "int3", "int2"]  # group 16: int2 costs 4 bits per weight, int3 5, int4 6


@pytest.fixture()
def src(tmp_path):
    return save_tiny("mixtral", tmp_path / "m")


def count_calls(monkeypatch, name: str, module=pass1) -> list:
    """How many times <module>.<name> really ran (the pipeline module that calls it)."""
    calls, real = [], getattr(module, name)

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture()
def passes(monkeypatch):
    return count_calls(monkeypatch, "measure")


@pytest.fixture()
def sensitivities(monkeypatch):
    return count_calls(monkeypatch, "layer_sensitivity", driver)


def plan(src, out, **over):
    r = budget_recipe(src, out, **{"allocation.budget": "5.5bits", "allocation.scope": "experts",
                                   "allocation.formats": FORMATS, **over})
    directory = api.compress(r, dry_run=True, log=lambda *_: None)
    return json.loads((directory / "plan.json").read_text())


def test_reused_measurements_give_the_same_analysis(src, tmp_path, passes):
    first = plan(src, tmp_path / "a")
    again = plan(src, tmp_path / "b")
    other = plan(src, tmp_path / "c", **{"allocation.objective": "per_layer", "allocation.budget": "4.5bits"})
    fresh = plan(src, tmp_path / "d", **{"allocation.reuse_measurements": False})
    assert len(passes) == 2, "the 2nd and 3rd plans reuse pass 1; the 4th was told not to"
    assert first["analysis"] == again["analysis"] == other["analysis"] == fresh["analysis"]
    assert first["experts"] == again["experts"]
    assert other["allocation"]["objective"] == "per_layer"
    assert first["allocation"]["measurements"].startswith("pass 1 measured, kept in")
    assert again["allocation"]["measurements"].startswith("pass 1 reused")


@pytest.mark.parametrize("change", [{"calibration.seed": 1}, {"calibration.samples": 5},
                                    {"allocation.formats": ["keep", "int4", "int2"]}, {"quantization.group_size": 32},
                                    {"allocation.eps_quantizer": "gptq"}])
def test_what_pass_1_depends_on_invalidates(src, tmp_path, passes, change):
    plan(src, tmp_path / "a")
    plan(src, tmp_path / "b", **change)
    assert len(passes) == 2


def test_rewritten_weights_invalidate(src, tmp_path, passes):
    plan(src, tmp_path / "a")
    weights = src / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-written: a new modification time
    plan(src, tmp_path / "b")
    assert len(passes) == 2


def test_damaged_entry_is_measured_again(src, tmp_path, passes):
    plan(src, tmp_path / "a")
    (entry,) = [p for p in MEASUREMENTS_DIR.glob("*.safetensors")
                if str(src.resolve()) in open(p, "rb").read().decode("latin-1") and not p.name.startswith("s-")]
    entry.write_bytes(entry.read_bytes()[:200])  # truncated, e.g. a full disk
    second = plan(src, tmp_path / "b")
    assert len(passes) == 2 and second["analysis"]
    assert entry.stat().st_size > 200, "the entry was written again"


def test_layer_sensitivity_is_kept_and_reused(src, tmp_path, sensitivities):
    """Measured once per model and windows, whatever the budget; recorded in the plan; another seed (other
    windows) or a damaged entry measures it again; the per-layer and output-energy objectives do not need it."""
    first = plan(src, tmp_path / "a")
    again = plan(src, tmp_path / "b", **{"allocation.budget": "4.5bits"})
    assert len(sensitivities) == 1
    s = first["allocation"]["layer_weights"]
    assert s == again["allocation"]["layer_weights"] and len(s) == 2 and all(v > 0 for v in s)
    plan(src, tmp_path / "c", **{"allocation.objective": "per_layer"})
    energy = plan(src, tmp_path / "d", **{"allocation.layer_weights": "output_energy"})
    assert len(sensitivities) == 1 and energy["allocation"]["layer_weights"] == "output_energy"
    plan(src, tmp_path / "e", **{"calibration.seed": 1})
    assert len(sensitivities) == 2
    for entry in MEASUREMENTS_DIR.glob("s-*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:100])
    assert plan(src, tmp_path / "f")["allocation"]["layer_weights"] == s
    assert len(sensitivities) == 3


def test_interrupted_pass_1_resumes_at_the_layer_where_it_stopped(src, tmp_path, monkeypatch):
    """Each measured layer is journaled in the cache; after a kill at layer 1 the same command measures layer 1
    only, and its analysis is exactly an uninterrupted pass 1's. The journal goes once the entry is written."""
    from compressor.runtime.experts import DenseExperts

    measured, real, fail_at = [], DenseExperts.from_view.__func__, [None]

    def counting(cls, b):
        measured.append(b.layer_idx)
        if b.layer_idx == fail_at[0]:
            raise KeyboardInterrupt
        return real(cls, b)

    monkeypatch.setattr(DenseExperts, "from_view", classmethod(counting))
    uninterrupted = plan(src, tmp_path / "ref", **{"allocation.reuse_measurements": False})
    assert measured == [0, 1]
    measured.clear()
    fail_at[0] = 1
    with pytest.raises(KeyboardInterrupt):
        plan(src, tmp_path / "a")
    (journal,) = [d for d in MEASUREMENTS_DIR.glob("*.partial") if (d / "layer-0.safetensors").is_file()]
    assert not (journal / "layer-1.safetensors").exists()
    measured.clear()
    fail_at[0] = None
    resumed = plan(src, tmp_path / "b")
    assert measured == [1], "layer 0 came from the journal"
    assert resumed["analysis"] == uninterrupted["analysis"] and resumed["experts"] == uninterrupted["experts"]
    assert not journal.exists()
    again = plan(src, tmp_path / "c")
    assert measured == [1] and again["allocation"]["measurements"].startswith("pass 1 reused")
