"""Calibration images for MoE blocks outside a language model: the MLPMoE blocks that `upcycle --modules` puts in a
vision tower or a projector (runtime/moe.py). Text never reaches them, so GPTQ's Hessians and pass 1's measured
errors come from images, read from a directory and prepared by the model's own image processor.

The driver is block-sequential, as `layerwise` is layer-sequential: for each block in forward order the
images run through the model as it stands (the blocks before it already quantized in pass 2), stopping right
after the block, while the pass's observers collect that block's routed tokens. Each block costs one forward of
the model up to it (two for a GPTQ-quantized pass 1); vision towers are small, the language model never runs.
The blocks being worked on are held in fp32 and run on fp32 inputs, the rest of the model in its own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .layerwise import in_fp32

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH_SIZE = 8


class ImageCalibrationError(UserError, ValueError):
    pass


def image_files(directory: str | Path, samples: int, seed: int) -> list[Path]:
    """The image files of `directory` (sorted by name); when there are more than `samples`, a seeded random
    choice of `samples` of them, in name order."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ImageCalibrationError(f"calibration images: {directory} is not a directory; pass a directory of "
                                    f"image files ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageCalibrationError(f"calibration images: no image files in {directory} (looked for "
                                    f"{', '.join(IMAGE_SUFFIXES)})")
    if len(files) > samples:
        gen = torch.Generator().manual_seed(seed)
        files = [files[i] for i in sorted(torch.randperm(len(files), generator=gen)[:samples].tolist())]
    return files


def load_pixels(model_dir: str | Path, files: Sequence[Path], trust_remote_code: bool = False) -> torch.Tensor:
    """[n, C, H, W] fp32 pixel values of `files`, prepared by the image processor saved with the model."""
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "preprocessor_config.json").is_file():
        raise ImageCalibrationError(
            f"{model_dir} has no preprocessor_config.json, so its images cannot be prepared as it was trained on them: "
            "save the model's image processor beside it (AutoImageProcessor.from_pretrained(<source>)"
            f".save_pretrained('{model_dir}'))")
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ImageCalibrationError(f"calibration image {f} cannot be read ({err}); remove it or replace it") from None
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    if not torch.isfinite(pixels).all():
        raise ImageCalibrationError(f"the image processor of {model_dir} produced NaN or inf pixel values")
    return pixels


def image_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    """How `model` runs images alone: its `get_image_features` (CLIPModel, LLaVA: vision tower + projector), else its
    forward with `pixel_values` (a CLIP vision model or image classifier)."""
    features = getattr(model, "get_image_features", None)
    if callable(features):
        return lambda pixels: features(pixel_values=pixels)
    import inspect

    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise ImageCalibrationError(f"{type(model).__name__} takes no pixel_values: calibration images need a model "
                                    "whose MoE blocks sit on its image path (a vision tower, a projector)")
    return lambda pixels: model(pixel_values=pixels)


class _Stop(Exception):
    pass


class BlockInputs:
    """The `inputs` of a pass callback for a group of MLPMoE blocks: `run(layer)` drives the calibration images
    through the model up to the last of `blocks` (`layer` is ignored: these blocks have no decoder layer)."""

    def __init__(self, feed: "ImageFeed", blocks: list[nn.Module]):
        self.feed, self.blocks = feed, blocks

    @torch.no_grad()
    def run(self, _layer: nn.Module | None = None) -> None:
        def stop(*_):
            raise _Stop

        with ExitStack() as stack:
            for block in self.blocks:
                stack.enter_context(fp32_boundary(block))
            stack.callback(self.blocks[-1].register_forward_hook(stop).remove)
            for batch in self.feed.pixels.split(BATCH_SIZE):
                try:
                    self.feed.forward(batch.to(self.feed.dtype))
                except _Stop:
                    continue
                raise ImageCalibrationError(f"the images ran through {type(self.feed.model).__name__} without reaching "
                                            "its MoE blocks; they are not on the model's image path")
        return None


class ImageFeed:
    """Calibration images [n, C, H, W] and how the model runs them."""

    def __init__(self, model: nn.Module, pixels: torch.Tensor):
        self.model, self.pixels, self.forward = model, pixels, image_forward(model)
        self.dtype = next(model.parameters()).dtype  # the model's, before any block is raised to fp32

    def until(self, blocks: list[nn.Module]) -> BlockInputs:
        return BlockInputs(self, blocks)


def blockwise(blocks, feed: ImageFeed | None, on_layer, desc: str = "blocks") -> None:
    """`on_layer(i, None, inputs)` for each group of MLPMoE blocks (`MoEBlock`s sharing `layer_idx` i) in forward
    order; inputs drive `feed`'s images up to those blocks, or are None without a feed (what needs no data)."""
    for i in tqdm(sorted({b.layer_idx for b in blocks}), desc=desc, unit="block"):
        mine = [b.block for b in blocks if b.layer_idx == i]
        with ExitStack() as stack:  # in fp32 while worked on, as layerwise holds a decoder layer
            for block in mine:
                stack.enter_context(in_fp32(block))
            on_layer(i, None, feed.until(mine) if feed is not None else None)


@contextmanager
def fp32_boundary(block: nn.Module):
    """For a block held in fp32 inside a model of another dtype: its input is raised to fp32, its output cast back."""
    dtypes: list[torch.dtype] = []

    def enter(_m, args):
        dtypes.append(args[0].dtype)
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def leave(_m, _args, out):
        return out.to(dtypes.pop())

    handles = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
