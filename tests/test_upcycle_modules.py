"""`upcycle --modules` outside a language model: the two-layer MLPs of a tiny CLIP vision encoder and of a tiny
LLaVA (its vision tower and its projector) become MLPMoE blocks, which the compressor finds, compresses without
calibration data, writes as safetensors and reloads."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import cli
from compressor import api
from compressor.apply_plan import QuantizePass
from compressor.arch.families import UnsupportedArchitecture
from compressor.arch.view import dense_linears, find_moe_blocks
from compressor.config import Recipe, apply_overrides
from compressor.io.models import load_model
from compressor.quantize import QuantSpec, quantize_rtn
from compressor.runtime.experts import PackedExperts
from compressor.runtime.moe import MLPMoE
from compressor.upcycle import UpcycleError, upcycle_cli
from compressor.upcycle.modules import upcycle_modules
from tiny import file_tensor_bytes

CLIP_MLPS = r"encoder\.layers\.\d+\.mlp"
LLAVA_MLPS = r"multi_modal_projector|vision_tower\..*\.mlp"
IMAGE_TOKEN, V = 299, 300
QUIET = dict(log=lambda *_: None)


def clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)


def tiny_clip(seed: int = 0):
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(clip_config()).eval()


def tiny_llava(seed: int = 0):
    """Vision hidden 32, text hidden 48: the projector's output width differs from its input."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(text_config=text, vision_config=clip_config(), image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1)  # the last vision layer's MLP counts too
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


KINDS = {"clip": (tiny_clip, CLIP_MLPS), "llava": (tiny_llava, LLAVA_MLPS)}


def image_processor():
    """CLIP's preprocessing at the tiny models' 32 x 32 input (the PIL backend: no torchvision needed)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.cat([torch.full((2, 16), IMAGE_TOKEN), torch.randint(0, IMAGE_TOKEN, (2, 8), generator=g)], 1)
    return pixels, ids  # 16 image tokens: (32 / 8)^2 patches, CLS dropped


@torch.no_grad()
def run(model, kind, inputs) -> torch.Tensor:
    pixels, ids = inputs
    if kind == "clip":
        return model(pixel_values=pixels).last_hidden_state
    return model(input_ids=ids, pixel_values=pixels).logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Dense and up-cycled (4 experts, top-2) directories of both kinds, written by the CLI."""
    root = tmp_path_factory.mktemp("modules")
    out = {}
    for kind, (make, regex) in KINDS.items():
        dense = root / f"{kind}-dense"
        make().save_pretrained(dense)
        image_processor().save_pretrained(dense)
        moe = root / f"{kind}-moe"
        assert cli.main(["upcycle", str(dense), "--experts", "4", "--top-k", "2", "--modules", regex,
                         "--output", str(moe)]) == 0
        out[kind] = (dense, moe)
    return root, out


# ------------------------------------------------------------------------------------------- up-cycling

@pytest.mark.parametrize("top_k", [1, 2])
def test_step0_vision_outputs_equal_the_dense_model(inputs, top_k):
    dense, moe = tiny_clip(), tiny_clip()
    names = upcycle_modules(moe, experts=4, top_k=top_k, modules=CLIP_MLPS)
    assert names == ["encoder.layers.0.mlp", "encoder.layers.1.mlp"]
    block = moe.encoder.layers[0].mlp
    assert isinstance(block, MLPMoE) and block.experts.gate_up.shape == (4, 64, 32)
    assert torch.equal(block.experts.gate_up[3], dense.encoder.layers[0].mlp.fc1.weight)
    assert torch.equal(block.experts.down_bias[2], dense.encoder.layers[0].mlp.fc2.bias)
    x = torch.randn(64, 32)
    assert block.router(x).argmax(-1).unique().numel() > 1  # the router does route to several experts
    pixels, _ = inputs
    with torch.no_grad():
        want, got = dense(pixel_values=pixels), moe(pixel_values=pixels)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the comparison can fail: one expert changed changes the output
        block.experts.down[0] *= 3
        assert not torch.allclose(moe(pixel_values=pixels).last_hidden_state, want.last_hidden_state, atol=1e-3)


def test_llava_projector_and_vision_mlps_step0(inputs):
    dense, moe = tiny_llava(), tiny_llava()
    names = upcycle_modules(moe, experts=4, top_k=2, modules=LLAVA_MLPS)
    assert names == ["model.vision_tower.encoder.layers.0.mlp", "model.vision_tower.encoder.layers.1.mlp",
                     "model.multi_modal_projector"]
    projector = moe.model.multi_modal_projector
    assert projector.experts.gate_up.shape == (4, 48, 32) and projector.experts.down.shape == (4, 48, 48)
    torch.testing.assert_close(run(moe, "llava", inputs), run(dense, "llava", inputs), atol=1e-5, rtol=1e-5)


def test_modules_regex_errors_name_the_mlps(dirs, capsys):
    root, d = dirs
    dense = d["llava"][0]
    with pytest.raises(UpcycleError, match=re.escape("model.multi_modal_projector")) as err:
        upcycle_cli(dense, root / "none", experts=4, modules=r"language_model\.layers", **QUIET)
    assert "matches no two-layer MLP" in str(err.value) and "model.vision_tower.encoder.layers.1.mlp" in str(err.value)
    assert cli.main(["upcycle", str(d["clip"][0]), "--modules", "nomatch", "--output", str(root / "x")]) == 2
    assert "encoder.layers.0.mlp, encoder.layers.1.mlp" in capsys.readouterr().err
    with pytest.raises(UpcycleError, match="not a regular expression"):
        upcycle_cli(dense, root / "none", modules="mlp(", **QUIET)
    with pytest.raises(UpcycleError, match="--ternary"):
        upcycle_cli(dense, root / "none", ternary=True, **QUIET)
    assert not (root / "none").exists() and not (root / "x").exists()


