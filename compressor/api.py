"""Public entry points: compress(), evaluate_perplexity(), inspect_model()."""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import prune
from .apply_plan import QuantizePass
from .arch.families import MLP_MOE, UnsupportedArchitecture
from .arch.view import decoder_layers, dense_linears, find_moe_blocks
from .assets import CALIB_TEXT, DEFAULT_MODEL_DIR, MEASUREMENTS_DIR
from .calibration.data import calibration_windows, check_eval_settings, eval_windows, read_text, tokenize
from .calibration.images import ImageCalibrationError, ImageFeed, blockwise, image_files, load_pixels
from .calibration.layerwise import Resident, in_memory, layerwise
from .calibration.sensitivity import layer_sensitivity
from .config import Recipe, dump_recipe
from .io import checkpoint as ckpt
from .io.accounting import bytes_by_component, predict_bytes, unique_state
from .io.models import (ModelDirError, check_supported, copy_sidecars, is_compressed, load_model, load_tokenizer,
                        read_config, read_config_file)
from .io.journal import Journal, beside, journal_bytes, journal_digest
from .io.measure_cache import MeasurementCache, model_fingerprint, windows_digest
from .io.outputs import after_failure, check_space, write_plan_only
from .io.streaming import StreamedModel
from .io.report import build_report, format_report
from .measure import BlockMeasurement, MeasurePass, synthetic_measurements
from .plan import Plan
from .plan_check import check_budget, check_plan, made_for
from .planning import TernaryScan, candidate_formats, plan_budget, ternary_experts
from .runtime.experts import PackedExperts
from .runtime.moe import CONFIG_KEY as MOE_MODULES
from .targets import target
from .weight_measure import weight_measurements

MAX_SHARD_BYTES = 4 * 2**30
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
    if recipe.quantization.method == "gptq" and recipe.calibration.images is None:
        raise UnsupportedArchitecture(f"{why}, so GPTQ has no Hessians: pass --calib-images DIR (a directory of "
                                      "images), or use --method rtn or --method ternary (with --budget, the allocation "
                                      "then uses data-free weight errors)")
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


def make_plan(recipe: Recipe, model: nn.Module, blocks, dense, windows: torch.Tensor | None,
              dtype: torch.dtype, stream: StreamedModel | None = None, log=print, feed: ImageFeed | None = None) -> Plan:
    """A plan from --plan, from the budget LP over pass-1 measurements (on the calibration windows, or on
    `feed`'s images for MLPMoE blocks; data-free weight errors when there is neither: see weight_measure.py), or
    uniform. With `stream`, `model` is that streamed model's (meta device): what needs weights reads them one
    decoder layer at a time. Pass 1's measurements are reused from the measurement cache when its inputs are
    unchanged (io/measure_cache.py)."""
    q, a = recipe.quantization, recipe.allocation
    resident = stream.resident if stream is not None else in_memory
    if a.plan is not None:
        return check_plan(Plan.load(a.plan), blocks, dense, a.plan)  # made for this model, formats it can hold
    if a.budget is None:
        t = target(a.target)
        plan = Plan.uniform({b.name: b.num_experts for b in blocks}, q.expert_format,
                            t.dense_entries(dense, q.dense_bits_or_bits), group_size=q.group_size, sym=q.sym,
                            scale_dtype=q.scale_dtype, target=a.target)
        if a.target != "native":  # the target's format of --bits for each matrix width
            plan.experts = t.uniform_entries(blocks, q.bits)
        for name, flags in pinned_ternary(model, blocks, q.group_size, resident).items():  # MoTE experts stay ternary
            plan.experts[name] = ["ternary" if t else f for t, f in zip(flags, plan.experts[name])]
        return plan
    if windows is None and feed is None:
        formats = candidate_formats(a.formats, ternary_experts(blocks, q.group_size))
        plan = plan_budget(recipe, model, blocks, dense, weight_measurements(blocks, formats, q.group_size, q.sym, q.scale_dtype), dtype)
        plan.allocation["measurements"] = "data-free weight errors, uniform routing"
        return plan
    cache = MeasurementCache(MEASUREMENTS_DIR if a.reuse_measurements else None)
    measurements, ternary = cache.get_or_measure(
        model_dir_of(recipe), recipe, feed.pixels if feed is not None else windows,
        lambda journal: measure(recipe, model, blocks, windows, resident, journal, feed), log)
    sensitivity = None
    if a.objective == "global" and a.layer_weights == "sensitivity" and feed is not None:
        log("layer weights: output energy (the loss sensitivity needs a language-model loss, which images do not give)")
    elif a.objective == "global" and a.layer_weights == "sensitivity":
        head = stream.head if stream is not None else nullcontext
        some = windows[:a.sensitivity_samples]
        sensitivity = cache.get_or_compute_sensitivity(
            model_dir_of(recipe), some, lambda: layer_sensitivity(model, some, resident, head), log)
    plan = plan_budget(recipe, model, blocks, dense, measurements, dtype, ternary, sensitivity)
    plan.allocation["measurements"] = f"pass 1 {cache.outcome}"
    return plan


