"""Our `--target gguf` plans against llama.cpp's own quantization at equal expert bytes, on the reference MoE
(issue 18, "Compare"). Evals, never CI: needs the llama.cpp build of evals/llamacpp.py.

    nohup python -m evals.llamacpp_compare > /work/logs/llcmp-run.log 2>&1 &      # every step, resumes
    python -m evals.llamacpp_compare --steps report                              # table and plot only
    python -m evals.llamacpp_compare --steps compress,ppl --points Q2_K,Q4_K_M --rows llama-Q2_K,ours-Q2_K
                                                                                 # a part of it

Rows (files under --runs, default /work/runs/llcmp; results in evals/results/llamacpp_compare.json, .md, .png):
  f16          the model's F16 GGUF (`cli.py compress REF --target gguf --bits 16 --method rtn`, then export)
  llama-Q      `llama-quantize --imatrix` of the F16 GGUF to Q (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M, IQ2_XS): only the
               routed experts are quantized (attention kept F16 by --tensor-type, token embedding and output by
               their own flags; checked on the file). The importance matrix comes from `llama-imatrix` on our own
               calibration windows (the 32 x 512 tokens every compress here calibrates on, decoded to text).
  ours-Q       `cli.py compress REF --target gguf --budget <llama-Q's expert bytes>B --budget-scope experts
               --samples 32 --group-size 128` (GPTQ, global LP, sensitivity weights: the defaults), then
               `export --format gguf`. Points with the same expert bytes share one compress.
  ours+rtn-Q   the same with `--method rtn` (pass 1 and plan from the cache, no GPTQ in pass 2; step rtn, at
               --rtn-points): the allocation alone against llama.cpp's importance-weighted rounding.
  ours+imatrix-Q   the same with `--method imatrix --eps-quantizer imatrix` (step imatrix_rows, at --rtn-points):
               the LP on errors measured as pass 2 quantizes, round-to-nearest on scales weighted by the calibration
               inputs' energy per column (llama.cpp's importance matrix from the same windows), no GPTQ.
  ours+tq-Q    the LP with tq1_0 / tq2_0 among the candidates (step ternary, at --ternary-points: below the default
               candidates' smallest size); ours+tq+imatrix-Q with --ternary-method imatrix.
  ours+layout-Q   `--method imatrix` on llama-Q's own per-tensor types as a fixed plan (`--plan`; step layout_rows,
               at --rtn-points): our rounding against llama.cpp's at the same layout and bytes, no allocation;
               ours+layout+gptq-Q the same with GPTQ (--layout-method gptq).
  native-Q, vllm-Q   the same budget under --target native (per expert; keep/int8/int6/int5/int4/int3/int2/ternary at
               group 128) and --target vllm (symmetric int4/int8 g128 per layer): the price of each target's
               granularity, in our runtime only (no export); native+imatrix-Q, vllm+imatrix-Q with
               --granularity-method imatrix, set against ours+imatrix-Q.

Every row is scored with this project's perplexity protocol (the first --max-tokens tokens of each held-out text in
our tokenizer's ids, non-overlapping windows of --seq-len, each from a fresh context): GGUFs in llama.cpp, our
compressed models also in our runtime (the two must agree); piqa and arc_easy (local lm-eval tasks, --limit
examples each) on the experts of each GGUF put into the torch model (evals/gguf_weights.py) for llama.cpp's files
and the F16 one, in our runtime for ours; llama-bench prefill and decode tokens/s of each GGUF. Each result is
written to the JSON as soon as it exists, so a killed run resumes at the first missing one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from compressor.assets import CALIB_TEXT, HELDOUT_TEXTS, REFERENCE_MODEL_DIR
from compressor.calibration.data import calibration_windows, eval_windows, read_text, tokenize
from compressor.targets import TARGET_TABLE
from evals.llamacpp_report import TASKS, report
from evals.machine import cpu_model, load_average

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results" / "llamacpp_compare.json"
QTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ2_XS")
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")  # --tensor-type regexes kept F16 (llama.cpp's names)
NATIVE_FORMATS = "keep,int8,int6,int5,int4,int3,int2,ternary"
GGUF_WITH_TQ = ",".join(TARGET_TABLE["gguf"].default_formats + ("tq2_0", "tq1_0", "keep"))
STEPS = ("imatrix", "quantize", "compress", "ppl", "rtn", "imatrix_rows", "layout_rows", "bench", "ternary", "targets",
         "tasks", "report")


# ---------------------------------------------------------------------------------------------------- results file

def load_results(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_results(results: dict, path: Path = RESULTS) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- pure helpers

def imatrix_text(tokenizer, windows: torch.Tensor, filler: torch.Tensor) -> str:
    """Our calibration windows as one text for llama-imatrix (which reads text and cuts it into chunks of its
    context): the windows decoded and concatenated, so llama.cpp's importance matrix sees the tokens our GPTQ and
    pass 1 see. Decoding and tokenizing again can merge a few tokens at the seams; `filler` (the calibration
    text's first ids) is appended until the text holds whole chunks again."""
    text = "".join(tokenizer.decode(w.tolist()) for w in windows)
    short = windows.numel() - tokenize(tokenizer, text).numel()
    return text + (tokenizer.decode(filler[: short + 8].tolist()) if short > 0 else "")


def projection_types(types: dict[str, str]) -> dict[str, dict[str, int]]:
    """{tensor name: ggml type} of the routed experts -> {projection: {type: layers}}."""
    out: dict[str, dict[str, int]] = {}
    for name, t in types.items():
        m = re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight", name)
        if m:
            out.setdefault(m[1], {}).setdefault(t, 0)
            out[m[1]][t] += 1
    return {p: dict(sorted(c.items())) for p, c in sorted(out.items())}


def layout_plan(template: dict, expert_tensor_types: dict[str, str], budget: int, source: str) -> dict:
    """llama.cpp's own layout as a plan: every expert of layer N gets the types of blk.N's stacked gate/up and down
    tensors in `expert_tensor_types` ({GGUF tensor name: ggml type}, as describe_gguf records them). `template` is a
    plan of the same model (its module names and settings); `budget` is the file's expert bytes, which the layout
    takes exactly."""
    from compressor.plan import join_formats

    experts = {}
    for module, formats in template["experts"].items():
        layer = re.search(r"layers\.(\d+)\.", module)[1]
        t = {p: expert_tensor_types[f"blk.{layer}.ffn_{p}_exps.weight"].lower() for p in ("gate", "up", "down")}
        if t["gate"] != t["up"]:
            raise ValueError(f"{source}: blk.{layer} gives gate {t['gate']} and up {t['up']}; a plan gives the two "
                             "one format")
        experts[module] = [join_formats(t["gate"], t["down"])] * len(formats)
    return {**template, "experts": experts, "budget_bytes": budget, "predicted_bytes": None,
            "allocation": {"layout_of": source}, "analysis": {}}


def budget_points(rows: dict, qtypes) -> dict[str, int]:
    """llama-Q -> its expert bytes, for the llama.cpp files made so far (the budgets of ours-Q)."""
    return {q: rows[f"llama-{q}"]["expert_bytes"] for q in qtypes if f"llama-{q}" in rows}


def shared_compress(points: dict[str, int]) -> dict[str, str]:
    """Q -> the Q whose compress it reuses: points with equal expert bytes (Q2_K and Q3_K_S on a model whose
    gate/up rows take no k-quant) get one compress, at the first of them."""
    first: dict[int, str] = {}
    return {q: first.setdefault(b, q) for q, b in points.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def heldout_ids(tok, max_tokens: int) -> dict[str, torch.Tensor]:
    """The first `max_tokens` token ids of each held-out text, in the model's own tokenizer."""
    return {n: tokenize(tok, read_text(p))[:max_tokens] for n, p in HELDOUT_TEXTS.items()}


def gguf_perplexity(gguf: Path, heldout: dict[str, torch.Tensor], seq_len: int, threads: int) -> dict:
    """This comparison's protocol in llama.cpp: each text's perplexity over fresh windows of `seq_len`, and their
    mean (of the rounded values)."""
    from evals import llamacpp

    ppl = {n: round(llamacpp.perplexity(gguf, eval_windows(ids, seq_len), threads)["perplexity"], 4)
           for n, ids in heldout.items()}
    return {**ppl, "mean": round(mean(ppl.values()), 4)}


# ---------------------------------------------------------------------------------------------------- GGUF files

def gguf_types(gguf: Path) -> dict[str, str]:
    import gguf as gg

    return {t.name: t.tensor_type.name for t in gg.GGUFReader(str(gguf)).tensors}


def tensor_digest(gguf: Path) -> str:
    """sha256 over every tensor's name and bytes (not the header, which names the mixture)."""
    import hashlib

    import gguf as gg

    h = hashlib.sha256()
    for t in gg.GGUFReader(str(gguf)).tensors:
        h.update(t.name.encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


def describe_gguf(gguf: Path) -> dict:
    """Expert bytes, the types of the routed experts per projection, and an error if anything else is quantized."""
    from evals import llamacpp

    types = gguf_types(gguf)
    others = {n: t for n, t in types.items() if "_exps." not in n and t not in ("F16", "F32", "BF16")}
    if others:
        raise RuntimeError(f"{gguf}: tensors other than the routed experts are quantized: {others}")
    return {"gguf": str(gguf), "file_bytes": gguf.stat().st_size, "expert_bytes": llamacpp.tensor_bytes(gguf),
            "non_expert_types": llamacpp.tensor_types(gguf, r"^(?!.*_exps\.)"),
            "expert_types": projection_types(types),
            "expert_tensor_types": {n: t for n, t in types.items() if "_exps." in n}}


# ---------------------------------------------------------------------------------------------------- steps

class Run:
    def __init__(self, args):
        self.a = args
        self.runs: Path = args.runs
        self.runs.mkdir(parents=True, exist_ok=True)
        self.results = load_results()
        self.rows: dict = self.results.setdefault("rows", {})
        self.results["settings"] = {
            "model": str(args.model), "f16": str(args.f16), "qtypes": list(args.qtypes), "samples": args.samples,
            "seq_len": args.seq_len, "max_tokens": args.max_tokens, "threads": args.threads,
            "group_size": 128, "native_formats": NATIVE_FORMATS}
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            from compressor.io.models import load_tokenizer

            self._tok = load_tokenizer(self.a.model)
        return self._tok

    def save(self):
        save_results(self.results)

    def log(self, msg: str):
        print(f"{time.strftime('%H:%M:%S')} [load {load_average()}] {msg}", flush=True)

    # -- llama.cpp's own files
    def imatrix(self):
        from evals import llamacpp

        out = self.runs / "imatrix.gguf"
        if "imatrix" in self.results and out.exists():
            return
        ids = tokenize(self.tok, read_text(CALIB_TEXT))
        windows = calibration_windows(ids, self.a.samples, 512, 0)  # the recipe defaults' windows (seed 0)
        text = self.runs / "calib_windows.txt"
        text.write_text(imatrix_text(self.tok, windows, ids))
        retok = tokenize(self.tok, text.read_text()).numel()
        self.log(f"imatrix on {windows.shape[0]} x 512 calibration tokens ({retok} after decoding)")
        t0 = time.time()
        log = Path(f"/work/logs/llcmp-imatrix.log")
        llamacpp.compute_imatrix(self.a.f16, text, out, ctx=512, chunks=self.a.samples, threads=self.a.threads,
                                 log=log)
        chunks = re.findall(r"computing over (\d+) chunks", log.read_text())
        self.results["imatrix"] = {"file": str(out), "seconds": round(time.time() - t0, 1), "load": load_average(),
                                   "tokens_after_decoding": retok, "chunks": int(chunks[0]) if chunks else None}
        self.save()

    def quantize(self):
        from evals import llamacpp

        if "f16" not in self.rows:
            self.rows["f16"] = {"kind": "f16", **describe_gguf(self.a.f16)}
            self.save()
        for q in self.a.qtypes:
            name = f"llama-{q}"
            if name in self.rows:
                continue
            out = self.runs / f"{name}.gguf"
            self.log(f"llama-quantize {q}")
            t0 = time.time()
            try:
                llamacpp.quantize(self.a.f16, out, q, imatrix=self.runs / "imatrix.gguf", keep=ATTENTION,
                                  threads=self.a.threads, log=Path(f"/work/logs/llcmp-quantize-{q}.log"))
            except RuntimeError as err:
                self.rows[name] = {"kind": "llama", "qtype": q, "error": str(err)[-800:]}
                self.log(f"{q} failed: {str(err)[-300:]}")
            else:
                self.rows[name] = {"kind": "llama", "qtype": q, **describe_gguf(out),
                                   "quantize_seconds": round(time.time() - t0, 1)}
            self.save()
        seen: dict[str, str] = {}
        for q in self.a.qtypes:  # mixtures whose tensors came out identical are one model (scored once)
            row = self.rows.get(f"llama-{q}", {})
            if "gguf" in row:
                row.setdefault("tensor_sha256", tensor_digest(Path(row["gguf"])))
                if seen.setdefault(row["tensor_sha256"], f"llama-{q}") != f"llama-{q}":
                    row["same_as"] = seen[row["tensor_sha256"]]
        self.save()

    # -- our compressions
    def compress_row(self, name: str, target: str, budget: int, extra: list[str], export_gguf: bool) -> bool:
        """Compress (and export) row `name` unless it is recorded; True when the row stands (no error). A row
        recorded with another command (a changed candidate menu) is done again; the old one is kept under
        results["superseded"]."""
        out = self.runs / name
        cmd = [sys.executable, str(ROOT / "cli.py"), "compress", str(self.a.model), "--target", target,
               "--budget", f"{budget}B", "--budget-scope", "experts", "--samples", str(self.a.samples),
               "--group-size", "128", "--output", str(out), "--overwrite", *extra]
        old = self.rows.get(name)
        if old is not None and old.get("command", " ".join(cmd[2:])) != " ".join(cmd[2:]):
            self.log(f"{name}: recorded with another command; compressing again")
            self.results.setdefault("superseded", {}).setdefault(name, []).append(self.rows.pop(name))
            self.save()
        elif old is not None and ("error" not in old or not self.a.retry_failed):
            return "error" not in old
        t0 = time.time()
        load0 = load_average()
        method = extra[extra.index("--method") + 1] if "--method" in extra else "gptq"
        formats = extra[extra.index("--formats") + 1].split(",") if "--formats" in extra else None
        if finished(out, target, budget, method, formats):  # written by an earlier run that stopped before recording it
            self.log(f"{name}: already compressed in {out}")
        else:
            self.log(f"{name}: {' '.join(cmd[2:])}")
            with open(f"/work/logs/llcmp-compress-{name}.log", "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                tail = Path(f"/work/logs/llcmp-compress-{name}.log").read_text()[-1500:]
                self.rows[name] = {"kind": target, "budget": budget, "error": tail}
                self.save()
                self.log(f"{name} failed:\n{tail}")
                return False
        report = json.loads((out / "report.json").read_text())
        plan = json.loads((out / "plan.json").read_text())
        from compressor.io.checkpoint import tensor_nbytes

        row = {"kind": target, "budget": budget, "dir": str(out), "command": " ".join(cmd[2:]),
               "wall_seconds": round(time.time() - t0, 1), "compress_seconds": report.get("seconds"),
               "load_before": load0, "load_after": load_average(),
               "measurements": plan["allocation"].get("measurements"),
               "expert_bytes_checkpoint": sum(n for k, n in tensor_nbytes(out).items() if ".experts." in k),
               "formats": plan_format_counts(plan)}
        if export_gguf:
            from compressor.export import export

            gguf, _ = export(out, "gguf", self.runs / f"{name}.gguf", overwrite=True, log=lambda *_: None)
            row.update(describe_gguf(gguf))
            if row["expert_bytes"] != row["expert_bytes_checkpoint"]:
                raise RuntimeError(f"{name}: GGUF expert bytes {row['expert_bytes']} != checkpoint's "
                                   f"{row['expert_bytes_checkpoint']}")
        else:
            row["expert_bytes"] = row["expert_bytes_checkpoint"]
        self.rows[name] = row
        self.save()
        self.log(f"{name}: {row['expert_bytes']:,} expert bytes (budget {budget:,}), {row['wall_seconds']} s, "
                 f"{row['measurements']}")
        return True

    def compress(self):
        points = budget_points(self.rows, self.a.points or self.a.qtypes)
        for q, src in shared_compress(points).items():
            if src == q:
                self.compress_row(f"ours-{q}", "gguf", points[q], [], export_gguf=True)
            elif f"ours-{q}" not in self.rows and f"ours-{src}" in self.rows:
                self.rows[f"ours-{q}"] = {**self.rows[f"ours-{src}"], "same_as": f"ours-{src}"}
                self.save()

    def rtn(self):
        """Ours with RTN in pass 2 (`--method rtn`; pass 1 and the plan as ours-Q's, from the measurement cache):
        the LP's allocation without GPTQ, against llama.cpp's importance-weighted rounding."""
        self.method_rows("rtn", ["--method", "rtn"])

    def imatrix_rows(self):
        """Ours with `--method imatrix --eps-quantizer imatrix`: pass 1's errors and pass 2 both from round-to-nearest
        on importance-weighted scales (the calibration inputs' energy per column), no GPTQ."""
        self.method_rows("imatrix", ["--method", "imatrix", "--eps-quantizer", "imatrix"])

    def method_rows(self, kind: str, extra: list[str]):
        points = budget_points(self.rows, self.a.qtypes)
        for q in self.a.rtn_points:
            if q in points:
                name = f"ours+{kind}-{q}"
                if self.compress_row(name, "gguf", points[q], extra, export_gguf=True):
                    self.ppl_llama(name)
                    self.ppl_ours(name)

    def layout_rows(self):
        """Ours in llama.cpp's own layout (llama-Q's per-tensor types as a fixed plan) with `--layout-method`
        (imatrix: row ours+layout-Q; gptq: ours+layout+gptq-Q): our rounding against llama.cpp's at the same types
        and bytes, no allocation and no pass 1 (at --rtn-points)."""
        template = next((Path(r["dir"]) / "plan.json" for r in self.rows.values()
                         if r.get("kind") == "gguf" and "dir" in r and (Path(r["dir"]) / "plan.json").is_file()), None)
        method = self.a.layout_method
        for q in self.a.rtn_points:
            src = self.rows.get(f"llama-{q}", {})
            if "expert_tensor_types" not in src or "same_as" in src:
                continue
            if template is None:
                raise SystemExit("layout_rows needs a --target gguf row of this model first (steps compress, rtn or "
                                 "imatrix_rows) for the plan's module names")
            plan = self.runs / f"layout-{q}.json"
            plan.write_text(json.dumps(layout_plan(json.loads(template.read_text()), src["expert_tensor_types"],
                                                   src["expert_bytes"], src["gguf"]), indent=1))
            name = f"ours+layout{'' if method == 'imatrix' else '+' + method}-{q}"
            if self.compress_row(name, "gguf", src["expert_bytes"], ["--plan", str(plan), "--method", method],
                                 export_gguf=True):
                if self.rows[name]["expert_tensor_types"] != src["expert_tensor_types"]:
                    raise RuntimeError(f"{name}: the exported GGUF's expert types differ from llama-{q}'s")
                self.ppl_llama(name)
                self.ppl_ours(name)

    def ternary(self):
        """Points below the default candidates' smallest size (gate/up q4_0 + down q2_k): TQ2_0 / TQ1_0 down rows
        among the candidates too (their own pass 1); with --ternary-method imatrix, row ours+tq+imatrix-Q (pass 1
        and pass 2 as in ours+imatrix-Q)."""
        points = budget_points(self.rows, self.a.qtypes)
        method = self.a.ternary_method
        extra = [] if method == "gptq" else ["--method", method, "--eps-quantizer", method]
        for q in self.a.ternary_points:
            if q in points:
                name = f"ours+tq{'' if method == 'gptq' else '+' + method}-{q}"
                if self.compress_row(name, "gguf", points[q], ["--formats", GGUF_WITH_TQ, *extra], export_gguf=True):
                    self.ppl_llama(name)
                    self.ppl_ours(name)
                    self.bench_row(name)

    def targets(self):
        """native-Q and vllm-Q at --granularity points; with --granularity-method imatrix, native+imatrix-Q and
        vllm+imatrix-Q (pass 1 and pass 2 as in ours+imatrix-Q, the row of --target gguf they are set against)."""
        points = budget_points(self.rows, self.a.qtypes)
        method = self.a.granularity_method
        extra = [] if method == "gptq" else ["--method", method, "--eps-quantizer", method]
        tag = "" if method == "gptq" else f"+{method}"
        for q in self.a.granularity:
            if q not in points:
                continue
            self.compress_row(f"vllm{tag}-{q}", "vllm", points[q], extra, export_gguf=False)  # the cheaper first
            self.ppl_ours(f"vllm{tag}-{q}")
            self.compress_row(f"native{tag}-{q}", "native", points[q], ["--formats", NATIVE_FORMATS, *extra],
                              export_gguf=False)
            self.ppl_ours(f"native{tag}-{q}")

    # -- evaluation
    def heldout(self) -> dict[str, torch.Tensor]:
        return heldout_ids(self.tok, self.a.max_tokens)

    def scored(self, row: dict, key: str) -> bool:
        """Has `row` a perplexity under `key` on this run's --max-tokens (one measured on another is redone)?"""
        return row.get(key, {}).get("max_tokens") == self.a.max_tokens

    def ppl_llama(self, name: str):
        row = self.rows[name]
        if "gguf" not in row or self.scored(row, "ppl_llama_cpp"):
            return
        self.log(f"{name}: perplexity in llama.cpp")
        t0 = time.time()
        ppl = gguf_perplexity(Path(row["gguf"]), self.heldout(), self.a.seq_len, self.a.threads)
        row["ppl_llama_cpp"] = {**ppl, "max_tokens": self.a.max_tokens}
        row["ppl_llama_cpp_seconds"] = round(time.time() - t0, 1)
        self.save()
        self.log(f"{name}: {row['ppl_llama_cpp']}")

    def ppl_ours(self, name: str):
        from compressor import api
        from compressor.io.models import load_model

        row = self.rows.get(name, {})
        if "dir" not in row or self.scored(row, "ppl_ours"):
            return
        self.log(f"{name}: perplexity in our runtime")
        t0 = time.time()
        model = load_model(row["dir"])
        ppl = {n: round(api.perplexity(model, ids, self.a.seq_len, progress=False)["perplexity"], 4)
               for n, ids in self.heldout().items()}
        del model
        gc.collect()
        row["ppl_ours"] = {**ppl, "mean": round(mean(ppl.values()), 4), "max_tokens": self.a.max_tokens}
        row["ppl_ours_seconds"] = round(time.time() - t0, 1)
        self.save()
        self.log(f"{name}: {row['ppl_ours']}")

    def selected(self) -> list[str]:
        """The rows --rows names (in its order), else every row."""
        return [n for n in self.a.rows if n in self.rows] if self.a.rows else list(self.rows)

    def ppl(self):
        for name in self.selected():
            if "same_as" in self.rows[name]:
                continue
            self.ppl_llama(name)
            if self.rows[name]["kind"] == "gguf":
                self.ppl_ours(name)
        for name, row in self.rows.items():  # rows sharing a compress share its scores
            if "same_as" in row:
                src = self.rows[row["same_as"]]
                row.update({k: v for k, v in src.items() if k.startswith("ppl_")})
        self.save()

    def task_model(self, name: str):
        from compressor.io.models import load_model
        from evals.gguf_weights import model_with_gguf_experts

        row = self.rows[name]
        if row["kind"] in ("gguf", "native", "vllm"):
            return load_model(row["dir"])  # our runtime
        return model_with_gguf_experts(self.a.model, Path(row["gguf"]))  # llama.cpp's experts, dequantized

    def tasks(self):
        from evals.lm_eval_runner import run_tasks

        for name in self.selected():
            row = self.rows[name]
            if "error" in row or "same_as" in row or row["kind"] in ("native", "vllm"):
                continue
            acc = row.get("tasks", {})
            if acc.get("limit") == self.a.limit and all(t in acc for t in TASKS):
                continue
            self.log(f"{name}: {', '.join(TASKS)} on {self.a.limit} examples each")
            t0 = time.time()
            model = self.task_model(name)
            res = run_tasks(model, self.tok, list(TASKS), limit=self.a.limit, batch_size=16)["results"]
            del model
            gc.collect()
            row["tasks"] = {"limit": self.a.limit, "seconds": round(time.time() - t0, 1),
                            **{t: {"acc": round(res[t]["acc,none"], 4), "stderr": round(res[t]["acc_stderr,none"], 4),
                                   "acc_norm": round(res[t]["acc_norm,none"], 4)} for t in TASKS}}
            self.save()
            self.log(f"{name}: {row['tasks']}")
        for row in self.rows.values():
            if "same_as" in row and "tasks" in self.rows[row["same_as"]]:
                row["tasks"] = self.rows[row["same_as"]]["tasks"]
        self.save()

    def bench_row(self, name: str):
        from evals import llamacpp

        if "bench" in self.rows[name] or "gguf" not in self.rows[name] or "same_as" in self.rows[name]:
            return
        self.log(f"{name}: llama-bench")
        load0 = load_average()
        b = llamacpp.bench(Path(self.rows[name]["gguf"]), prompt=128, gen=32, threads=self.a.threads, reps=3)
        self.rows[name]["bench"] = {**b, "load_before": load0, "load_after": load_average(),
                                    "time": time.strftime("%H:%M"), "cpu": cpu_model()}
        self.save()
        self.log(f"{name}: {self.rows[name]['bench']}")

    def bench(self):
        for name in self.selected():
            self.bench_row(name)


def finished(out: Path, target: str, budget: int, method: str = "gptq", formats: list[str] | None = None) -> bool:
    """Is `out` a finished compress of this target, budget, pass-2 method (and candidate formats, when given)?"""
    import yaml

    if not (out / "report.json").exists():
        return False
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    a = recipe["allocation"]
    return (a["target"] == target and str(a["budget"]) == f"{budget}B"
            and recipe["quantization"]["method"] == method and (formats is None or a["formats"] == formats))


def plan_format_counts(plan: dict) -> dict[str, int]:
    """How many routed experts each format (gate_up/down pair as written in the plan) holds."""
    counts: dict[str, int] = {}
    for fmts in plan["experts"].values():
        for f in fmts:
            counts[f] = counts.get(f, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL_DIR)
    p.add_argument("--f16", type=Path, default=Path("/work/runs/ref-f16.gguf"))
    p.add_argument("--runs", type=Path, default=Path("/work/runs/llcmp"))
    p.add_argument("--qtypes", type=lambda s: tuple(s.split(",")), default=QTYPES)
    p.add_argument("--points", type=lambda s: tuple(s.split(",")), default=(),
                   help="the llama.cpp points (of --qtypes) at which ours is compressed, in this order; default all")
    p.add_argument("--rows", type=lambda s: tuple(s.split(",")), default=(),
                   help="rows that ppl, tasks and bench score, in this order (e.g. f16,llama-Q2_K,ours-Q2_K); "
                        "default all")
    p.add_argument("--granularity", type=lambda s: tuple(s.split(",")), default=("Q4_K_M",),
                   help="points at which --target native and vllm are compared with gguf")
    p.add_argument("--granularity-method", choices=("gptq", "imatrix"), default="gptq",
                   help="pass 1 and pass 2 of the native and vllm rows (step targets)")
    p.add_argument("--rtn-points", type=lambda s: tuple(s.split(",")), default=("Q2_K",),
                   help="points where ours is also compressed with RTN or imatrix in pass 2 (steps rtn, "
                        "imatrix_rows, layout_rows)")
    p.add_argument("--layout-method", choices=("imatrix", "gptq"), default="imatrix",
                   help="pass 2 of the rows of step layout_rows (llama.cpp's own tensor types as the plan)")
    p.add_argument("--ternary-points", type=lambda s: tuple(s.split(",")), default=("IQ2_XS",),
                   help="points where ours is also planned with TQ2_0 / TQ1_0 among the candidates")
    p.add_argument("--ternary-method", choices=("gptq", "imatrix"), default="gptq",
                   help="pass 1 and pass 2 of the rows of step ternary")
    p.add_argument("--steps", type=lambda s: tuple(s.split(",")), default=STEPS)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--limit", type=int, default=200, help="examples per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retry-failed", action="store_true", help="compress again the rows that failed before")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    run = Run(a)
    for step in STEPS:
        if step in a.steps and step != "report":
            getattr(run, step)()
    run.save()
    report(run.results, RESULTS)


if __name__ == "__main__":
    main()
