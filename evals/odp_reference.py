"""Online dynamic pruning where it can lose: the curve on a reference MoE whose experts differ in weight
(`reference-moe-drop`), on its 16-bit model and on the budget suite's global-LP models (issue 22).

    python -m evals.odp_reference --model ~/.cache/moe-compressor/reference-moe-drop [--runs DIR] \\
        --points 2.5b,3.25b --stages compress,curves,walltime,tasks,ablations --tasks piqa,arc_easy --limit 500

Stages, in the order given; every finished measurement is written at once to evals/results/odp_<model>.json and
skipped when the command runs again, so an interrupted campaign resumes where it stopped:
  compress   the budget suite's `<point>-global` models (evals/compare.py: sensitivity-weighted global LP, GPTQ,
             expert budget = the bytes uniform GPTQ writes at that point), into --runs/<point>-global
  curves     perplexity on the first --max-tokens of each held-out text (windows of --seq-len) and the reduction
             of activated routed-expert parameters measured on those texts, unpruned and at each --targets value,
             for the three rules of the README: calibrated per-layer betas (compressor.prune's default), one beta
             for every layer (MC-MoE's fixed beta, calibrated to the same target) and random dropping
  walltime   prefill (1 x --prefill-len tokens) and teacher-forced decode steps on the KV cache (batch 1, one
             thread), unpruned against pruned at --task-targets, configurations interleaved, medians of wall and
             CPU seconds. The 16-bit model: transformers' experts module unpruned, our skipping loop over the same
             weights pruned; compressed models: the packed runtime (compressor/runtime: packed kernels, tokens
             grouped by expert, a pruned slot never computed), the same runtime `cli.py bench` measures
  tasks      lm-eval accuracy with its standard error and the per-example outcomes (for paired differences),
             unpruned and at --task-targets for each rule in --task-methods
  ablations  the calibrated rule at --ablation-targets with one setting changed: kept weights not renormalised,
             importance input_norm or MC-MoE's attention x norm (eager attention), no or 10% protected tokens

Rules are calibrated on --samples windows of the calibration text (the budget suite's +odp rows use the same),
from one pass that records every token's signal and routing ratios (compressor.prune.collect).
`python -m evals.odp_reference --model ... --report` rewrites the markdown summary from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from compressor import api, prune
from compressor.arch.view import find_moe_blocks
from compressor.assets import HELDOUT_TEXTS
from compressor.calibration.data import read_text, tokenize
from compressor.config import Recipe, apply_overrides
from compressor.io.accounting import expert_matrix_bytes
from compressor.io.models import load_model, load_tokenizer, read_config
from evals import compare
from evals.odp_report import write_report

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("compress", "curves", "walltime", "tasks", "ablations")
# the three rules of the curve: keyword arguments of compressor.prune.calibrate
METHODS = {"calibrated": {}, "fixed-beta": {"allocation": "global"}, "random": {"method": "random"}}
# one setting of the calibrated rule changed at a time
ABLATIONS = {"no-renormalize": {"renormalize": False}, "input_norm": {"importance": "input_norm"},
             "attention": {"importance": "attention"}, "protect-0": {"protect": 0.0}, "protect-10%": {"protect": 0.1}}


def key(model: str, method: str, target: float) -> str:
    return f"{model}|{method}|{target:.2f}"


class Store:
    """The campaign's JSON, rewritten atomically after every measurement."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("settings", settings)
        for section in ("models", "points", "walltime"):
            self.data.setdefault(section, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def uniform_expert_bytes(model_dir: Path, tag: str) -> int:
    """Expert bytes of the budget suite's uniform point `tag` (what uniform GPTQ writes there), from shapes alone."""
    bits, group = compare.BUDGET_POINTS[tag]
    blocks = find_moe_blocks(api.meta_model(read_config(model_dir)))
    sym = Recipe().quantization.sym
    return sum(expert_matrix_bytes(b, f"int{bits}", group, sym) for b in blocks for _ in range(b.num_experts))


def compress_point(model_dir: Path, runs: Path, tag: str, calibration: dict, store: Store) -> None:
    name = f"{tag}-global"
    directory = runs / name
    if not (directory / "report.json").exists():
        overrides = dict(compare.budget_suite((tag,))[name])
        overrides["allocation.budget"] = str(uniform_expert_bytes(model_dir, tag))
        recipe = apply_overrides(Recipe(), {"model": str(model_dir), "output": str(directory), **calibration,
                                            **overrides})
        print(f"compressing {name} (expert budget {overrides['allocation.budget']} bytes)", flush=True)
        api.compress(recipe, overwrite=True, log=lambda *_: None)
    report = json.loads((directory / "report.json").read_text())
    store.data["models"][name] = {"dir": str(directory), "expert_bytes": compare.expert_bytes(directory),
                                  "budget_bytes": uniform_expert_bytes(model_dir, tag),
                                  "total_bytes": report["total_compressed"], "compress_seconds": report["seconds"]}
    store.save()


class Subject:
    """One model under test: loaded once, its calibration signals collected once per importance signal."""

    def __init__(self, name: str, directory: Path, calibration: dict):
        self.name, self.dir = name, directory
        self.model = load_model(directory, dynamic_pruning=False)
        self.tok = load_tokenizer(directory)
        self.blocks = find_moe_blocks(self.model)
        self.windows = api.calibration_data(apply_overrides(Recipe(), calibration), self.tok)
        self._collected: dict[str, prune.PruneHandle] = {}

    def rule(self, method: str, target: float, **kw) -> prune.PruningRule | None:
        if target == 0:
            return None
        kw = {**METHODS[method], **kw}
        importance = kw.get("importance", "residual_norm")
        if importance not in self._collected:
            with eager(self.model, importance == "attention"):
                self._collected[importance] = prune.collect(self.model, self.blocks, self.windows, importance)
        return prune.calibrate(self.model, self.blocks, None, target, collected=self._collected[importance], **kw)

    def pruned(self, rule):
        return prune.apply(self.model, self.blocks, rule) if rule is not None else nullcontext()


class eager:
    """Eager attention while MC-MoE's attention signal needs the attention maps (SDPA returns none)."""

    def __init__(self, model, on: bool):
        self.model, self.on = model, on

    def __enter__(self):
        if self.on:
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        if self.on:
            self.model.set_attn_implementation("sdpa")


def rule_summary(rule: prune.PruningRule | None) -> dict:
    if rule is None:
        return {}
    vals = list((rule.drop_prob if rule.kind == "random" else rule.betas).values())
    return {"kind": rule.kind, "allocation": rule.meta.get("allocation"), "renormalize": rule.renormalize,
            "importance": rule.importance, "protect": rule.protect,
            "calibration_reduction": rule.meta.get("calibration_reduction"),
            ("drop_prob" if rule.kind == "random" else "beta"): {"min": round(min(vals), 4),
                                                                  "median": round(statistics.median(vals), 4),
                                                                  "max": round(max(vals), 4)}}


def perplexity_point(s: Subject, rule, args) -> dict:
    t0 = time.time()
    with eager(s.model, rule is not None and rule.importance == "attention"), s.pruned(rule) as h:
        ppl = compare.evaluate_model(s.model, s.tok, args.max_tokens, args.seq_len)
        st = h.stats() if h is not None else None
    point = {"ppl": ppl, "mean": round(statistics.mean(ppl.values()), 4), "rule": rule_summary(rule),
             "reduction": round(st["reduction"], 5) if st else 0.0,
             "protected_fraction": round(st["protected_fraction"], 5) if st else 0.0,
             "seconds": round(time.time() - t0, 1)}
    if st:
        red = [v["reduction"] for v in st["per_layer"].values()]
        point["per_layer_reduction"] = {"min": round(min(red), 4), "max": round(max(red), 4)}
    return point


def task_scores(s: Subject, rule, tasks: list[str], limit: int) -> dict:
    """lm-eval's accuracy and standard error per task, with each example's outcome ("1"/"0", in doc order)."""
    from evals.lm_eval_runner import run_tasks

    t0 = time.time()
    with s.pruned(rule) as h:
        res = run_tasks(s.model, s.tok, tasks, limit=limit, batch_size=16, log_samples=True)
        st = h.stats() if h is not None else None
    out = {}
    for name, r in res["results"].items():
        samples = sorted(res["samples"][name], key=lambda x: x["doc_id"])
        out[name] = {"acc": round(r["acc,none"], 5), "stderr": round(r["acc_stderr,none"], 5), "n": len(samples),
                     "correct": "".join(str(int(x["acc"])) for x in samples)}
    return {"tasks": out, "task_reduction": round(st["reduction"], 5) if st else 0.0,
            "task_seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def time_configs(s: Subject, rules: dict, ids: torch.Tensor, prefill_len: int, context: int, steps: int,
                 reps: int) -> dict:
    """Median wall and CPU seconds of a prefill of `prefill_len` tokens and of `steps` decode steps after a
    `context`-token prompt, batch 1, the configurations interleaved in every repetition (load changes hit all
    alike); the decode steps are teacher-forced on the same text, so every configuration computes the same tokens."""
    prefill, prompt = ids[None, :prefill_len], ids[None, :context]
    follow = ids[context:context + steps]
    times = {name: {"prefill_wall": [], "prefill_cpu": [], "decode_wall": [], "decode_cpu": []} for name in rules}
    reduction = {}
    for rep in range(reps + 1):  # repetition 0 warms up
        for name, rule in rules.items():
            with s.pruned(rule) as h:
                w, c = time.perf_counter(), time.process_time()
                s.model(input_ids=prefill, use_cache=False)
                pw, pc = time.perf_counter() - w, time.process_time() - c
                cache = s.model(input_ids=prompt, use_cache=True).cache
                if h is not None:
                    h.reset_stats()
                w, c = time.perf_counter(), time.process_time()
                for tok in follow:
                    cache = s.model(input_ids=tok.view(1, 1), cache=cache, use_cache=True).cache
                dw, dc = time.perf_counter() - w, time.process_time() - c
                if h is not None:
                    reduction[name] = round(h.stats()["reduction"], 4)
            if rep:
                for k, v in zip(times[name], (pw, pc, dw / steps, dc / steps)):
                    times[name][k].append(v)
    out = {name: {k: round(statistics.median(v), 5) for k, v in t.items()} for name, t in times.items()}
    for name in rules:
        out[name]["decode_reduction"] = reduction.get(name, 0.0)
    return out


def subjects(args, store: Store) -> list[tuple[str, Path]]:
    out = [("bf16", args.model)] if "bf16" in args.models else []
    for tag in args.points:
        if f"{tag}-global" not in args.models:
            continue
        info = store.data["models"].get(f"{tag}-global")
        if info is None:
            print(f"no {tag}-global model yet (stage compress): skipped")
            continue
        out.append((f"{tag}-global", Path(info["dir"])))
    return out


def run_stage(stage: str, args, store: Store) -> None:
    if stage == "compress":
        for tag in args.points:
            compress_point(args.model, args.runs, tag, args.calibration, store)
        return
    points = store.data["points"]
    for name, directory in subjects(args, store):
        todo = plan_stage(stage, name, args, store)
        if not todo:
            continue
        print(f"{stage} on {name}: {len(todo)} measurement(s)", flush=True)
        s = Subject(name, directory, args.calibration)
        if stage == "walltime":
            rules = {"unpruned": None}
            rules.update({f"calibrated {t:.0%}": s.rule("calibrated", t) for t in args.task_targets})
            ids = tokenize(s.tok, read_text(HELDOUT_TEXTS["pydocs"]))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                res = time_configs(s, rules, ids, args.prefill_len, args.context, args.decode_steps, args.reps)
            finally:
                torch.set_num_threads(threads)
            store.data["walltime"][name] = {"configs": res, "threads": 1, "prefill_len": args.prefill_len,
                                            "context": args.context, "decode_steps": args.decode_steps,
                                            "reps": args.reps, "loadavg_after": os.getloadavg()}
            store.save()
            print(f"  walltime {name}: {json.dumps(res)}", flush=True)
            continue
        for k, method, target, extra in todo:
            rule = s.rule(method.split(":")[0], target, **extra)
            if stage == "tasks":
                points[k].update(task_scores(s, rule, args.tasks, args.limit))
                points[k]["task_limit"] = args.limit
                got = {t: v["acc"] for t, v in points[k]["tasks"].items()}
            else:
                points[k] = perplexity_point(s, rule, args)
                got = (points[k]["mean"], points[k]["reduction"])
            store.save()
            print(f"  {k}: {got}", flush=True)
        del s


def plan_stage(stage: str, name: str, args, store: Store) -> list[tuple[str, str, float, dict]]:
    """(key, method, target, extra calibrate kwargs) still to measure in `stage` for model `name`."""
    points = store.data["points"]
    if stage == "walltime":
        return [] if name in store.data["walltime"] else [("walltime", "", 0.0, {})]
    if stage == "curves":
        want = [(key(name, "none", 0.0), "calibrated", 0.0, {})]
        want += [(key(name, m, t), m, t, {}) for m in args.methods for t in args.targets]
        return [w for w in want if w[0] not in points]
    if stage == "tasks":
        want = [(key(name, "none", 0.0), "calibrated", 0.0, {})]
        want += [(key(name, m, t), m, t, {}) for m in args.task_methods for t in args.task_targets]
        return [w for w in want if w[0] in points and "tasks" not in points[w[0]]]
    if stage == "ablations":
        want = [(key(name, f"calibrated:{a}", t), f"calibrated:{a}", t, kw)
                for t in args.ablation_targets for a, kw in ABLATIONS.items()]
        return [w for w in want if w[0] not in points]
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="the 16-bit reference MoE")
    p.add_argument("--runs", type=Path, default=Path(__file__).resolve().parent / "runs" / "odp",
                   help="where the compressed models are written (default evals/runs/odp)")
    p.add_argument("--points", default="2.5b,3.25b", help=f"budget points among {', '.join(compare.BUDGET_POINTS)}")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--models", default="", help="models to measure: bf16 and <point>-global (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help="rules of the curves stage")
    p.add_argument("--targets", default="0.1,0.2,0.3,0.4")
    p.add_argument("--task-targets", default="0.2,0.3")
    p.add_argument("--task-methods", default="calibrated", help=f"rules evaluated on tasks, among {', '.join(METHODS)}")
    p.add_argument("--ablation-targets", default="0.2")
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=500, help="examples per task")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (compression and pruning)")
    p.add_argument("--calibration", default="{}", help="more calibration settings for the pruning rules, as JSON")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default evals/results/odp_<model>.json)")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown summary from the JSON")
    a = p.parse_args(argv)
    a.model = a.model.expanduser()
    a.points = [t for t in a.points.split(",") if t]
    a.targets, a.task_targets, a.ablation_targets = floats(a.targets), floats(a.task_targets), floats(a.ablation_targets)
    a.task_methods = [m for m in a.task_methods.split(",") if m]
    a.methods = [m for m in a.methods.split(",") if m]
    a.models = [m for m in a.models.split(",") if m] or ["bf16"] + [f"{t}-global" for t in a.points]
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.calibration = {"calibration.samples": a.samples, **json.loads(a.calibration)}
    unknown = [m for m in a.task_methods + a.methods if m not in METHODS] + [s for s in a.stages.split(",") if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown rule or stage {unknown}: rules {list(METHODS)}, stages {list(STAGES)}")
    out = a.out or RESULTS / f"odp_{a.model.name}.json"
    settings = {"model": str(a.model), "max_tokens": a.max_tokens, "seq_len": a.seq_len, "calibration_samples": a.samples,
                "texts": list(HELDOUT_TEXTS)}
    store = Store(out, settings)
    if not a.report:
        torch.manual_seed(0)
        for stage in a.stages.split(","):
            t0 = time.time()
            run_stage(stage, a, store)
            print(f"stage {stage}: {time.time() - t0:.0f} s; load average {os.getloadavg()}", flush=True)
    write_report(store.data, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