def measure(recipe: Recipe, model: nn.Module, blocks, windows: torch.Tensor | None, resident: Resident = in_memory,
            journal=None, feed: ImageFeed | None = None) -> tuple[list[BlockMeasurement], dict[str, list[bool]]]:
    """Pass 1 over the candidate formats, and which experts are already ternary. A streamed model's weights are
    read only during the pass, so its ternary experts are found on the way; should there be some (a MoTE
    checkpoint) while ternary was not an allowed format, the pass runs again with ternary as a candidate.
    `journal` (MeasureJournal): layers measured by an interrupted run are read from it, new ones written to it.
    With `feed`, the MLPMoE blocks are measured on its images instead of the windows."""
    q, a = recipe.quantization, recipe.allocation
    ternary = ternary_experts(blocks, q.group_size)  # none on the meta device
    while True:
        formats = candidate_formats(a.formats, ternary)
        scan = TernaryScan(blocks, q.group_size, MeasurePass(
            blocks, formats, q.group_size, q.sym, a.eps_quantizer, q.gptq_options, journal,
            per_projection=target(a.target).per_projection, scale_dtype=q.scale_dtype))
        if feed is not None:
            blockwise(blocks, feed, scan, desc="measure")
        else:
            layerwise(model, windows, scan, desc="measure", resident=resident)
        if candidate_formats(a.formats, scan.flags) == formats:
            return scan.inner.results, scan.flags
        ternary = scan.flags


def pinned_ternary(model: nn.Module, blocks, group_size: int, resident: Resident = in_memory) -> dict[str, list[bool]]:
    """The experts already ternary; on a streamed model, read one layer at a time."""
    if resident is in_memory:
        return ternary_experts(blocks, group_size)
    scan = TernaryScan(blocks, group_size)
    layerwise(model, None, scan, desc="ternary experts", resident=resident)
    return scan.flags


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


def meta_model(config: dict) -> nn.Module:
    """The architecture of a config.json on the meta device: shapes without weights."""
    from transformers import AutoConfig

    config = {k: v for k, v in config.items() if k != "quantization_config"}  # e.g. DeepSeek-V3's FP8 block format
    check_supported(config)
    return ckpt.skeleton(AutoConfig.for_model(config.pop("model_type"), **config))


def plan_synthetic(recipe: Recipe, config: dict, seed: int = 0) -> Plan:
    """A real plan and byte count for a model too large to load here: the architecture on the meta
    device, synthetic statistics (compressor.measure.synthetic_measurements). A planning check only."""
    recipe = target(recipe.allocation.target).resolve(recipe)
    model = meta_model(config)
    blocks = find_moe_blocks(model)
    target(recipe.allocation.target).check_blocks(blocks)
    if recipe.pruning.target is not None:
        prune.check_prunable(blocks, recipe.pruning.target, recipe.pruning.protect)  # before the long work
    dense = dense_linears(model, blocks)
    dtype = DTYPES[recipe.dtype]
    measurements = synthetic_measurements(blocks, list(recipe.allocation.formats), seed)
    plan = plan_budget(recipe, model, blocks, dense, measurements, dtype)
    predicted = predict_bytes(model, blocks, dense, plan, dtype)
    plan.predicted_bytes, plan.made_for = sum(predicted.values()), made_for(blocks, dense)
    plan.allocation["budget_counts"] = scope_bytes(plan, predicted, blocks)
    return plan


