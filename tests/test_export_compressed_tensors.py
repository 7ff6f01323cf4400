"""`export --format compressed-tensors`: read back with the compressed-tensors library itself (its config parsing, its
regex matching of targets and ignore, its pack-quantized decompression), every expert linear equals this project's
weights exactly; tensor names are the ones transformers' save_pretrained writes for the family; the config gives each
layer the scheme vLLM's loader would look up for it; plans vLLM cannot run are refused and nothing is written."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from compressor import api  # noqa: E402
from compressor.arch.view import find_moe_blocks  # noqa: E402
from compressor.export import ExportError, export  # noqa: E402
from compressor.export.compressed_tensors import int32_words  # noqa: E402
from compressor.io.models import load_model  # noqa: E402
from compressor.plan import Plan  # noqa: E402
from compressor.quantize.packing import pack_bits  # noqa: E402
from tiny import budget_recipe, file_tensor_bytes, save_tiny  # noqa: E402

QUIET = dict(log=lambda *_: None)
# widths in whole groups of 128 (vLLM's kernels need them); three layers for a plan mixing int4, int8 and 16-bit
WIDE = {"mixtral": dict(intermediate_size=256), "qwen2_moe": dict(moe_intermediate_size=128),
        "qwen3_moe": dict(moe_intermediate_size=128), "olmoe": dict(intermediate_size=128)}
MIX = ["int4", "int8", "keep"]
VLLM_LOOKUP = ("gate_proj", "up_proj", "down_proj")


def vllm_recipe(src, out, **over):
    return budget_recipe(src, out, **{"allocation.target": "vllm", "allocation.formats": ["keep"],
                                      "allocation.scope": "experts", "quantization.method": "rtn", **over})


def compress_with_layers(src, root, formats: list[str], **over):
    """A --target vllm compress whose layers take `formats` (a plan.json given with --plan)."""
    api.compress(vllm_recipe(src, root / "dry", **{"quantization.bits": 4, **over}), dry_run=True, **QUIET)
    plan = Plan.load(root / "dry" / "plan.json")
    for name, fmt in zip(sorted(plan.experts, key=lambda n: int(n.split(".")[2])), formats):
        plan.experts[name] = [fmt] * len(plan.experts[name])
    plan.save(root / "plan.json")
    return api.compress(vllm_recipe(src, root / "out", **{"allocation.plan": str(root / "plan.json"), **over}), **QUIET)


def skeleton(tensors: dict[str, torch.Tensor], dtype) -> nn.Module:
    """A module tree holding an nn.Linear at every linear the exported checkpoint names (quantized or not)."""
    root = nn.Module()
    for key, t in tensors.items():
        name = key.removesuffix(".weight_shape") if key.endswith(".weight_shape") else key.removesuffix(".weight")
        if key.endswith(".weight_shape"):
            (out, n), bias = t.tolist(), False
        elif key.endswith(".weight") and t.dim() == 2 and "embed" not in key:
            (out, n), bias = t.shape, f"{name}.bias" in tensors
        else:
            continue
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(n, out, bias=bias, dtype=dtype))
    return root


def library_decompressed(path) -> tuple[nn.Module, QuantizationConfig, dict]:
    """The exported linears as the compressed-tensors library decompresses them: its config, its matching of targets
    and ignore, the tensors loaded strictly (names, shapes), its pack-quantized decompression."""
    tensors = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    model = skeleton(tensors, getattr(torch, config["dtype"]))
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)  # the module layout of a compressed checkpoint: weight_packed, weight_scale ...
    own = set(model.state_dict())
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=True)
    compressor.decompress_model(model)
    return model, qconfig, tensors


def vllm_scheme(qconfig: dict, name: str) -> int | None:
    """Bits of the scheme vLLM's CompressedTensorsConfig gives layer `name` (get_scheme_dict: ignore first, then the
    first target that is equal or, for `re:`, re.match-es; utils.py), None when ignored; an unmatched name is the
    KeyError vLLM would raise."""
    hit = lambda target: re.match(target[3:], name) if target.startswith("re:") else target == name  # noqa: E731
    if any(hit(t) for t in qconfig["ignore"]):
        return None
    for group in qconfig["config_groups"].values():
        if any(hit(t) for t in group["targets"]):
            return group["weights"]["num_bits"]
    raise KeyError(name)


def our_rows(b, e: int, part: str, rows: torch.Tensor, dtype) -> torch.Tensor:
    """What this project's runtime multiplies by: the dequantized rows, cast to the activations' dtype."""
    return getattr(getattr(b.block.experts, str(e)), part).dequantized()[rows].to(dtype)


@pytest.fixture(scope="module", params=list(WIDE))
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    src = save_tiny(family, root / "src", hidden_size=128, num_hidden_layers=3, **WIDE[family])
    out = compress_with_layers(src, root, MIX)
    path, summary = export(out, "compressed-tensors", root / "ct", **QUIET)
    return family, src, out, path, summary


def test_every_expert_linear_decompresses_to_our_weights_exactly(exported):
    from compressor.export.checkpoint_names import CheckpointNames

    family, _, out, path, summary = exported
    model, _, _ = library_decompressed(path)
    ours = load_model(out, torch.float16)
    blocks = find_moe_blocks(ours)
    names = CheckpointNames(ours, blocks, [], "test")
    checked = 0
    for b, fmt in zip(blocks, MIX):
        for x in names.experts[b.name]:
            linear = model.get_submodule(x.module)
            assert hasattr(linear, "quantization_scheme") == (fmt != "keep")
            assert torch.equal(linear.weight.data, our_rows(b, x.expert, x.part, x.rows, torch.float16))
            checked += 1
    assert checked == sum(3 * b.num_experts for b in blocks)
    assert summary["layers"] == {"int4": 1, "int8": 1, "16-bit": 1} and "scale_rounding" not in summary


def test_bytes_are_the_compressed_models_plus_the_shapes(exported):
    """Nothing re-quantized, nothing padded (rows of whole groups are whole int32 words): the exported tensors are the
    compressed checkpoint's bytes plus one int64 [2] weight_shape per quantized linear."""
    _, _, out, path, summary = exported
    tensors = load_file(path / "model.safetensors")
    shapes = [k for k in tensors if k.endswith(".weight_shape")]
    assert summary["tensor_bytes"] == file_tensor_bytes(path) == file_tensor_bytes(out) + 16 * len(shapes)


