"""The pieces of evals/llamacpp_compare.py (and of its table, evals/llamacpp_report.py) that decide what is
compared, none of which needs llama.cpp: which points share a compress, what a GGUF's expert types and bytes are
(and the refusal of a file whose non-expert tensors are quantized), the calibration text llama-imatrix reads, the
table."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.assets import CALIB_TEXT, DEFAULT_MODEL_DIR
from compressor.calibration.data import calibration_windows, read_text, tokenize
from evals import llamacpp_compare as lc
from evals import llamacpp_report

gguf = pytest.importorskip("gguf")


def test_points_with_equal_expert_bytes_share_one_compress():
    rows = {"llama-Q2_K": {"expert_bytes": 100}, "llama-Q3_K_S": {"expert_bytes": 100},
            "llama-Q3_K_M": {"expert_bytes": 120}, "llama-IQ2_XS": {"error": "x"}}
    points = lc.budget_points({k: v for k, v in rows.items() if "expert_bytes" in v}, lc.QTYPES)
    assert points == {"Q2_K": 100, "Q3_K_S": 100, "Q3_K_M": 120}
    assert lc.shared_compress(points) == {"Q2_K": "Q2_K", "Q3_K_S": "Q2_K", "Q3_K_M": "Q3_K_M"}


def packed(qtype: str, shape: tuple[int, ...]) -> tuple[np.ndarray, "gguf.GGMLQuantizationType"]:
    """Rows of a ggml block type as raw bytes (their values do not matter here, only names, types and sizes)."""
    qt = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    return np.zeros((*shape[:-1], shape[-1] // block * nbytes), np.uint8), qt


def write_gguf(path, attn_type):
    w = gguf.GGUFWriter(str(path), "llama")
    for layer in range(2):
        for proj, t in (("gate", "Q4_0"), ("up", "Q4_0"), ("down", "Q3_K" if layer else "Q5_K")):
            data, qt = packed(t, (2, 4, 256))
            w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", data, raw_dtype=qt)
    if attn_type == "F16":
        w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 256), np.float16))
    else:
        data, qt = packed(attn_type, (4, 256))
        w.add_tensor("blk.0.attn_q.weight", data, raw_dtype=qt)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_describe_gguf_counts_expert_types_and_bytes_and_refuses_other_quantized_tensors(tmp_path):
    write_gguf(tmp_path / "ok.gguf", "F16")
    d = lc.describe_gguf(tmp_path / "ok.gguf")
    assert d["expert_types"] == {"down": {"Q3_K": 1, "Q5_K": 1}, "gate": {"Q4_0": 2}, "up": {"Q4_0": 2}}
    # bytes per 256-weight row: q4_0 8 blocks x 18, q3_k 110, q5_k 176; 8 rows per tensor
    assert d["expert_bytes"] == 8 * (4 * 8 * 18 + 110 + 176)
    assert d["non_expert_types"] == {"F16": 1, "F32": 1}
    assert llamacpp_report.bits(d["expert_bytes"], params=6 * 8 * 256) == pytest.approx((4 * 4.5 + 3.4375 + 5.5) / 6)
    write_gguf(tmp_path / "bad.gguf", "Q8_0")
    with pytest.raises(RuntimeError, match="blk.0.attn_q.weight"):
        lc.describe_gguf(tmp_path / "bad.gguf")


def test_imatrix_text_holds_our_calibration_windows_in_whole_chunks():
    from compressor.io.models import load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    ids = tokenize(tok, read_text(CALIB_TEXT))
    windows = calibration_windows(ids, 4, 64, 0)
    text = lc.imatrix_text(tok, windows, ids)
    assert tokenize(tok, text).numel() >= windows.numel()
    start = 0
    for w in windows:  # each window's text, in order
        piece = tok.decode(w.tolist())
        start = text.index(piece, start) + len(piece)


def test_table_gives_ours_against_llama_cpp_at_the_same_point():
    ppl = lambda m: {"pydocs": m, "austen": m, "shakespeare": m, "mean": m}  # noqa: E731
    results = {"settings": {"qtypes": ["Q4_K_M"], "max_tokens": 8192, "seq_len": 512, "threads": 2},
               "rows": {"llama-Q4_K_M": {"kind": "llama", "qtype": "Q4_K_M", "expert_bytes": 400,
                                         "expert_types": {"gate": {"Q5_0": 30}}, "ppl_llama_cpp": ppl(20.0),
                                         "tasks": {"limit": 200, "local_piqa": {"acc": 0.6, "stderr": 0.03}}},
                        "ours-Q4_K_M": {"kind": "gguf", "expert_bytes": 399, "ppl_llama_cpp": ppl(18.0),
                                        "ppl_ours": ppl(18.2), "expert_types": {"gate": {"Q4_0": 2, "Q8_0": 28}}},
                        "vllm-Q4_K_M": {"kind": "vllm", "expert_bytes": 398, "ppl_ours": ppl(22.0),
                                        "formats": {"int4/int4": 240}}}}
    table = llamacpp_report.markdown(results).splitlines()
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| llama-Q4_K_M", "| ours-Q4_K_M", "| vllm-Q4_K_M"]
    assert "18.00 (-10.0%)" in table[3] and "18.20 (-9.0%)" in table[3] and "2xq4_0+28xq8_0" in table[3]
    assert "22.00 (+10.0%)" in table[4]
    assert "0.600 ± 0.030" in table[2]
    assert "the first 8192 tokens" in table[-1]  # the settings', when no row records its own
    results["rows"]["ours-Q4_K_M"]["ppl_ours"]["max_tokens"] = 2048
    assert "the first 2048 tokens" in llamacpp_report.markdown(results).splitlines()[-1]
    results["rows"]["ours-Q4_K_M"]["bench"] = {"prefill_tok_s": 1.0, "prefill_tok_s_sd": 0.0, "cpu": "X (avx2)"}
    assert llamacpp_report.markdown(results).splitlines()[-1].startswith(
        "Speeds compare on the same CPU only: ours-Q4_K_M on X (avx2);")


def test_an_earlier_compress_is_adopted_only_for_its_own_target_budget_method_and_formats(tmp_path):
    import yaml

    out = tmp_path / "ours"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(
        {"allocation": {"target": "gguf", "budget": "100B", "formats": ["q4_0", "q2_k"]},
         "quantization": {"method": "rtn"}}))
    assert not lc.finished(out, "gguf", 100, "rtn")  # no report.json: stopped before the end
    (out / "report.json").write_text("{}")
    assert lc.finished(out, "gguf", 100, "rtn")
    assert not lc.finished(out, "gguf", 100, "gptq")
    assert not lc.finished(out, "gguf", 101, "rtn")
    assert not lc.finished(out, "vllm", 100, "rtn")
    assert lc.finished(out, "gguf", 100, "rtn", ["q4_0", "q2_k"])
    assert not lc.finished(out, "gguf", 100, "rtn", ["q4_0", "q2_k", "q3_k"])  # another candidate menu


def test_layout_plan_gives_every_expert_its_layers_gguf_types_and_refuses_gate_up_apart():
    template = {"experts": {"model.layers.0.mlp.experts": ["int4"] * 3, "model.layers.1.mlp.experts": ["int2"] * 3},
                "dense": {}, "group_size": 128, "target": "gguf", "budget_bytes": 7, "allocation": {"solver": "x"}}
    types = {"blk.0.ffn_gate_exps.weight": "Q4_0", "blk.0.ffn_up_exps.weight": "Q4_0",
             "blk.0.ffn_down_exps.weight": "Q3_K", "blk.1.ffn_gate_exps.weight": "Q5_0",
             "blk.1.ffn_up_exps.weight": "Q5_0", "blk.1.ffn_down_exps.weight": "Q5_0"}
    plan = lc.layout_plan(template, types, 1234, "llama.gguf")
    assert plan["experts"] == {"model.layers.0.mlp.experts": ["q4_0+q3_k"] * 3,
                               "model.layers.1.mlp.experts": ["q5_0"] * 3}
    assert plan["budget_bytes"] == 1234 and plan["allocation"] == {"layout_of": "llama.gguf"}
    assert plan["target"] == "gguf" and template["experts"]["model.layers.0.mlp.experts"] == ["int4"] * 3
    with pytest.raises(ValueError, match="blk.1 gives gate q5_0 and up q8_0"):
        lc.layout_plan(template, {**types, "blk.1.ffn_up_exps.weight": "Q8_0"}, 1234, "llama.gguf")


def test_rows_of_a_point_are_ordered_by_kind_gptq_layout_after_imatrix_layout():
    names = ["ours+layout+gptq-Q2_K", "llama-Q3_K_M", "ours+layout-Q2_K", "llama-Q2_K", "f16"]
    order = sorted(names, key=lambda n: llamacpp_report.row_order(n, ["Q2_K", "Q3_K_M"]))
    assert order == ["f16", "llama-Q2_K", "ours+layout-Q2_K", "ours+layout+gptq-Q2_K", "llama-Q3_K_M"]