def test_a_module_that_only_looks_like_an_mlp_is_refused():
    class Residual(nn.Module):  # fc1, activation, fc2, but its forward adds the input
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    model = nn.Sequential(Residual())
    with pytest.raises(UpcycleError, match="does not compute Linear -> activation -> Linear"):
        upcycle_modules(model, experts=2, top_k=1)
    assert isinstance(model[0], Residual)


# ------------------------------------------------------------------------------------- save, load, find

@pytest.mark.parametrize("kind", ["clip", "llava"])
def test_upcycled_model_is_safetensors_and_reloads_identically(dirs, inputs, kind):
    _, d = dirs
    moe_dir = d[kind][1]
    files = {p.name for p in moe_dir.iterdir()}
    assert {"config.json", "model.safetensors", "upcycle.json", "preprocessor_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    entry = json.loads((moe_dir / "config.json").read_text())["moe_modules"]
    make, regex = KINDS[kind]
    reference = make()
    upcycle_modules(reference, experts=4, top_k=2, modules=regex)  # what the CLI did, in memory
    assert entry == {n: {"experts": 4, "top_k": 2} for n, m in reference.named_modules() if isinstance(m, MLPMoE)}
    loaded = load_model(moe_dir)
    assert type(loaded) is type(reference)
    assert torch.equal(run(loaded, kind, inputs), run(reference, kind, inputs))

    blocks = find_moe_blocks(loaded)  # the compressor finds the experts wherever they sit
    assert [b.name for b in blocks] == [f"{n}.experts" for n in entry]
    assert all(b.num_experts == 4 and b.top_k == 2 for b in blocks)
    assert dense_linears(loaded, blocks) == {}


def compress(src, out, **over):
    base = {"model": str(src), "output": str(out), "quantization.method": "rtn", "quantization.group_size": 16}
    return api.compress(apply_overrides(Recipe(), {**base, **over}), **QUIET)


@pytest.mark.parametrize("kind", ["clip", "llava"])
def test_compress_rtn_bytes_as_predicted_and_reload_identical(dirs, inputs, kind):
    root, d = dirs
    moe_dir = d[kind][1]
    out = compress(moe_dir, root / f"{kind}-rtn")
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"]
    assert (out / "preprocessor_config.json").is_file()
    loaded = load_model(out)
    packed = find_moe_blocks(loaded)
    assert all(isinstance(b.experts, PackedExperts) and b.experts.formats() == ["int4"] * 4 for b in packed)

    # the compressed model as compress() leaves it in memory, with its unquantized tensors rounded through fp16
    model = load_model(moe_dir)
    blocks = find_moe_blocks(model)
    originals = [b.gate_up().detach().clone() for b in blocks]
    recipe = apply_overrides(Recipe(), {"quantization.method": "rtn", "quantization.group_size": 16})
    qpass = QuantizePass(model, blocks, {}, api.make_plan(recipe, model, blocks, {}, None, torch.float16), recipe)
    for i in range(len(blocks)):
        qpass(i, None, None)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v  # what the checkpoint holds
                           for k, v in model.state_dict().items()})
    assert torch.equal(run(loaded, kind, inputs), run(model, kind, inputs))
    for W, b in zip(originals, packed):  # and each packed expert is RTN of the original weights
        want = quantize_rtn(W, QuantSpec("int4", 16, False)).dequantize()
        assert all(torch.equal(b.experts.expert_weights(e)[0], want[e]) for e in range(4))


def test_budget_lp_and_ternary_without_calibration(dirs, inputs):
    root, d = dirs
    moe_dir = d["clip"][1]
    out = compress(moe_dir, root / "clip-lp", **{"allocation.budget": "2.5bits", "allocation.scope": "experts",
                                                 "allocation.formats": ["keep", "int8", "int4", "int3", "int2",
                                                                        "ternary"], "quantization.group_size": 128})
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"]
    assert plan["allocation"]["measurements"].startswith("data-free")
    expert_bytes = plan["allocation"]["expert_bytes"]
    assert expert_bytes <= plan["budget_bytes"] == 2.5 * 2 * 4 * 2 * 64 * 32 / 8
    assert len({f for fmts in plan["experts"].values() for f in fmts}) > 1  # a mixed allocation, not uniform
    assert torch.isfinite(run(load_model(out), "clip", inputs)).all()

    out = compress(moe_dir, root / "clip-ternary", **{"quantization.method": "ternary"})
    assert all(f == "ternary" for fmts in json.loads((out / "plan.json").read_text())["experts"].values() for f in fmts)
    assert torch.isfinite(run(load_model(out), "clip", inputs)).all()


def test_what_needs_calibration_inputs_is_refused_clearly(dirs):
    root, d = dirs
    with pytest.raises(UnsupportedArchitecture, match="--method rtn or --method ternary"):
        compress(d["clip"][1], root / "gptq", **{"quantization.method": "gptq"})
    with pytest.raises(UnsupportedArchitecture, match="--dynamic-pruning"):
        compress(d["clip"][1], root / "odp", **{"pruning.target": 0.3})
    assert not (root / "gptq").exists() and not (root / "odp").exists()


def test_dry_run_synthetic_plans_an_upcycled_config(dirs, tmp_path):
    _, d = dirs
    config = d["llava"][1] / "config.json"
    assert cli.main(["compress", str(config), "--dry-run", "--synthetic-stats", "--budget", "3bits",
                     "--budget-scope", "experts", "--output", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert list(plan["experts"]) == [f"{n}.experts" for n in json.loads(config.read_text())["moe_modules"]]