def test_tensor_names_are_what_save_pretrained_writes(exported):
    """The exported names, `weight_packed` / `weight_scale` / `weight_shape` read as `weight`, are exactly the keys
    transformers' save_pretrained wrote for the original model (per-expert linears, the family's own names)."""
    family, src, _, path, _ = exported
    ours = {re.sub(r"\.weight_(packed|scale|shape)$", ".weight", k) for k in load_file(path / "model.safetensors")}
    assert ours == set(load_file(src / "model.safetensors"))
    per_expert = {"mixtral": "block_sparse_moe.experts.0.w1.weight"}.get(family, "mlp.experts.0.gate_proj.weight")
    assert f"model.layers.0.{per_expert}" in ours


def test_config_groups_name_exactly_the_intended_linears(exported):
    family, _, out, path, _ = exported
    model, qconfig, tensors = library_decompressed(path)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    targets = [t for g in config["config_groups"].values() for t in g["targets"]]
    expert_target = lambda name: [t for t in targets if re.match(t[3:], name)]  # noqa: E731
    bits = {"int4": 4, "int8": 8}
    for b, fmt in zip(find_moe_blocks(load_model(out)), MIX):
        prefix = f"model.layers.{b.layer_idx}." + ("block_sparse_moe" if family == "mixtral" else "mlp") + ".experts"
        linears = [n for n, _ in model.named_modules() if n.startswith(prefix + ".") and n.count(".") == prefix.count(".") + 2]
        assert len(linears) == 3 * b.num_experts
        for n in linears:  # every expert linear of a quantized layer in exactly one group, of a 16-bit layer in none
            assert len(expert_target(n)) == (fmt != "keep")
        for proj in VLLM_LOOKUP:  # the names vLLM looks a fused layer's scheme up by
            assert vllm_scheme(config, f"{prefix}.0.{proj}") == bits.get(fmt)
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert not {n for n in quantized if "self_attn" in n or n.endswith(("gate", "lm_head"))}
    for n, _ in model.named_modules():
        if "self_attn" in n and n.endswith("proj"):  # attention: in no group, ignored for vLLM (no KeyError)
            assert vllm_scheme(config, n) is None and not expert_target(n)
    if family == "qwen2_moe":  # the shared expert: dense linears in the plan's format: int4 where their input width
        # is whole groups (gate, up: 128), 16-bit where it is not (down: 96), in the int4 group and in `ignore`
        shared = {n for n in quantized if ".shared_expert." in n}
        assert shared == {f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(3) for p in ("gate_proj", "up_proj")}
        assert all(vllm_scheme(config, n) == 4 for n in shared)
        assert vllm_scheme(config, "model.layers.0.mlp.shared_expert.down_proj") is None
        assert "model.layers.0.mlp.shared_expert.gate_proj.weight_packed" in tensors
        assert vllm_scheme(config, "model.layers.0.mlp.shared_expert_gate") is None


def test_int32_words_are_compressed_tensors_weight_packed():
    """Our LSB-first code rows, read as little-endian int32, are pack_to_int32's words (element i at bit i * bits,
    stored as signed + 2^(bits-1)); rows not a whole number of words are zero-padded as the library pads them."""
    g = torch.Generator().manual_seed(0)
    for bits, n in ((4, 128), (4, 40), (8, 128), (8, 6)):
        codes = torch.randint(0, 2 ** bits, (5, n), generator=g, dtype=torch.uint8)
        expected = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
        assert torch.equal(int32_words(pack_bits(codes, bits)), expected)


