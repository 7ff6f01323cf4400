"""Pass 2 and the output: the plan applied layer by layer on the quantized model's own activations (journaled, so a
killed compress resumes), online dynamic pruning calibrated on the result, and the checkpoint with its sidecars
(plan, recipe, reports) committed atomically."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import prune
from ..apply_plan import QuantizePass
from ..arch.view import find_moe_blocks
from ..calibration.images import ImageFeed, blockwise
from ..calibration.layerwise import layerwise
from ..config import Recipe, dump_recipe
from ..io import checkpoint as ckpt
from ..io.journal import Journal, beside, journal_digest
from ..io.measure_cache import model_fingerprint, windows_digest
from ..io.models import copy_sidecars
from ..io.outputs import after_failure
from ..io.report import build_report, format_report
from ..io.streaming import StreamedModel
from ..plan import Plan
from .driver import LocalDriver

MAX_SHARD_BYTES = 4 * 2**30


def quantize_and_write(recipe: Recipe, model_dir: Path, out_dir: Path, model: nn.Module, stream: StreamedModel | None,
                       blocks, dense, plan: Plan, windows: torch.Tensor | None, feed: ImageFeed | None, tokenizer,
                       image_path: bool, original: dict[str, int], predicted: dict[str, int], dtype: torch.dtype,
                       overwrite: bool, t0: float, log=print, driver=None) -> Path:
    """Pass 2 per `plan`, then the output directory, written beside and renamed into place. An interruption keeps the
    quantized layers in the journal beside the output; the same command resumes from them. `driver`
    (pipeline/driver.py; default: this process alone): with ranks, every rank quantizes its share of each layer and
    rank 0 journals and writes."""
    driver = driver or LocalDriver.for_recipe(recipe)
    resident = driver.pass2_resident(stream)  # the writer keeps each layer it quantized
    data = feed.pixels if feed is not None else windows
    tmp = ckpt.prepare_output(out_dir, model_dir, overwrite, log) if driver.is_lead else None
    try:
        journal = driver.journal(lambda: Journal(beside(out_dir), journal_digest(
            asdict(plan), recipe, model_fingerprint(model_dir), None if data is None else windows_digest(data)), log))
        qpass = QuantizePass(model, blocks, dense, plan, recipe, journal, driver=driver)
        with driver.stage("pass 2"):
            if image_path:  # no decoder layers to walk: block by block, on the images if any (else no forward runs)
                blockwise(blocks, feed if qpass.needs_data() else None, qpass, desc="quantize")
            else:
                layerwise(model, driver.windows(windows) if qpass.needs_data() else None, qpass, desc="quantize",
                          resident=resident, device=driver.device)
        shares = driver.shares()
        if not driver.is_lead:
            return out_dir  # rank 0 writes
        if stream is not None:
            model = stream.complete()  # the LM head, read last
        rule = calibrate_pruning(recipe, model, windows, log)
        qconfig = ckpt.quantization_config(model, plan.group_size, plan.sym, prune.config_entry(rule))
        written = ckpt.save_compressed(model, tmp, dtype, qconfig, MAX_SHARD_BYTES)
        if written != plan.predicted_bytes:
            raise AssertionError(f"internal error: wrote {written} bytes, plan predicted {plan.predicted_bytes}")
        report = build_report(model_dir, original, predicted, blocks, dense, plan, qpass.reports, time.time() - t0)
        report["dynamic_pruning"] = rule.to_dict() if rule else None
        report["world_size"], report["ranks"] = driver.world_size, shares
        _write_sidecars(tmp, model_dir, tokenizer, plan, recipe, report)
        ckpt.commit_output(tmp, out_dir)
    except BaseException as err:
        if tmp is not None:  # the writer's
            shutil.rmtree(tmp, ignore_errors=True)
            after_failure(err, beside(out_dir), log)  # the journal kept only if it can be resumed, and then said so
        raise
    journal.remove()
    log(format_report(report))
    log(f"wrote {out_dir}")
    return out_dir


def calibrate_pruning(recipe: Recipe, model: nn.Module, windows: torch.Tensor, log=print):
    """Online dynamic pruning thresholds for the compressed model, on the calibration windows."""
    p = recipe.pruning
    if p.target is None:
        return None
    rule = prune.calibrate(model, find_moe_blocks(model), windows, p.target, protect=p.protect,
                           renormalize=p.renormalize, layerwise=True)
    log(rule.describe())
    return rule


def _write_sidecars(directory: Path, model_dir: Path, tokenizer, plan: Plan, recipe: Recipe, report: dict) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    else:  # a model whose tokenizer / image processor the pipeline never loaded
        copy_sidecars(model_dir, directory)
    plan.save(directory / "plan.json")
    (directory / "recipe.yaml").write_text(dump_recipe(recipe))
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    (directory / "report.md").write_text(format_report(report))
