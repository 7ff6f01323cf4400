"""`cli.py bench` on a tiny model: every variant measured in its own process, ratios and the summary line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from compressor import api
from compressor.config import Recipe, apply_overrides
from compressor.runtime.bench import format_report, original_of
from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
LAST = re.compile(r"^bench: decode \d+\.\d\dx, prefill \d+\.\d\dx of the original; resident [\d,]+ MiB for [\d,]+ MiB "
                  r"of checkpoint$")


def test_bench_compares_with_the_original_in_fresh_processes(tmp_path):
    src = save_tiny("mixtral", tmp_path / "src", dtype=torch.bfloat16)
    out = api.compress(apply_overrides(Recipe(), {"model": str(src), "output": str(tmp_path / "out"), "dtype": "bfloat16",
                                                  "quantization.method": "rtn", "quantization.group_size": 32}),
                       log=lambda *_: None)
    assert original_of(out) == src
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", str(out), "--prompt-len", "8", "--gen-len",
                           "3", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert LAST.match(lines[-1]), lines[-1]
    assert any(line.startswith("original bfloat16") for line in lines) and any(
        line.startswith("original float32") for line in lines)
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["rows"]
    # the compressed model runs in its checkpoint's dtype, the original in float32 and in its own 16-bit dtype
    assert rows["compressed"]["dtype"] == "bfloat16" and rows["original float32"]["dtype"] == "float32"
    assert rows["compressed"]["checkpoint_bytes"] < rows["original bfloat16"]["checkpoint_bytes"]
    best = max(rows["original float32"]["decode_tok_s"]["median"], rows["original bfloat16"]["decode_tok_s"]["median"])
    assert report["decode_tok_s_ratio"] == rows["compressed"]["decode_tok_s"]["median"] / best


def test_a_compressed_model_without_its_original_benches_alone():
    row = {"dtype": "bfloat16", "checkpoint_bytes": 3 * 2 ** 20, "kernels": {"paths": {"native": 8}, "native": "built",
                                                                            "extra_bytes": 0, "workspace_bytes": 0}}
    row.update({k: {"median": v, "min": v, "max": v} for k, v in
                (("prefill_tok_s", 100.0), ("decode_tok_s", 10.0), ("resident", 4 * 2 ** 20), ("peak_rss", 2 ** 28))})
    report = {"settings": {"prompt_len": 8, "gen_len": 2, "batch": 1, "threads": 1, "repeats": 1}, "load": (1.0,),
              "rows": {"compressed": row}, "original_missing": "/gone/model"}
    last = format_report(report).splitlines()[-1]
    assert last == ("bench: decode 10.00 tok/s, prefill 100.0 tok/s (original /gone/model not found, benched alone); "
                    "resident 4 MiB for 3 MiB of checkpoint")