def test_bfloat16_model_is_exact_with_the_vllm_grid(tmp_path):
    """A bfloat16 model under --target vllm: scales on values bfloat16 holds, written in bfloat16 (the dtype vLLM
    loads them in), and the library's bfloat16 decompression equals our runtime's bfloat16 weights exactly."""
    src = save_tiny("qwen3_moe", tmp_path / "src", dtype=torch.bfloat16, hidden_size=128, num_hidden_layers=3,
                    **WIDE["qwen3_moe"])
    out = compress_with_layers(src, tmp_path, MIX, dtype="bfloat16")
    assert json.loads((out / "plan.json").read_text())["scale_dtype"] == "bfloat16"
    path, summary = export(out, "compressed-tensors", tmp_path / "ct", **QUIET)
    assert summary["scale_dtype"] == "bfloat16" and "scale_rounding" not in summary
    model, _, tensors = library_decompressed(path)
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight_scale")} == {torch.bfloat16}
    ours = load_model(out, torch.bfloat16)
    b = find_moe_blocks(ours)[1]  # the int8 layer
    pair = getattr(b.block.experts, "3")
    assert torch.equal(model.get_submodule("model.layers.1.mlp.experts.3.down_proj").weight.data,
                       pair.down.dequantized().to(torch.bfloat16))


def test_fp16_scales_in_a_bfloat16_model_are_measured(tmp_path):
    """Scales made without the bfloat16 grid (here: an fp16 compress relabelled bfloat16) change when vLLM loads them
    in bfloat16: the export says by how much, and its number is the change of the library-decompressed weights."""
    src = save_tiny("mixtral", tmp_path / "src", hidden_size=128, num_hidden_layers=3, **WIDE["mixtral"])
    out = compress_with_layers(src, tmp_path, MIX)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    said = []
    path, summary = export(out, "compressed-tensors", tmp_path / "ct", log=said.append)
    assert any("differ from the evaluated ones" in s for s in said)
    rel = summary["scale_rounding"]["relative_weight_change"]
    tensors = load_file(path / "model.safetensors")
    ours = load_model(out, torch.float32)
    from compressor.export.checkpoint_names import CheckpointNames
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    blocks = find_moe_blocks(ours)
    num = den = 0.0
    for b, fmt in zip(blocks, MIX[:2]):
        for x in CheckpointNames(ours, blocks, [], "test").experts[b.name]:
            W = our_rows(b, x.expert, x.part, x.rows, torch.float32)
            q = unpack_from_int32(tensors[x.module + ".weight_packed"], 4 if fmt == "int4" else 8,
                                  tensors[x.module + ".weight_shape"]).float()
            s = tensors[x.module + ".weight_scale"].float().repeat_interleave(128, dim=1)
            num += float((q * s - W).pow(2).sum())
            den += float(W.pow(2).sum())
    assert 1e-5 < rel < 1e-2 and rel == pytest.approx((num / den) ** 0.5, rel=1e-4)


@pytest.mark.parametrize("family, over, match", [
    ("mixtral", {"allocation.target": "native", "quantization.bits": 4, "quantization.sym": False}, "asymmetric"),
    ("mixtral", {"allocation.target": "native", "quantization.bits": 3, "quantization.sym": True}, "in int3"),
    ("mixtral", {"allocation.target": "native", "quantization.method": "ternary"}, "in ternary"),
    ("mixtral", {"allocation.target": "gguf", "quantization.bits": 8}, "in q8_0"),
    ("mixtral", {"allocation.target": "native", "quantization.bits": 4, "quantization.sym": True,
                 "quantization.group_size": 96}, "not multiples of its group size"),
    ("gpt_oss", {"allocation.target": "native", "quantization.bits": 8}, "GPT-OSS's checkpoint stores"),
    ("granitemoe", {"allocation.target": "native", "quantization.bits": 8}, "stores each layer's experts fused"),
])
def test_plans_vllm_cannot_run_are_refused_and_nothing_written(tmp_path, family, over, match):
    src = save_tiny(family, tmp_path / "src", hidden_size=128, **WIDE.get(family, {}))
    out = api.compress(vllm_recipe(src, tmp_path / "out", **over), **QUIET)
    with pytest.raises(ExportError, match=match) as err:
        export(out, "compressed-tensors", tmp_path / "ct", **QUIET)
    assert "--target vllm" in str(err.value) or family in ("gpt_oss", "granitemoe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_layer_whose_experts_differ_is_refused(tmp_path):
    src = save_tiny("mixtral", tmp_path / "src", hidden_size=128, **WIDE["mixtral"])
    api.compress(vllm_recipe(src, tmp_path / "dry", **{"quantization.bits": 4}), dry_run=True, **QUIET)
    plan = Plan.load(tmp_path / "dry" / "plan.json")
    plan.experts["model.layers.1.mlp.experts"][2] = "int8"
    plan.save(tmp_path / "plan.json")
    out = api.compress(vllm_recipe(src, tmp_path / "out", **{"allocation.plan": str(tmp_path / "plan.json")}), **QUIET)
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.experts's experts and projections are in 2 formats "
                                          r"\(int4, int8\).*--target vllm"):
        export(out, "compressed-tensors", tmp_path / "ct", **QUIET)
    assert not (tmp_path / "ct").exists()
