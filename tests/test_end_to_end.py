"""Every supported family end to end on a tiny random config: compress, write, reload, forward.
Checks: written tensor bytes == predicted bytes; reloaded logits == the in-memory compressed model's;
packed experts == their fake-quantized dense weights."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.arch.families import SUPPORTED_MODEL_TYPES
from compressor.arch.view import find_moe_blocks
from compressor.config import Recipe, apply_overrides
from compressor.io.models import load_model
from compressor.runtime.experts import DenseExperts, PackedExperts
from tiny import file_tensor_bytes, save_tiny


def _recipe(model_dir, out, **over) -> Recipe:
    base = {"model": str(model_dir), "output": str(out), "quantization.group_size": 32,
            "calibration.text": str(model_dir / "calib.txt"), "calibration.samples": 6, "calibration.seq_len": 48}
    base.update(over)
    return apply_overrides(Recipe(), base)


def unpack_to_dense(blocks) -> None:
    """Every block's packed experts replaced by their weights unpacked into dense fp32 experts."""
    for b in blocks:
        packed = b.block.experts
        pairs = [packed.expert_weights(e) for e in range(packed.num_experts)]
        b.block.experts = DenseExperts(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                                       packed.apply_gate, (packed.gate_up_bias, packed.down_bias))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {t: save_tiny(t, tmp_path_factory.mktemp(t)) for t in SUPPORTED_MODEL_TYPES}


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_family_compress_reload_forward(model_type, tiny_dirs, tmp_path):
    src = tiny_dirs[model_type]
    out = api.compress(_recipe(src, tmp_path / "out", **{"quantization.bits": 3}), log=lambda *_: None)
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"]

    model = load_model(out, torch.float32)
    blocks = find_moe_blocks(model)
    assert all(isinstance(b.block.experts, PackedExperts) for b in blocks)
    assert all(f == "int3" for b in blocks for f in b.block.experts.formats())
    ids = torch.randint(0, 300, (2, 24))
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()

    # the same model with every expert's packed weights unpacked into dense fp32: identical logits
    unpack_to_dense(blocks)
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [5, 6])
def test_five_and_six_bit_experts_reload_as_their_dense_weights(bits, tiny_dirs, tmp_path):
    """int5 / int6 (codes across byte boundaries; the compiled kernels' scalar reader): written bytes == predicted,
    and the reloaded packed model's logits == the same weights unpacked into dense experts."""
    out = api.compress(_recipe(tiny_dirs["qwen2_moe"], tmp_path / "out", **{"quantization.bits": bits}),
                       log=lambda *_: None)
    assert file_tensor_bytes(out) == json.loads((out / "plan.json").read_text())["predicted_bytes"]
    model = load_model(out, torch.float32)
    blocks = find_moe_blocks(model)
    assert {f for b in blocks for f in b.block.experts.formats()} == {f"int{bits}"}
    ids = torch.randint(0, 300, (2, 24))
    logits = model(input_ids=ids).logits
    unpack_to_dense(blocks)
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_reload_matches_in_memory_compressed_model(tiny_dirs, tmp_path):
    """The model compress() leaves in memory and the one loaded from disk give the same logits."""
    from compressor.apply_plan import QuantizePass
    from compressor.arch.view import dense_linears
    from compressor.calibration.layerwise import layerwise
    from compressor.io.models import load_tokenizer

    src = tiny_dirs["mixtral"]
    recipe = _recipe(src, tmp_path / "out")
    out = api.compress(recipe, log=lambda *_: None)

    model = load_model(src, torch.float16)
    blocks = find_moe_blocks(model)
    dense = dense_linears(model, blocks)
    windows = api.calibration_data(recipe, load_tokenizer(src))
    plan = api.make_plan(recipe, model, blocks, dense, windows, torch.float16)
    layerwise(model, windows, QuantizePass(model, blocks, dense, plan, recipe))
    model = model.half().float()  # the checkpoint stores unquantized tensors in float16
    ids = torch.randint(0, 300, (2, 32))
    torch.testing.assert_close(load_model(out, torch.float32)(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)


def test_quantized_model_is_close_to_original_and_worse_at_fewer_bits(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2_moe"]
    ids = torch.randint(0, 300, (2, 32))
    ref = load_model(src)(input_ids=ids).logits
    err = {}
    for bits in (8, 2):
        out = api.compress(_recipe(src, tmp_path / f"b{bits}", **{"quantization.bits": bits}), log=lambda *_: None)
        err[bits] = (load_model(out)(input_ids=ids).logits - ref).pow(2).mean().item()
    assert err[8] < 1e-3 * ref.pow(2).mean().item()
    assert err[8] < err[2]


def test_never_overwrites_input_and_refuses_existing_output(tiny_dirs, tmp_path):
    from compressor.io.checkpoint import OutputExists

    src = tiny_dirs["mixtral"]
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(OutputExists, match="input model"):
        api.compress(_recipe(src, src), log=lambda *_: None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExists, match="--overwrite"):
        api.compress(_recipe(src, tmp_path / "taken"), log=lambda *_: None)
    assert sorted(p.name for p in src.iterdir()) == before
    assert not list(tmp_path.glob(".*tmp*")), "no half-written output left behind"


def test_rare_experts_fall_back_to_rtn_and_are_logged(tiny_dirs, tmp_path):
    src = tiny_dirs["mixtral"]
    out = api.compress(_recipe(src, tmp_path / "o", **{"calibration.min_tokens": 10**6}), log=lambda *_: None)
    report = json.loads((out / "report.json").read_text())
    assert len([f for f in report["fallbacks"] if "RTN" in f]) == 2 * 4  # every expert of both layers
    assert "routed tokens < min_tokens" in (out / "report.md").read_text()


def test_weighted_calibration_gives_every_expert_a_hessian(tiny_dirs, tmp_path):
    """Every expert sees every token weighted by its routing probability: no expert lacks statistics,
    and the result differs from routed-only calibration."""
    src = tiny_dirs["olmoe"]
    outs = {}
    for mode in ("routed", "weighted"):
        outs[mode] = api.compress(_recipe(src, tmp_path / mode, **{"calibration.mode": mode, "calibration.min_tokens": 0,
                                                                   "quantization.bits": 2}), log=lambda *_: None)
    assert json.loads((outs["weighted"] / "report.json").read_text())["fallbacks"] == []
    a, b = (load_model(outs[m]) for m in ("routed", "weighted"))
    ids = torch.randint(0, 300, (1, 16))
    assert not torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_dynamic_pruning_rule_is_saved_applied_on_load_and_can_be_turned_off(tiny_dirs, tmp_path, capsys):
    import cli

    src = tiny_dirs["mixtral"]
    out = api.compress(_recipe(src, tmp_path / "o", **{"pruning.target": 0.3}), log=lambda *_: None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["pruning"]["betas"]) == {b.name for b in find_moe_blocks(load_model(src))}
    ids = torch.randint(0, 300, (2, 24))
    pruned, full = load_model(out)(input_ids=ids).logits, load_model(out, dynamic_pruning=False)(input_ids=ids).logits
    assert not torch.equal(pruned, full)
    assert cli.main(["eval", str(out), "--ppl", str(src / "heldout.txt"), "--seq-len", "32"]) == 0
    assert "measured" in capsys.readouterr().out
    assert cli.main(["eval", str(out), "--ppl", str(src / "heldout.txt"), "--seq-len", "32", "--no-dynamic-pruning"]) == 0
    assert "turned off" in capsys.readouterr().out


def test_sharded_checkpoint_round_trips(tmp_path):
    from compressor.io.checkpoint import read_tensors, write_tensors

    tensors = {f"t{i}": torch.randn(100, 7) for i in range(5)} | {"q": torch.randint(0, 255, (33,), dtype=torch.uint8)}
    nbytes = write_tensors(tensors, tmp_path, max_shard_bytes=3000)
    assert nbytes == sum(t.nbytes for t in tensors.values())
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    back = read_tensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_rtn_needs_no_calibration_and_equals_quantize_rtn(tiny_dirs, tmp_path):
    """RTN runs no forward pass, and each packed expert is exactly quantize_rtn of the original weights."""
    from compressor.quantize import QuantSpec, quantize_rtn

    src = tiny_dirs["mixtral"]
    out = api.compress(_recipe(src, tmp_path / "o", **{"quantization.method": "rtn", "quantization.bits": 4}),
                       log=lambda *_: None)
    original = find_moe_blocks(load_model(src))
    packed = find_moe_blocks(load_model(out))
    spec = QuantSpec("int4", 32, False)
    for a, b in zip(original, packed):
        want = quantize_rtn(a.gate_up().float(), spec).dequantize()
        for e in range(a.num_experts):
            assert torch.equal(b.block.experts.expert_weights(e)[0], want[e])
    assert all(t == 0 for layer in json.loads((out / "report.json").read_text())["layers"]
               for blk in layer["experts"].values() for t in blk["tokens"])


def test_tensor_nbytes_reads_headers_exactly(tiny_dirs, tmp_path):
    from compressor.io.checkpoint import tensor_nbytes

    out = api.compress(_recipe(src := tiny_dirs["olmoe"], tmp_path / "o"), log=lambda *_: None)
    for directory in (src, out):
        assert sum(tensor_nbytes(directory).values()) == file_tensor_bytes(directory)


def test_imatrix_uses_the_calibration_and_beats_rtn(tiny_dirs, tmp_path):
    """--method imatrix runs the calibration forward (experts get tokens), no GPTQ damping is logged, and its 2-bit
    model's logits are closer to the original's than RTN's (measured: 0.0078 vs 0.0137 relative MSE; GPTQ 0.0061)."""
    src = tiny_dirs["mixtral"]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = load_model(src)(input_ids=ids).logits
    err = {}
    for method in ("rtn", "imatrix"):
        out = api.compress(_recipe(src, tmp_path / method, **{"quantization.method": method, "quantization.bits": 2}),
                           log=lambda *_: None)
        err[method] = (load_model(out)(input_ids=ids).logits - ref).pow(2).mean().item()
        report = json.loads((out / "report.json").read_text())
        tokens = sum(t for layer in report["layers"] for blk in layer["experts"].values() for t in blk["tokens"])
        assert (tokens > 0) == (method == "imatrix")
        assert not any("damping" in f for f in report["fallbacks"])
    assert err["imatrix"] < 0.8 * err["rtn"], err
