"""The online-dynamic-pruning campaign (evals/odp_reference.py): the compressed models get exactly the bytes of the
budget suite's uniform point, the stages measure what they say and resume, the paired task difference is right."""

from __future__ import annotations

import json

import pytest

from evals import compare, odp_reference
from evals.odp_report import paired


def test_paired_difference_against_hand_computation():
    # base right on examples 1-3, other on 2-4: per-example differences (-1, 0, 0, +1, 0)
    m, se = paired("11100", "01110")
    assert m == pytest.approx(0.0)
    assert se == pytest.approx((2 / 4 / 5) ** 0.5)  # var of (-1,0,0,1,0) = 2/4, se = sqrt(var / n)
    m, se = paired("0000", "1111")
    assert (m, se) == (1.0, 0.0)


def test_uniform_point_bytes_equal_what_uniform_compression_writes(tmp_path):
    from compressor import api
    from compressor.config import Recipe, apply_overrides
    from tiny import save_tiny

    src = save_tiny("mixtral", tmp_path / "m")
    over = compare.budget_suite(("2.5b",))["2.5b-uniform-rtn"]
    out = api.compress(apply_overrides(Recipe(), {"model": str(src), "output": str(tmp_path / "q"), **over,
                                                  "calibration.samples": 2, "calibration.seq_len": 32,
                                                  "calibration.text": str(src / "calib.txt")}), log=lambda *_: None)
    assert odp_reference.uniform_expert_bytes(src, "2.5b") == compare.expert_bytes(out) > 0


def test_curves_walltime_tasks_resume(tmp_path, monkeypatch):
    from tiny import save_tiny

    src = save_tiny("mixtral", tmp_path / "tiny-mixtral")
    texts = {"a": src / "heldout.txt", "pydocs": src / "calib.txt"}
    monkeypatch.setattr(compare, "HELDOUT_TEXTS", texts)
    monkeypatch.setattr(odp_reference, "HELDOUT_TEXTS", texts)
    seen = []

    def fake_tasks(s, rule, tasks, limit):
        seen.append(rule)
        return {"tasks": {"local_piqa": {"acc": 0.5, "stderr": 0.1, "n": 4, "correct": "0101"}},
                "task_reduction": 0.0, "task_seconds": 0.0}

    monkeypatch.setattr(odp_reference, "task_scores", fake_tasks)
    out = tmp_path / "odp.json"
    argv = ["--model", str(src), "--points", "", "--stages", "curves,walltime,tasks", "--targets", "0.3",
            "--task-targets", "0.3", "--max-tokens", "512", "--seq-len", "64", "--samples", "4",
            "--calibration", json.dumps({"calibration.seq_len": 64, "calibration.text": str(src / "calib.txt")}),
            "--prefill-len", "32", "--context", "16", "--decode-steps", "3", "--reps", "1", "--out", str(out)]
    odp_reference.main(argv)
    data = json.loads(out.read_text())
    pts = data["points"]
    assert set(pts) == {"bf16|none|0.00", "bf16|calibrated|0.30", "bf16|fixed-beta|0.30", "bf16|random|0.30"}
    assert pts["bf16|none|0.00"]["reduction"] == 0.0 and pts["bf16|none|0.00"]["rule"] == {}
    for k in ("bf16|calibrated|0.30", "bf16|fixed-beta|0.30", "bf16|random|0.30"):
        assert 0.1 < pts[k]["reduction"] < 0.5, (k, pts[k]["reduction"])  # calibrated for 30% on other text
    assert pts["bf16|fixed-beta|0.30"]["rule"]["beta"]["min"] == pts["bf16|fixed-beta|0.30"]["rule"]["beta"]["max"]
    assert pts["bf16|calibrated|0.30"]["rule"]["beta"]["min"] < pts["bf16|calibrated|0.30"]["rule"]["beta"]["max"]
    assert seen[0] is None and seen[1].meta["target"] == 0.3 and len(seen) == 2  # unpruned, then calibrated 30%
    wall = data["walltime"]["bf16"]["configs"]
    assert set(wall) == {"unpruned", "calibrated 30%"} and wall["calibrated 30%"]["decode_reduction"] > 0
    assert "bf16 | calibrated | 30%" in out.with_suffix(".md").read_text()

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(odp_reference, "perplexity_point", fail)
    monkeypatch.setattr(odp_reference, "time_configs", fail)
    odp_reference.main(argv)  # everything is in the JSON: nothing runs
    assert len(seen) == 2
