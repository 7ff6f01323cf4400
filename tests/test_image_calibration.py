"""`compress --calib-images`: the up-cycled MLP blocks of a tiny CLIP and a tiny LLaVA calibrated on images, block
by block (calibration/images.py): GPTQ Hessians and the budget LP's measured errors, and every bad input refused."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cli
from compressor.arch.families import UnsupportedArchitecture
from compressor.io.models import load_model
from test_upcycle_modules import compress, dirs  # noqa: F401 (the fixture: up-cycled tiny CLIP and LLaVA dirs)
from tiny import file_tensor_bytes, save_tiny


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
