"""torchrun-style launches of `cli.py compress` (tests/ranks.py: ranks spawned here, gloo), budget LP over pass-1
measurements and the layer sensitivity, then GPTQ: two ranks write the single-process output (Mixtral); a killed
rank is named by the others, quickly and without a hang, and the same command then resumes from rank 0's journal and
writes the single-process output (Qwen2-MoE: its layer 0 and pass 1 from the killed run, layer 1 from the resumed
one, all on two ranks). Three launches: each costs two interpreters' imports."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.io.checkpoint import read_tensors
from ranks import run_ranks
from tiny import budget_recipe, save_tiny

QUIET = dict(log=lambda *_: None)
SETTINGS = {"allocation.budget": "4.5bits", "allocation.scope": "experts", "calibration.samples": 16,
            "allocation.formats": ["keep", "int8", "int4", "int3", "int2"]}  # 16 windows: 2 batches, one per rank


def argv(src, out, *extra) -> list[str]:
    """The CLI flags of budget_recipe(src, out, **SETTINGS)."""
    return ["compress", str(src), "-o", str(out), "--budget", "4.5bits", "--budget-scope", "experts", "--formats",
            "keep,int8,int4,int3,int2", "--group-size", "16", "--samples", "16", "--seq-len", "48", "--calib",
            str(src / "calib.txt"), *extra]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family's tiny model and its single-process output (pass 1 measured afresh)."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for family in ("mixtral", "qwen2_moe"):  # routed experts only; routed and shared experts (dense linears)
        src = save_tiny(family, root / family)
        r = budget_recipe(src, root / f"{family}-one", **SETTINGS, **{"allocation.reuse_measurements": False})
        out[family] = src, api.compress(r, **QUIET)
    return out


def assert_same_output(got, want) -> None:
    a, b = read_tensors(got), read_tensors(want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), "the same tensors, bit for bit"
    plan = lambda d: json.loads((d / "plan.json").read_text())
    assert plan(got)["experts"] == plan(want)["experts"] and plan(got)["dense"] == plan(want)["dense"]


def test_two_ranks_write_the_single_process_output(models, tmp_path):
    src, one = models["mixtral"]
    ranks, _ = run_ranks(2, argv(src, tmp_path / "two", "--no-measurement-cache"))
    assert [r.code for r in ranks] == [0, 0], ranks[0].err[-3000:] + ranks[1].err[-3000:]
    assert_same_output(tmp_path / "two", one)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    shares = report["ranks"]
    assert report["world_size"] == 2 and [s["rank"] for s in shares] == [0, 1] and [s["windows"] for s in shares] == [8, 8]
    experts = sum(len(f) for f in json.loads((one / "plan.json").read_text())["experts"].values())
    for stage in ("pass 1", "pass 2"):
        owned = [s["stages"][stage]["experts"] for s in shares]
        assert sum(owned) == experts and min(owned) > 0, f"{stage}: every expert owned once, by both ranks"
        assert all(s["stages"][stage]["tokens"] > 0 for s in shares)


@pytest.fixture(scope="module")
def killed(models, tmp_path_factory):
    """Rank 1 killed (SIGKILL) when pass 2 reaches layer 1, with a long collective timeout."""
    src, _ = models["qwen2_moe"]
    out = tmp_path_factory.mktemp("killed") / "out"
    ranks, seconds = run_ranks(2, argv(src, out, "--dist-timeout", "300"), die={"rank": 1, "layer": 1})
    return src, out, ranks, seconds


def test_a_killed_rank_is_named_without_waiting_for_the_timeout(killed):
    _, out, ranks, seconds = killed
    assert ranks[1].code == -9
    assert ranks[0].code == 2, ranks[0].err[-3000:]  # a clear error, printed without a traceback
    assert "rank 1 stopped responding" in ranks[0].err and "rank 0 of 2 stops during" in ranks[0].err, ranks[0].err[-2000:]
    assert seconds < 100, "named in seconds, long before the 300 s timeout"
    assert not out.exists(), "nothing written"


def test_the_same_command_resumes_after_the_kill(killed, models):
    src, out, _, _ = killed
    journal = out.parent / f".{out.name}.partial"
    assert sorted(p.name for p in journal.glob("layer-*")) == ["layer-0.safetensors"], "rank 0 journaled layer 0"
    ranks, _ = run_ranks(2, argv(src, out, "--dist-timeout", "300"))
    assert [r.code for r in ranks] == [0, 0], ranks[0].err[-3000:] + ranks[1].err[-3000:]
    assert_same_output(out, models["qwen2_moe"][1])
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert [layer["resumed"] for layer in layers] == [True, False]
    assert not journal.exists()
