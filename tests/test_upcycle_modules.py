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
from tiny import file_tensor_bytes, save_tiny

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
                     "--budget-scope", "experts", "--output", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert list(plan["experts"]) == [f"{n}.experts" for n in json.loads(config.read_text())["moe_modules"]]


# ------------------------------------------------------------------------------------- calibration images

def write_images(directory, n: int, seed: int):
    """n smooth random RGB pictures of assorted sizes (PNG, one JPEG, one grayscale): what CLIP's processor resizes,
    crops and normalises to 32 x 32."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        h, w = 36 + 4 * (k % 3), 40 + 6 * (k % 4)
        coarse = torch.rand(3, 5, 6, generator=g)
        img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
        im = Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy())
        if k == 1:
            im = im.convert("L")
        im.save(directory / f"img{k:02d}.{'jpg' if k == 2 else 'png'}")
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_images(root / "calib", 12, seed=0), write_images(root / "other", 12, seed=1)


def block_tokens(out) -> dict[str, int]:
    """Routed (token, slot) pairs per block in pass 2, from report.json."""
    report = json.loads((out / "report.json").read_text())
    return {name: sum(e["tokens"]) for layer in report["layers"] for name, e in layer["experts"].items()}


@torch.no_grad()
def output_error(model, reference, pixels) -> float:
    return float((model(pixel_values=pixels).last_hidden_state - reference).pow(2).mean())


def test_gptq_on_calibration_images_beats_rtn(dirs, images):
    """GPTQ with Hessians from calibration images, block by block: every image token reaches every block (top-2),
    and on held-out images the compressed model is closer to the original than RTN at the same format."""
    from compressor.calibration.images import image_files, load_pixels

    root, d = dirs
    moe_dir = d["clip"][1]
    calib, held = images
    out = root / "clip-gptq-images"
    assert cli.main(["compress", str(moe_dir), "--method", "gptq", "--calib-images", str(calib), "--bits", "3",
                     "--group-size", "16", "--output", str(out)]) == 0
    assert block_tokens(out) == {f"encoder.layers.{i}.mlp.experts": 12 * 17 * 2 for i in range(2)}  # 16 patches + CLS
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"]
    rtn = compress(moe_dir, root / "clip-rtn-int3", **{"quantization.bits": 3})
    pixels = load_pixels(moe_dir, image_files(held, 12, 0))
    reference = load_model(moe_dir)(pixel_values=pixels).last_hidden_state.detach()
    gptq_err, rtn_err = output_error(load_model(out), reference, pixels), output_error(load_model(rtn), reference, pixels)
    assert 0 < gptq_err < rtn_err


def test_llava_projector_and_tower_calibrated_through_get_image_features(dirs, images):
    root, d = dirs
    out = compress(d["llava"][1], root / "llava-gptq-images", **{"quantization.method": "gptq",
                                                                "calibration.images": str(images[0])})
    tokens = block_tokens(out)
    assert tokens["model.multi_modal_projector.experts"] == 12 * 16 * 2  # the CLS token is dropped before it
    assert all(tokens[f"model.vision_tower.encoder.layers.{i}.mlp.experts"] == 12 * 17 * 2 for i in range(2))
    assert file_tensor_bytes(out) == json.loads((out / "plan.json").read_text())["predicted_bytes"]


def test_budget_lp_measured_on_images_and_cached_by_their_pixels(dirs, images, tmp_path):
    root, d = dirs
    moe_dir = d["clip"][1]
    calib, other = images
    over = {"allocation.budget": "3bits", "allocation.scope": "experts", "quantization.group_size": 32,
            "allocation.formats": ["keep", "int8", "int4", "int3", "int2", "ternary"], "calibration.images": str(calib)}
    plans = []
    for k, where in enumerate((calib, calib, other)):
        out = compress(moe_dir, tmp_path / f"lp{k}", **{**over, "calibration.images": str(where)})
        plans.append(json.loads((out / "plan.json").read_text()))
        assert file_tensor_bytes(out) == plans[-1]["predicted_bytes"]
        assert plans[-1]["allocation"]["expert_bytes"] <= plans[-1]["budget_bytes"]
    assert [p["allocation"]["measurements"].split()[2].strip(",") for p in plans] == ["measured", "reused", "measured"]
    assert plans[0]["allocation"]["layer_weights"] == "output_energy"


def test_bad_calibration_images_are_refused_clearly(dirs, images, tmp_path):
    import shutil

    from compressor.calibration.images import ImageCalibrationError

    root, d = dirs
    moe_dir = d["clip"][1]
    gptq = {"quantization.method": "gptq"}
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    shutil.copytree(images[0], bad)
    (bad / "broken.png").write_bytes(b"not a picture")
    no_processor = tmp_path / "no-processor"
    shutil.copytree(moe_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    cases = [(moe_dir, tmp_path / "missing", "is not a directory"), (moe_dir, tmp_path / "empty", "no image files"),
             (moe_dir, bad, "broken.png cannot be read"), (no_processor, images[0], "no preprocessor_config.json")]
    for model, where, message in cases:
        with pytest.raises(ImageCalibrationError, match=message):
            compress(model, tmp_path / "out", **gptq, **{"calibration.images": str(where)})
    lm = save_tiny("mixtral", tmp_path / "mixtral")
    with pytest.raises(ImageCalibrationError, match="language model's, calibrated on text"):
        compress(lm, tmp_path / "out", **gptq, **{"calibration.images": str(images[0])})
    with pytest.raises(UnsupportedArchitecture, match="--dynamic-pruning"):  # calibrated on text only
        compress(moe_dir, tmp_path / "out", **{"pruning.target": 0.3, "calibration.images": str(images[0])})
    assert not (tmp_path / "out").exists()


def test_image_files_are_a_seeded_choice_in_name_order(images):
    from compressor.calibration.images import image_files

    every = image_files(images[0], 100, seed=0)
    assert [p.name for p in every] == sorted(p.name for p in images[0].iterdir())
    five = image_files(images[0], 5, seed=0)
    assert len(five) == 5 and five == sorted(five) and set(five) < set(every)
    assert five == image_files(images[0], 5, seed=0) != image_files(images[0], 5, seed=1)


def test_the_image_feed_stops_after_its_block_and_holds_it_in_fp32():
    from compressor.calibration.images import ImageCalibrationError, ImageFeed, blockwise

    class Toy(nn.Module):  # a bf16 model: pixels -> a -> block -> b; `unused` is not on its image path
        def __init__(self):
            super().__init__()
            self.a, self.block, self.b, self.unused = (nn.Linear(4, 4) for _ in range(4))
            self.calls = []

        def forward(self, pixel_values):
            self.calls.append("a")
            h = self.block(self.a(pixel_values))
            assert h.dtype == torch.bfloat16  # cast back at the block's output
            self.calls.append("b")
            return self.b(h)

    toy = Toy().to(torch.bfloat16)
    seen = []
    toy.block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, m.weight.dtype)))
    feed = ImageFeed(toy, torch.randn(10, 4))

    class Block:  # what blockwise reads of a MoEBlock
        def __init__(self, module):
            self.block, self.layer_idx = module, 0

    blockwise([Block(toy.block)], feed, lambda i, layer, inputs: inputs.run(layer))
    assert seen == [(torch.float32, torch.float32)] * 2  # two batches of 8, the block in fp32 on fp32 inputs
    assert toy.calls == ["a", "a"] and toy.block.weight.dtype == torch.bfloat16  # stopped after it; restored
    with pytest.raises(ImageCalibrationError, match="without reaching"):
        feed.until([toy.unused]).run()
