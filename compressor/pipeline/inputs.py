"""What compress works on: the model (streamed one decoder layer at a time, or loaded whole), the dtype it is held
in, and its calibration data (token windows; images for up-cycled MLP blocks on a model's image path)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..arch.families import MLP_MOE, UnsupportedArchitecture
from ..assets import CALIB_TEXT, DEFAULT_MODEL_DIR
from ..calibration.data import calibration_windows, read_text, tokenize
from ..calibration.images import ImageCalibrationError, ImageFeed, image_files, load_pixels
from ..config import Recipe
from ..io.models import check_supported, read_config
from ..io.streaming import StreamedModel
from ..runtime.moe import CONFIG_KEY as MOE_MODULES

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def model_or_default(model_dir: str | Path | None) -> Path:
    """The model directory (`~` expanded, so a shared recipe can name one in the cache), or the default model."""
    return Path(model_dir).expanduser() if model_dir else DEFAULT_MODEL_DIR


def model_dir_of(recipe: Recipe) -> Path:
    return model_or_default(recipe.model)


def default_output(recipe: Recipe) -> Path:
    q, a = recipe.quantization, recipe.allocation
    what = f"budget-{a.budget}-{a.scope}" if a.budget else f"{q.method}-{q.expert_format}"
    return Path.cwd() / f"{model_dir_of(recipe).name}-{what}-g{q.group_size}{'-sym' if q.sym else ''}"


def _load_dtype(model_dir: Path) -> torch.dtype:
    """Hold the model in its 16-bit checkpoint dtype; each layer is raised to fp32 while it is worked on."""
    config = read_config(model_dir)
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPES.get(name, torch.float32)


def calibration_data(recipe: Recipe, tokenizer) -> torch.Tensor:
    c = recipe.calibration
    ids = tokenize(tokenizer, read_text(c.text or CALIB_TEXT))
    return calibration_windows(ids, c.samples, c.seq_len, c.seed)


def on_image_path(blocks) -> bool:
    """MLPMoE blocks (upcycle --modules: a vision tower's MLPs, a projector) are not driven by the calibration
    text, which runs the decoder layers of the supported MoE language models: they are calibrated on images
    (calibration.images) or compressed without data."""
    return blocks[0].family is MLP_MOE


def check_image_path(recipe: Recipe, blocks) -> None:
    """What needs calibration inputs these blocks do not have is refused with the alternative, never run on
    made-up data: GPTQ without calibration images, and online dynamic pruning (calibrated on text only)."""
    names = ", ".join(b.name for b in blocks[:2]) + (", ..." if len(blocks) > 2 else "")
    why = f"this model's MoE blocks ({names}) are up-cycled MLPs on its image path, which calibration text does not reach"
    if recipe.quantization.data_method is not None and recipe.calibration.images is None:
        raise UnsupportedArchitecture(f"{why}, so --method {recipe.quantization.method} has no Hessians: pass "
                                      "--calib-images DIR (a directory of images), or use --method rtn or --method "
                                      "ternary (with --budget, the allocation then uses data-free weight errors)")
    if recipe.pruning.target is not None:
        raise UnsupportedArchitecture(f"{why}, so --dynamic-pruning cannot be calibrated (it is calibrated on text)")


def image_feed(recipe: Recipe, model: nn.Module, blocks, model_dir: Path, trust_remote_code: bool = False
               ) -> ImageFeed | None:
    """The calibration images of `recipe` prepared for the model, or None when it names none. Images are for MoE
    blocks on the image path only: for a language model's MoE blocks they are refused."""
    c = recipe.calibration
    if c.images is None:
        return None
    if not on_image_path(blocks):
        raise ImageCalibrationError(f"--calib-images: the MoE blocks of {model_dir} ({blocks[0].name}, ...) are a "
                                    "language model's, calibrated on text (--calib); images are for up-cycled vision "
                                    "tower or projector MLPs")
    files = image_files(c.images, c.samples, c.seed)
    return ImageFeed(model, load_pixels(model_dir, files, trust_remote_code))


def streamed_model(model_dir: Path, trust_remote_code: bool, log=print) -> StreamedModel | None:
    """The model streamed from disk one decoder layer at a time: pass 1 reads each layer and releases it, pass 2
    reads each layer and keeps it quantized, so the 16-bit model is never whole in memory. None (with the reason
    logged): the model is loaded whole."""
    config = read_config(model_dir)
    check_supported(config, model_dir / "config.json")
    why = ("it holds up-cycled MLP blocks (not in decoder layers: worked on block by block)" if MOE_MODULES in config
           else "--trust-remote-code (streaming builds transformers' own model classes)" if trust_remote_code
           else "its config.json has a quantization_config" if config.get("quantization_config") else None)
    if why:
        log(f"loading the whole model: {why}")
        return None
    return StreamedModel(model_dir, _load_dtype(model_dir))