def dry_run_synthetic(recipe: Recipe, log=print, overwrite: bool = False) -> Plan:
    """`compress MODEL --dry-run --synthetic-stats`: MODEL is a config.json or a directory holding one."""
    path = model_dir_of(recipe)
    config = read_config_file(path) if path.is_file() else read_config(path)
    if recipe.output:
        ckpt.check_output(Path(recipe.output), path, overwrite, log)  # the rules of a real output
    plan = plan_synthetic(recipe, config)
    log(plan_summary(plan))
    if recipe.output:
        write_plan_only(plan, Path(recipe.output), path, overwrite, log)
    return plan


def plan_summary(plan: Plan) -> str:
    lines = [f"{name}: " + " ".join(f"{f} x{fmts.count(f)}" for f in sorted(set(fmts), key=fmts.index))
             for name, fmts in plan.experts.items()]
    alloc = plan.allocation
    if {"objective", "solver", "seconds", "gap", "status"} <= alloc.keys():
        lines.append(f"allocation: {alloc['objective']} via {alloc['solver']} in {alloc['seconds']} s, "
                     f"gap {alloc['gap']:.2g}, status {alloc['status']}")
    lines.append(f"formats {plan.format_counts()}; {plan.budget_line()}")
    return "\n".join(lines)


def compress(recipe: Recipe, overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False,
             log=print) -> Path:
    t0 = time.time()
    recipe = target(recipe.allocation.target).resolve(recipe, log)
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
    ckpt.check_output(out_dir, model_dir, overwrite, log)  # fail before the long work, not after (dry runs too)
    plan = make_plan(recipe, model, blocks, dense, windows, dtype, stream, log, feed)
    predicted = predict_bytes(model, blocks, dense, plan, dtype)
    plan.predicted_bytes, plan.made_for = sum(predicted.values()), made_for(blocks, dense)
    plan.allocation["budget_counts"] = scope_bytes(plan, predicted, blocks)
    check_budget(plan, plan.allocation["budget_counts"], recipe.allocation.plan)
    log(plan_summary(plan))
    if dry_run:
        write_plan_only(plan, out_dir, model_dir, overwrite, log)
        return out_dir
    check_space(out_dir, plan.predicted_bytes + journal_bytes(predicted, blocks, dense),
                "the compressed model and pass 2's journal of finished layers")
    resident = stream.kept if stream is not None else in_memory  # pass 2 keeps each layer it quantized
    data = feed.pixels if feed is not None else windows
    tmp = ckpt.prepare_output(out_dir, model_dir, overwrite, log)
    try:
        journal = Journal(beside(out_dir), journal_digest(asdict(plan), recipe, model_fingerprint(model_dir),
                                                  None if data is None else windows_digest(data)), log)
        qpass = QuantizePass(model, blocks, dense, plan, recipe, journal)
        if image_path:  # no decoder layers to walk: block by block, on the images if any (else no forward runs)
            blockwise(blocks, feed if qpass.needs_data() else None, qpass, desc="quantize")
        else:
            layerwise(model, windows if qpass.needs_data() else None, qpass, desc="quantize", resident=resident)
        if stream is not None:
            model = stream.complete()  # the LM head, read last
        rule = calibrate_pruning(recipe, model, windows, log)
        qconfig = ckpt.quantization_config(model, plan.group_size, plan.sym, prune.config_entry(rule))
        written = ckpt.save_compressed(model, tmp, dtype, qconfig, MAX_SHARD_BYTES)
        if written != plan.predicted_bytes:
            raise AssertionError(f"internal error: wrote {written} bytes, plan predicted {plan.predicted_bytes}")
        report = build_report(model_dir, original, predicted, blocks, dense, plan, qpass.reports, time.time() - t0)
        report["dynamic_pruning"] = rule.to_dict() if rule else None
        _write_sidecars(tmp, model_dir, tokenizer, plan, recipe, report)
        ckpt.commit_output(tmp, out_dir)
    except BaseException as err:
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


def scope_bytes(plan: Plan, predicted: dict[str, int], blocks) -> int:
    """The bytes the budget counts: everything (scope model) or the routed experts (scope experts)."""
    if plan.scope == "model":
        return sum(predicted.values())
    return sum(predicted[f"{b.name}.{e}"] for b in blocks for e in range(b.num_experts))


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
