"""Public entry points: compress(), evaluate_perplexity(), inspect_model()."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import prune
from .arch.view import decoder_layers, dense_linears, find_moe_blocks
from .calibration.data import check_eval_settings, eval_windows, read_text, tokenize
from .config import Recipe
from .io import checkpoint as ckpt
from .io.accounting import bytes_by_component, predict_bytes, unique_state
from .io.journal import journal_bytes
from .io.outputs import check_space, write_plan_only
from .io.models import ModelDirError, is_compressed, load_model, load_tokenizer
from .pipeline.driver import LocalDriver
from .pipeline.inputs import (DTYPES, _load_dtype, calibration_data, check_image_path, default_output,  # noqa: F401
                              image_feed, model_dir_of, model_or_default, on_image_path, streamed_model)
from .pipeline.pass1 import make_plan, measure, pinned_ternary, plan_summary, scope_bytes  # noqa: F401
from .pipeline.pass2 import MAX_SHARD_BYTES, calibrate_pruning, quantize_and_write  # noqa: F401
from .pipeline.synthetic import dry_run_synthetic, meta_model, plan_synthetic  # noqa: F401
from .plan_check import check_budget, made_for
from .runtime.experts import PackedExperts
from .targets import target


def compress(recipe: Recipe, overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False,
             log=print, driver=None) -> Path:
    """`driver`: one rank's driver under torchrun (compressor/distributed); default: this process alone."""
    t0 = time.time()
    recipe = target(recipe.allocation.target).resolve(recipe, log)
    driver = driver or LocalDriver.for_recipe(recipe)
    model_dir = model_dir_of(recipe)
    out_dir = Path(recipe.output) if recipe.output else default_output(recipe)
    if is_compressed(model_dir):
        raise ModelDirError(f"{model_dir} is already compressed by moe-compressor; compress the original model "
                            "(its path is in the compressed model's recipe.yaml)")
    stream = streamed_model(model_dir, trust_remote_code, log)
    model = stream.model if stream is not None else load_model(model_dir, _load_dtype(model_dir), trust_remote_code)
    blocks = find_moe_blocks(model)
    target(recipe.allocation.target).check_blocks(blocks)
    image_path = on_image_path(blocks)  # MoE blocks that take images (or no data), not text
    if image_path:
        check_image_path(recipe, blocks)
        driver.check(image_path)
    feed = image_feed(recipe, model, blocks, model_dir, trust_remote_code)
    tokenizer = None if image_path else load_tokenizer(model_dir, trust_remote_code)
    if recipe.pruning.target is not None:
        prune.check_prunable(blocks, recipe.pruning.target, recipe.pruning.protect)  # before the long work
    dense = dense_linears(model, blocks)
    dtype = DTYPES[recipe.dtype]
    original = {k: v.numel() * (dtype.itemsize if v.is_floating_point() else v.element_size())
                for k, v in unique_state(model).items()}
    windows = None if image_path else calibration_data(recipe, tokenizer)
    log(f"calibration: {windows.shape[0]} x {windows.shape[1]} tokens; {len(blocks)} MoE layers" if windows is not None
        else f"calibration: {feed.pixels.shape[0]} images of {tuple(feed.pixels.shape[1:])}; {len(blocks)} up-cycled "
             "MLP blocks" if feed is not None
        else f"no calibration data: {len(blocks)} up-cycled MLP blocks, compressed from their weights alone")
    if driver.is_lead:  # the one that writes
        ckpt.check_output(out_dir, model_dir, overwrite, log)  # fail before the long work, not after (dry runs too)
    plan = make_plan(recipe, model, blocks, dense, windows, dtype, stream, log, feed, driver)
    predicted = predict_bytes(model, blocks, dense, plan, dtype)
    plan.predicted_bytes, plan.made_for = sum(predicted.values()), made_for(blocks, dense)
    plan.allocation["budget_counts"] = scope_bytes(plan, predicted, blocks)
    check_budget(plan, plan.allocation["budget_counts"], recipe.allocation.plan)
    log(plan_summary(plan))
    if dry_run:
        if driver.is_lead:
            write_plan_only(plan, out_dir, model_dir, overwrite, log)
        return out_dir
    if driver.is_lead:
        check_space(out_dir, plan.predicted_bytes + journal_bytes(predicted, blocks, dense),
                    "the compressed model and pass 2's journal of finished layers")
    return quantize_and_write(recipe, model_dir, out_dir, model, stream, blocks, dense, plan, windows, feed, tokenizer,
                              image_path, original, predicted, dtype, overwrite, t0, log, driver)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows (the tail shorter than a window is dropped)."""
    windows = eval_windows(ids, seq_len)
    nll, count, t0 = 0.0, 0, time.time()
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "seconds": time.time() - t0}


def evaluate_perplexity(model_dir: Path | None, text: Path, seq_len: int = 512, batch_size: int = 4,
                        dynamic_pruning: bool = True) -> dict:
    model_dir = model_or_default(model_dir)
    check_eval_settings(seq_len, batch_size)
    text = read_text(text)  # an empty or missing text fails before the model loads
    model = load_model(model_dir, dynamic_pruning=dynamic_pruning)
    tokenizer = load_tokenizer(model_dir)
    result = perplexity(model, tokenize(tokenizer, text), seq_len, batch_size)
    result["activation"] = prune.activation_line(model)
    result["resident_bytes"] = sum(t.nbytes for t in unique_state(model).values())
    result["checkpoint_bytes"] = sum(ckpt.tensor_nbytes(model_dir).values())
    return result


def inspect_model(model_dir: Path | None) -> dict:
    model_dir = model_or_default(model_dir)
    model = load_model(model_dir, _load_dtype(model_dir))
    blocks = find_moe_blocks(model)
    dense = dense_linears(model, blocks) if not isinstance(blocks[0].experts, PackedExperts) else {}
    qc = getattr(model.config, "quantization_config", None) or {}
    dense_names = list(dense) or list(qc.get("dense", {}))
    if qc:  # the bytes as written
        sizes = ckpt.tensor_nbytes(model_dir)
    else:  # an original checkpoint, at its stored dtype
        sizes = {k: v.nbytes for k, v in unique_state(model).items()}
    return {
        "model": str(model_dir),
        "architecture": model.config.model_type,
        "layers": len(decoder_layers(model)) if not on_image_path(blocks) else None,
        "moe_layers": [b.layer_idx for b in blocks],
        "experts_per_layer": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "shared_experts": blocks[0].shared is not None,
        "bytes": bytes_by_component(sizes, [b.name + "." for b in blocks], [d + "." for d in dense_names]),
        "formats": qc.get("experts"),
    }
