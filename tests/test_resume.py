"""Pass 2 resumes an interrupted compress (io/journal.py): the layers quantized before the interruption are loaded,
not quantized again, and the output is exactly what an uninterrupted run writes; other settings discard the journal."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.apply_plan import QuantizePass
from compressor.io.checkpoint import read_tensors
from tiny import budget_recipe, save_tiny

QUIET = dict(log=lambda *_: None)


@pytest.fixture()
def src(tmp_path):
    return save_tiny("qwen2_moe", tmp_path / "m")  # routed experts and a shared expert (dense linears) per layer


def recipe(src, out, **over):
    return budget_recipe(src, out, **{"quantization.bits": 3, **over})


@pytest.fixture()
def quantized(monkeypatch):
    """The layers whose experts pass 2 really quantized; `fail_at` makes it stop at that layer, as a kill would."""
    calls, fail_at = [], []
    real = QuantizePass._quantize_block

    def spy(self, b, *args):
        if fail_at and b.layer_idx == fail_at[0]:
            raise KeyboardInterrupt
        calls.append(b.layer_idx)
        return real(self, b, *args)

    monkeypatch.setattr(QuantizePass, "_quantize_block", spy)
    return calls, fail_at


def interrupted(src, out, fail_at, layer, **over):
    fail_at[:] = [layer]
    with pytest.raises(KeyboardInterrupt):
        api.compress(recipe(src, out, **over), **QUIET)
    fail_at.clear()
    assert not out.exists(), "nothing is written before the output is complete"
    journal = out.parent / f".{out.name}.partial"
    assert sorted(p.name for p in journal.glob("layer-*")) == ["layer-0.safetensors"]
    return journal


def test_resumed_output_equals_an_uninterrupted_one(src, tmp_path, quantized):
    calls, fail_at = quantized
    clean = api.compress(recipe(src, tmp_path / "clean"), **QUIET)
    assert calls == [0, 1]
    out = tmp_path / "out"
    journal = interrupted(src, out, fail_at, 1)
    calls.clear()
    api.compress(recipe(src, out), **QUIET)
    assert calls == [1], "layer 0 came from the journal"
    got, want = read_tensors(out), read_tensors(clean)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert [r["resumed"] for r in layers] == [True, False]
    assert layers[0]["experts"] == json.loads((clean / "report.json").read_text())["layers"][0]["experts"]
    assert not journal.exists(), "removed once the output is committed"


def test_other_settings_discard_the_journal(src, tmp_path, quantized):
    calls, fail_at = quantized
    out = tmp_path / "out"
    interrupted(src, out, fail_at, 1)
    calls.clear()
    api.compress(recipe(src, out, **{"quantization.bits": 4}), **QUIET)
    assert calls == [0, 1]
    formats = json.loads((out / "plan.json").read_text())["experts"]
    assert {f for fs in formats.values() for f in fs} == {"int4"}


def test_a_damaged_layer_file_is_quantized_again(src, tmp_path, quantized):
    calls, fail_at = quantized
    out = tmp_path / "out"
    journal = interrupted(src, out, fail_at, 1)
    (journal / "layer-0.safetensors").write_bytes(b"\0" * 64)  # e.g. a full disk
    calls.clear()
    api.compress(recipe(src, out), **QUIET)
    assert calls == [0, 1]
