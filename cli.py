#!/usr/bin/env python
"""moe-compressor command line: compress, eval, inspect, upcycle, export. Thin: parse, build the recipe, call compressor.api.

Every flag of `compress` maps onto one field of the recipe schema (compressor/config/schema.py), where
its default lives; a flag overrides the recipe file given with --recipe.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

# flag dest -> recipe field (dotted path)
FLAG_FIELDS = {
    "model": "model",
    "output": "output",
    "dtype": "dtype",
    "method": "quantization.method",
    "bits": "quantization.bits",
    "group_size": "quantization.group_size",
    "sym": "quantization.sym",
    "act_order": "quantization.act_order",
    "damp": "quantization.damp",
    "dense_bits": "quantization.dense_bits",
    "calib": "calibration.text",
    "calib_images": "calibration.images",
    "samples": "calibration.samples",
    "seq_len": "calibration.seq_len",
    "seed": "calibration.seed",
    "calib_mode": "calibration.mode",
    "min_tokens": "calibration.min_tokens",
    "budget": "allocation.budget",
    "budget_scope": "allocation.scope",
    "formats": "allocation.formats",
    "target": "allocation.target",
    "objective": "allocation.objective",
    "solver": "allocation.solver",
    "eps_quantizer": "allocation.eps_quantizer",
    "layer_weights": "allocation.layer_weights",
    "plan": "allocation.plan",
    "reuse_measurements": "allocation.reuse_measurements",
    "dynamic_pruning": "pruning.target",
    "device": "execution.device",
    "hessians": "execution.hessians",
    "dist_timeout": "execution.timeout",
}


def _choices(dest: str) -> list:
    from compressor.config.schema import field_choices

    return field_choices(FLAG_FIELDS[dest])


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a model (default: the shipped default model)",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help="model directory (default: the shipped default model)")
    p.add_argument("--recipe", help="recipe YAML; flags override it")
    p.add_argument("--output", "-o", help="output directory (default: named after the model and settings, in .)")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace an existing output directory")
    p.add_argument("--method", choices=_choices("method"),
                   help="gptq (default), imatrix (round-to-nearest on scales fitted to the calibration inputs, "
                        "llama.cpp's importance matrix; a fraction of GPTQ's time), rtn (no data), ternary")
    p.add_argument("--bits", type=int, choices=_choices("bits"), help="uniform expert bits (default 4)")
    p.add_argument("--dense-bits", type=int, choices=_choices("dense_bits"), help="bits of shared experts / dense FFNs")
    p.add_argument("--group-size", type=int)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true")
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--damp", type=float)
    p.add_argument("--calib", help="calibration text file (default: the shipped calibration corpus)")
    p.add_argument("--calib-images", metavar="DIR", help="calibration images for up-cycled vision / projector MoE "
                   "blocks (enables GPTQ and measured errors there; default: data-free)")
    p.add_argument("--samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--calib-mode", choices=_choices("calib_mode"))
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--budget", help="e.g. 3.4GB, 3.4GiB, 512MB, 2.5bits")
    p.add_argument("--budget-scope", choices=_choices("budget_scope"))
    p.add_argument("--formats", type=lambda s: s.split(","), help="allowed formats, e.g. keep,int4,int3,int2")
    p.add_argument("--target", choices=_choices("target"),
                   help="where the model will run: native (default; a format per expert), gguf (llama.cpp: one ggml "
                        "type per layer and projection), vllm (symmetric int4/int8, group 128, one per layer)")
    p.add_argument("--objective", choices=_choices("objective"))
    p.add_argument("--solver", choices=_choices("solver"))
    p.add_argument("--eps-quantizer", choices=_choices("eps_quantizer"),
                   help="quantizer behind the per-expert output-error table (default rtn; imatrix or gptq: per-expert Hessians "
                        "first, closer to what --method imatrix or gptq applies)")
    p.add_argument("--layer-weights", choices=_choices("layer_weights"),
                   help="how the global LP compares errors across layers (default sensitivity: measured loss "
                        "sensitivity of each layer, one more forward and backward)")
    p.add_argument("--plan", help="reuse a plan.json")
    p.add_argument("--no-measurement-cache", dest="reuse_measurements", action="store_false",
                   help="measure pass 1 again instead of reusing (and keeping) cached measurements")
    p.add_argument("--dry-run", action="store_true", default=False, help="stop after the plan")
    p.add_argument("--synthetic-stats", action="store_true", default=False,
                   help="with --dry-run: plan from the config alone (meta device, synthetic statistics), for models "
                        "too large to load; MODEL may be a config.json")
    p.add_argument("--dynamic-pruning", type=float, help="target fraction of activated expert parameters to skip")
    p.add_argument("--dtype", choices=_choices("dtype"), help="dtype of unquantized tensors written")
    p.add_argument("--trust-remote-code", action="store_true", default=False)
    p.add_argument("--device", choices=_choices("device"),
                   help="device each decoder layer is worked on, one at a time (default cpu; cuda is untested)")
    p.add_argument("--hessians", choices=_choices("hessians"), help="keep GPTQ's Hessians on the device (default) or in "
                   "CPU memory")
    p.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="torchrun: seconds to wait for another rank before stopping with an error naming it")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of an original or compressed model")
    p.add_argument("model", nargs="?", help="model directory (default: the shipped default model)")
    p.add_argument("--ppl", help="text file: perplexity over non-overlapping windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (local task files)")
    p.add_argument("--limit", type=int, help="examples per task")
    p.add_argument("--output-path", help="write lm-eval results JSON here")
    p.add_argument("--no-dynamic-pruning", dest="dynamic_pruning", action="store_false",
                   help="ignore the dynamic-pruning rule saved with a compressed model")


def _upcycle_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense Llama-style model into an MoE (CuMo), or a MoTE with --ternary; "
                                       "in any other model (CLIP vision, LLaVA) up-cycle its two-layer MLPs")
    p.add_argument("model", help="dense model directory")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, help="default: 1 with a shared expert (MoTE), else 2")
    p.add_argument("--ternary", action="store_true", help="routed experts train with ternary weights (STE)")
    p.add_argument("--shared-expert", action="store_true", help="the pretrained FFN becomes a shared expert")
    p.add_argument("--train-text", help="text file to train on after up-cycling")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--modules", help="regex (re.search) over module names selecting the MLPs to up-cycle: "
                                     "model.layers.<i>.mlp of a Llama; any two-layer MLP elsewhere, e.g. "
                                     "'encoder\\.layers\\.\\d+\\.mlp' (CLIP) or 'multi_modal_projector' (LLaVA)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--group-size", type=int, default=argparse.SUPPRESS,
                   help="weights per ternary scale along a row (default: the toolkit's group size, as compress); "
                        "256 makes the experts TQ1_0/TQ2_0 blocks, exported to GGUF exactly (--target gguf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze-shared", action="store_true", help="keep the shared expert frozen (MoTE)")
    p.add_argument("--drop-ratio", type=float, default=0.0,
                   help="Drop-Upcycling: re-initialise this share of each routed expert's neurons (then train)")
    p.add_argument("--overwrite", action="store_true")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill / decode speed and memory of a compressed model against its original")
    p.add_argument("model", nargs="?", help="compressed model directory")
    p.add_argument("--original", help="the uncompressed model (default: recipe.yaml's model)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, help="default: OMP_NUM_THREADS or the CPU count")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per model")
    p.add_argument("--no-dynamic-pruning", dest="dynamic_pruning", action="store_false")
    p.add_argument("--no-float32-original", dest="float32_original", action="store_false",
                   help="the original in its 16-bit dtype only (loading it in float32 needs twice the memory)")
    p.add_argument("--json", help="write the full report here")


def _run_bench(args: argparse.Namespace) -> None:
    import json

    from compressor.api import model_or_default
    from compressor.runtime.bench import bench, format_report

    report = bench(model_or_default(args.model), args.original, args.prompt_len, args.gen_len, args.batch,
                   args.threads, args.repeats, args.dynamic_pruning, args.float32_original)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_report(report))


def _run_upcycle(args: argparse.Namespace) -> None:
    from compressor.upcycle import upcycle_cli

    kwargs = {k: getattr(args, k) for k in ("experts", "top_k", "ternary", "shared_expert", "train_text", "steps",
                                            "lr", "modules", "batch_size", "seq_len", "checkpoint_every",
                                            "group_size", "seed", "overwrite", "freeze_shared", "drop_ratio")
              if hasattr(args, k)}  # --group-size given or not: its default is upcycle_cli's
    print(f"wrote {upcycle_cli(args.model, args.output, **kwargs)}")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a compressed model in a layout another runtime loads: GGUF (llama.cpp) "
                                      "or compressed-tensors (vLLM, SGLang)")
    p.add_argument("model", help="a compressed model directory (the output of compress)")
    p.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"])
    p.add_argument("--output", "-o", help="default: beside the model, <name>.gguf or <name>-compressed-tensors/")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--accept-differences", action="store_true",
                   help="gguf: export a model llama.cpp computes differently from transformers (PhiMoE), with a "
                        "warning naming each difference; refused otherwise")


def _run_export(args: argparse.Namespace) -> None:
    from compressor.export import export

    path, summary = export(args.model, args.format, args.output, args.overwrite,
                           accept_differences=args.accept_differences)
    if "bytes_by_type" in summary:
        print("tensor bytes by type: " + ", ".join(f"{t} {n:,}" for t, n in summary["bytes_by_type"].items()))
    if "layers" in summary:  # compressed-tensors
        print(f"MoE layers by scheme: {', '.join(f'{s} {n}' for s, n in summary['layers'].items())}; "
              f"{summary['tensor_bytes']:,} tensor bytes")
    print(f"wrote {path}")


def build_recipe(args: argparse.Namespace):
    from compressor.config import Recipe, apply_overrides, load_recipe

    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else Recipe()
    given = {FLAG_FIELDS[k]: v for k, v in vars(args).items() if k in FLAG_FIELDS and v is not None}
    return apply_overrides(recipe, given) if given else recipe


def _run_tasks(args: argparse.Namespace) -> None:
    from compressor.api import model_or_default
    from compressor.errors import SettingError
    from compressor.io.models import load_model, load_tokenizer

    if args.limit is not None and args.limit < 1:
        raise SettingError(f"--limit {args.limit}: at least 1 example per task")
    from evals.lm_eval_runner import format_table, run_tasks  # the optional eval extra

    from compressor.prune import activation_line

    model_dir = model_or_default(args.model)
    model = load_model(model_dir, dynamic_pruning=args.dynamic_pruning)
    results = run_tasks(model, load_tokenizer(model_dir), args.tasks.split(","), args.limit, args.batch_size,
                        args.output_path)
    print(format_table(results))
    print(activation_line(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _eval_parser(sub)
    _upcycle_parser(sub)
    _bench_parser(sub)
    _export_parser(sub)
    sub.add_parser("inspect", help="architecture, experts, bytes by component, formats").add_argument(
        "model", nargs="?", help="model directory (default: the shipped default model)")
    args = parser.parse_args(argv)

    from compressor import api
    from compressor.distributed import launched
    from compressor.io.report import format_inspect

    try:
        if args.command == "compress" and args.synthetic_stats:
            if not args.dry_run:
                parser.error("--synthetic-stats plans only; add --dry-run")
            api.dry_run_synthetic(build_recipe(args), overwrite=args.overwrite)
        elif args.command == "compress":
            compress = api.compress
            if launched():  # one rank of a torchrun launch
                from compressor.distributed.launch import compress_as_rank as compress
            compress(build_recipe(args), overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                     dry_run=args.dry_run)
        elif args.command == "eval":
            if not args.ppl and not args.tasks:
                parser.error("eval needs --ppl FILE and/or --tasks LIST")
            if args.ppl:
                r = api.evaluate_perplexity(args.model, Path(args.ppl), args.seq_len, args.batch_size,
                                            args.dynamic_pruning)
                print(f"perplexity: {r['perplexity']:.4f}  ({r['tokens']} tokens, {r['seconds']:.1f} s)")
                print(f"model tensors in memory: {r['resident_bytes']:,} bytes; in the checkpoint: "
                      f"{r['checkpoint_bytes']:,} bytes (unquantized tensors in {r['dtype']}; experts packed)")
                print(r["activation"])
            if args.tasks:
                _run_tasks(args)
        elif args.command == "upcycle":
            _run_upcycle(args)
        elif args.command == "bench":
            _run_bench(args)
        elif args.command == "export":
            _run_export(args)
        elif args.command == "inspect":
            print(format_inspect(api.inspect_model(args.model)))
    except Exception as err:  # noqa: BLE001 (the one error boundary of every command)
        return report_error(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def report_error(err: Exception) -> int:
    """What the user can fix (compressor.errors.UserError, or the environment: a full disk, a read-only location) is
    one `error:` paragraph, exit 2; anything else is a bug: its traceback, said to be one, exit 1."""
    from compressor.errors import UserError, environment_error

    user = err if isinstance(err, UserError) else environment_error(err)
    if user is not None:
        print(f"error: {user}", file=sys.stderr)
        return 2
    traceback.print_exc()
    print(f"error: internal error ({type(err).__name__}): this is a bug in moe-compressor, not a problem with your "
          "input; please report it with the command line and the traceback above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
