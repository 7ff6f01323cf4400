"""Bad inputs through the CLI, one case per class: each must end in exit code 2 with one `error:` paragraph that names
the problem (no traceback), leave nothing new behind (no output, temporary directory, journal or half-written cache
entry) and leave every input byte-identical. The cases run in-process on copies of a tiny Mixtral; the interrupted
and environment cases that need a real process are in test_interrupted_runs.py."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import cli
from compressor import api
from test_upcycle import saved, tiny_llama
from tiny import save_tiny

CALIB = ["--calib", "{m}/calib.txt", "--samples", "4", "--seq-len", "32", "--group-size", "32"]
OUT = ["--output", "{root}/o"]


@dataclass
class Case:
    argv: list[str]  # copies of the model {m}, compressed {c}, sharded {s}, a dense Llama {d}; {root}: the case's directory
    match: str  # a regex the error message must match
    setup: Callable | None = None  # (root, m, monkeypatch) -> None, before the snapshot of the inputs


# --- setups ---------------------------------------------------------------------------------------------------------

def edit_bytes(f: Callable[[bytes], bytes], name: str = "model.safetensors"):
    def setup(root, m, mp):
        (m / name).write_bytes(f((m / name).read_bytes()))
    return setup


def header(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:
    h, data = header(raw)
    edit(h)
    text = json.dumps(h).encode()
    return len(text).to_bytes(8, "little") + text + data


def double_first_shape(h: dict) -> None:
    entry = next(v for k, v in h.items() if k != "__metadata__")
    entry["shape"][0] *= 2


def edit_tensors(edit: Callable[[dict], None]):
    def setup(root, m, mp):
        tensors = load_file(m / "model.safetensors")
        edit(tensors)
        save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
    return setup


def key(tensors: dict, *parts: str) -> str:
    return next(k for k in tensors if all(p in k for p in parts))


def nan_expert(tensors: dict) -> None:
    tensors[key(tensors, "layers.1.", "experts.2.w2")][0, 0] = float("nan")


def edit_json(name: str, edit: Callable[[dict], None], where: str = "m"):
    def setup(root, m, mp):
        path = root / where / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return setup


def write(name: str, text: str | bytes):
    def setup(root, m, mp):
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def plan(edit: Callable[[dict], None] | None = None, text: str | None = None):
    """root/p.json: the plan a dry run made for this model (the `plan_json` fixture), edited."""
    def setup(root, m, mp):
        data = json.loads(PLAN[0])
        if edit:
            edit(data)
        (root / "p.json").write_text(text if text is not None else json.dumps(data))
    return setup


def more_layers(p: dict) -> None:
    for i in (2, 3):
        p["experts"][f"model.layers.{i}.mlp.experts"] = ["int4"] * 4


def other_width(p: dict) -> None:
    for rec in p["made_for"]["experts"].values():
        rec["gate_up"] = [256, 64]


def first_expert(fmt: str):
    def edit(p: dict) -> None:
        p["experts"]["model.layers.0.mlp.experts"][0] = fmt
    return edit


def alias_bomb(field: str) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    section, _, leaf = field.rpartition(".")
    body = "\n".join("      " + line for line in lines)
    return f"{section}:\n  {leaf}:\n    - bomb:\n{body}\n" if section else f"{leaf}:\n  - bomb:\n{body}\n"


def mock(target: str, value):
    def setup(root, m, mp):
        mp.setattr(target, value)
    return setup


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


class NoSpace:
    free = 1000


# --- the cases -------------------------------------------------------------------------------------------------------

CASES = {
    # damaged or mismatched weights: found from the safetensors headers, before anything is loaded
    "truncated-weights": Case(["compress", "{m}", *OUT, *CALIB], r"model\.safetensors: it is truncated",
                              edit_bytes(lambda b: b[: len(b) // 2])),
    "garbage-header-length": Case(["compress", "{m}", *OUT, *CALIB], r"header length field says",
                                  edit_bytes(lambda b: (10**15).to_bytes(8, "little") + b[8:])),
    "shape-disagrees-with-offsets": Case(["compress", "{m}", *OUT, *CALIB], r"but its offsets .* span",
                                         edit_bytes(lambda b: with_header(b, double_first_shape))),
    "header-not-json": Case(["inspect", "{m}"], r"header is not valid JSON",
                            edit_bytes(lambda b: b[:8] + b"!" * int.from_bytes(b[:8], "little") + b[8 + int.from_bytes(b[:8], "little"):])),
    "file-of-five-bytes": Case(["inspect", "{m}"], r"too short for a safetensors file", edit_bytes(lambda b: b[:5])),
    "bytes-after-last-tensor": Case(["inspect", "{m}"], r"bytes follow its last tensor", edit_bytes(lambda b: b + b"\0" * 64)),
    "expert-of-wrong-shape": Case(["compress", "{m}", *OUT, *CALIB], r"down_proj cannot be built .*\[64, 50\] x1",
                                  edit_tensors(lambda t: t.update({key(t, "experts.1.w2"): t[key(t, "experts.1.w2")][:, :50].clone()}))),
    "expert-missing": Case(["compress", "{m}", *OUT, *CALIB], r"layers\.1\.mlp\.experts\.gate_up_proj cannot be built .*3 x \S*w1",
                           edit_tensors(lambda t: t.pop(key(t, "layers.1.", "experts.3.w1")))),
    "attention-tensor-missing-eval": Case(["eval", "{m}", "--ppl", "{m}/heldout.txt"],
                                          r"missing model\.layers\.1\.self_attn\.q_proj\.weight",
                                          edit_tensors(lambda t: t.pop(key(t, "layers.1.", "q_proj")))),
    "integer-weights": Case(["compress", "{m}", *OUT, *CALIB], r"is torch\.int32 where the model holds floating-point",
                            edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].int()}))),
    "shard-missing": Case(["compress", "{s}", *OUT, *CALIB], r"missing weight file model-00002",
                          lambda root, m, mp: sorted((root / "s").glob("model-*.safetensors"))[1].unlink()),
    "index-not-json": Case(["inspect", "{s}"], r"not a safetensors index",
                           lambda root, m, mp: (root / "s" / "model.safetensors.index.json").write_text("{")),
    "index-names-the-wrong-shard": Case(["inspect", "{s}"], r"lists tensors its shards do not hold",
                                        edit_json("model.safetensors.index.json",
                                                  lambda d: d["weight_map"].update({"lm_head.weight": next(
                                                      f for f in d["weight_map"].values() if f != d["weight_map"]["lm_head.weight"])}), "s")),
    # config.json
    "config-is-a-list": Case(["inspect", "{m}"], r"config\.json holds a JSON list", write("m/config.json", "[]")),
    "config-not-json": Case(["inspect", "{m}"], r"config\.json is not valid JSON", write("m/config.json", "{'a': 1")),
    "architectures-of-another-model": Case(["compress", "{m}", *OUT, "--method", "rtn", *CALIB],
                                           r"'architectures' names \['BertForMaskedLM'\].*MixtralForCausalLM",
                                           edit_json("config.json", lambda c: c.update(architectures=["BertForMaskedLM"]))),
    "config-sizes-disagree-with-weights": Case(["compress", "{m}", *OUT, *CALIB], r"do not match its config\.json .*checkpoint \[300, 64\], model \[300, 128\]",
                                               edit_json("config.json", lambda c: c.update(hidden_size=128))),
    "config-with-fewer-layers": Case(["compress", "{m}", *OUT, *CALIB], r"decoder layer\(s\) \[1\] beyond config\.json's 1",
                                     edit_json("config.json", lambda c: c.update(num_hidden_layers=1))),
    "config-zero-experts": Case(["inspect", "{m}"], r"num_local_experts 0", edit_json("config.json", lambda c: c.update(num_local_experts=0))),
    "config-top-k-above-experts": Case(["compress", "{m}", *OUT, *CALIB], r"num_experts_per_tok 9 with 4 experts",
                                       edit_json("config.json", lambda c: c.update(num_experts_per_tok=9))),
    "config-quantization-config-not-an-object": Case(["compress", "{m}", *OUT, *CALIB], r"quantization_config 'yes' \(expected an object\)",
                                                     edit_json("config.json", lambda c: c.update(quantization_config="yes"))),
    "config-another-tools-quantization": Case(["eval", "{m}", "--ppl", "{m}/heldout.txt"], r"cannot load this model here: .*optimum",
                                              edit_json("config.json", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))),
    "config-rope-type-unknown": Case(["compress", "{m}", *OUT, *CALIB], r"cannot build the model its config\.json describes \(KeyError: 'nonsense'\)",
                                     edit_json("config.json", lambda c: c.update(rope_parameters={"rope_type": "nonsense"}))),
    "config-dtype-unknown": Case(["inspect", "{m}"], r"dtype 'float7'", edit_json("config.json", lambda c: c.update(dtype="float7"))),
    # NaN experts: pass 2 journals layer 0, then fails at layer 1; pass 1 (budget) likewise in the measurement cache
    "nan-expert-pass-2": Case(["compress", "{m}", *OUT, *CALIB], r"NaN or inf in the weights of model\.layers\.1\.mlp\.experts expert\(s\) \[2\]",
                              edit_tensors(nan_expert)),
    "nan-expert-pass-1": Case(["compress", "{m}", *OUT, "--budget", "4bits", "--budget-scope", "experts", *CALIB],
                              r"NaN or inf in the weights of model\.layers\.1\.mlp\.experts", edit_tensors(nan_expert)),
    # compressed models
    "eval-truncated-compressed": Case(["eval", "{c}", "--ppl", "{m}/heldout.txt"], r"c/model\.safetensors: it is truncated",
                                      edit_bytes(lambda b: b[:-1000], "../c/model.safetensors")),
    "compressed-formats-edited": Case(["eval", "{c}", "--ppl", "{m}/heldout.txt"], r"qweight: checkpoint \[192, 32\], model \[192, 64\]",
                                      edit_json("config.json", lambda c: c["quantization_config"]["experts"]["model.layers.0.mlp.experts"].__setitem__(0, "int8"), "c")),
    "compressed-config-without-experts": Case(["inspect", "{c}"], r"quantization_config does not describe this model",
                                              edit_json("config.json", lambda c: c["quantization_config"].update(experts={}), "c")),
    "compress-a-compressed-model": Case(["compress", "{c}", *OUT], r"already compressed"),
    # texts
    "calibration-text-empty": Case(["compress", "{m}", *OUT, "--calib", "{root}/e.txt"], r"text file is empty", write("e.txt", "\n \n")),
    "calibration-text-too-short": Case(["compress", "{m}", *OUT, "--calib", "{root}/s.txt", "--seq-len", "32"],
                                       r"13 tokens, fewer than one window of --seq-len 32", write("s.txt", "the quick brown fox")),
    "seq-len-absurd": Case(["compress", "{m}", *OUT, "--calib", "{m}/calib.txt", "--seq-len", "100000000"],
                           r"fewer than one window of --seq-len 100,000,000"),
    "calibration-text-is-a-directory": Case(["compress", "{m}", *OUT, "--calib", "{root}"], r"is a directory; pass a text file"),
    "calibration-text-missing": Case(["compress", "{m}", *OUT, "--calib", "{root}/none.txt"], r"text file not found"),
    "eval-text-empty": Case(["eval", "{m}", "--ppl", "{root}/e.txt"], r"text file is empty", write("e.txt", "")),
    "eval-seq-len-0": Case(["eval", "{m}", "--ppl", "{m}/heldout.txt", "--seq-len", "0"], r"--seq-len 0: a window needs"),
    "eval-batch-size-0": Case(["eval", "{m}", "--ppl", "{m}/heldout.txt", "--batch-size", "0"], r"--batch-size 0"),
    "eval-text-shorter-than-a-window": Case(["eval", "{m}", "--ppl", "{m}/heldout.txt", "--seq-len", "100000"],
                                            r"fewer than one window of --seq-len 100,000"),
    "eval-limit-0": Case(["eval", "{m}", "--tasks", "local_piqa", "--limit", "0"], r"--limit 0"),
    # --plan
    "plan-not-json": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"p\.json is not JSON", plan(text="{nope")),
    "plan-a-json-list": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"holds a JSON list, not a plan", plan(text="[1, 2]")),
    "plan-format-int5": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"unknown format 'int5'", plan(first_expert("int5"))),
    "plan-for-a-deeper-model": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB],
                                    r"made for another model \(2 MoE block\(s\) the model does not have", plan(more_layers)),
    "plan-for-other-shapes": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB],
                                  r"made for another model .*'gate_up': \[256, 64\]", plan(other_width)),
    "plan-ggml-type-on-short-rows": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB],
                                         r"format q4_k cannot store rows of 64 weights", plan(first_expert("q4_k"))),
    "plan-over-its-budget": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"more than the budget of 1,000 bytes",
                                 plan(lambda p: p.update(budget_bytes=1000, scope="experts"))),
    "plan-field-of-wrong-type": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"'group_size' must be a positive integer",
                                     plan(lambda p: p.update(group_size="x"))),
    "plan-unknown-field": Case(["compress", "{m}", *OUT, "--plan", "{root}/p.json", *CALIB], r"unexpected keyword argument 'colour'",
                               plan(lambda p: p.update(colour="red"))),
    "plan-missing": Case(["compress", "{m}", *OUT, "--plan", "{root}/none.json", *CALIB], r"plan file not found"),
    # outputs (dry runs obey the same rules as real runs)
    "dry-run-into-the-model": Case(["compress", "{m}", "--output", "{m}", "--dry-run", *CALIB], r"it is or contains the input model"),
    "dry-run-into-an-existing-output": Case(["compress", "{m}", *OUT, "--dry-run", *CALIB], r"o exists; pass --overwrite",
                                            lambda root, m, mp: ((root / "o").mkdir(), (root / "o" / "plan.json").write_text("{}"))),
    "synthetic-dry-run-beside-its-config": Case(["compress", "{m}/config.json", "--dry-run", "--synthetic-stats", "--output", "{m}",
                                                 "--budget", "4bits"], r"it is or contains the input model"),
    "output-under-a-file": Case(["compress", "{m}", "--output", "{root}/f/o", "--method", "rtn", *CALIB], r"f is a file, not a directory",
                                write("f", "x")),
    "output-read-only": Case(["compress", "{m}", *OUT, "--method", "rtn", *CALIB], r"Read-only file system; that file system is read-only",
                             mock("compressor.io.outputs.tempfile.mkstemp", read_only)),
    "output-without-space": Case(["compress", "{m}", *OUT, "--method", "rtn", *CALIB], r"not enough space for .* has 1,000 free",
                                 mock("compressor.io.outputs.shutil.disk_usage", lambda path: NoSpace())),
    # recipes
    "alias-bomb-in-notes": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"more than 16 YAML aliases",
                                write("r.yaml", alias_bomb("notes"))),
    "alias-bomb-in-calibration-text": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"more than 16 YAML aliases",
                                           write("r.yaml", alias_bomb("calibration.text"))),
    "recipe-nested-too-deep": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"more than 32 levels deep",
                                   write("r.yaml", "notes: " + "[" * 2000 + "]" * 2000)),
    "recipe-too-large": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"a recipe is a few hundred",
                             write("r.yaml", "notes: '" + "x" * 300_000 + "'")),
    "recipe-python-tag": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"not valid YAML",
                              write("r.yaml", "notes: !!python/object/apply:os.system ['echo pwned']")),
    "recipe-long-wrong-value": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"quantization\.bits: .*\(200,002 characters\)",
                                    write("r.yaml", "quantization:\n  bits: '" + "x" * 200_000 + "'")),
    "recipe-not-utf8": Case(["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT], r"not UTF-8 text", write("r.yaml", bytes(range(256)))),
    # upcycle (a dense Llama, {d})
    "upcycle-truncated-weights": Case(["upcycle", "{d}", *OUT, "--experts", "2"], r"d/model\.safetensors: it is truncated",
                                      edit_bytes(lambda b: b[: len(b) // 2], "../d/model.safetensors")),
    "upcycle-top-k-0": Case(["upcycle", "{d}", *OUT, "--experts", "2", "--top-k", "0"], r"--top-k 0: out of range"),
    "upcycle-checkpoint-every-0": Case(["upcycle", "{d}", *OUT, "--experts", "2", "--train-text", "{m}/calib.txt", "--steps", "2",
                                        "--checkpoint-every", "0"], r"--checkpoint-every 0: out of range"),
    "upcycle-modules-not-a-regex": Case(["upcycle", "{d}", *OUT, "--experts", "2", "--modules", "("], r"is not a regular expression"),
    "upcycle-train-text-too-short": Case(["upcycle", "{d}", *OUT, "--experts", "2", "--train-text", "{root}/s.txt", "--steps", "2"],
                                         r"fewer than seq_len \+ 2 = 258: use a longer --train-text", write("s.txt", "the quick brown fox")),
    "upcycle-into-the-model": Case(["upcycle", "{d}", "--output", "{d}", "--experts", "2"], r"it is or contains the input model"),
    # settings that do not fit the model
    "dynamic-pruning-out-of-reach": Case(["compress", "{m}", *OUT, "--method", "rtn", "--dynamic-pruning", "0.9", *CALIB],
                                         r"target 90% is out of reach: .* at most 49\.0%"),
}

PLAN: list[str] = []  # the plan a dry run made for the source model (filled by the `sources` fixture)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    m = save_tiny("mixtral", root / "m")
    save_tiny("mixtral", root / "s", max_shard_size="150KB")
    saved(tiny_llama(), root / "d")
    assert len(list((root / "s").glob("model-*.safetensors"))) > 2
    quiet = ["--calib", str(m / "calib.txt"), "--samples", "4", "--seq-len", "32", "--group-size", "32"]
    assert cli.main(["compress", str(m), "--output", str(root / "c"), "--method", "rtn", *quiet]) == 0
    assert cli.main(["compress", str(m), "--output", str(root / "p"), "--dry-run", "--method", "rtn", *quiet]) == 0
    PLAN[:] = [(root / "p" / "plan.json").read_text()]
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, sources, tmp_path, monkeypatch, capsys):
    case, root = CASES[name], tmp_path
    for part in ("m", "c", "s", "d"):
        if part == "m" or f"{{{part}}}" in " ".join(case.argv):
            shutil.copytree(sources / part, root / part)
    monkeypatch.chdir(root)  # a default output would land here
    (root / "cache").mkdir()  # the measurement cache (the user's, so it exists): a half-written pass 1 would stay here
    monkeypatch.setattr(api, "MEASUREMENTS_DIR", root / "cache")
    if case.setup:
        case.setup(root, root / "m", monkeypatch)
    capsys.readouterr()
    before = snapshot(root)
    argv = [a.format(m=root / "m", c=root / "c", s=root / "s", d=root / "d", root=root) for a in case.argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    message = err[err.index("error: "):]  # after any progress bars: the last thing written, one paragraph
    assert re.search(case.match, message, re.S), message
    assert len(message) < 1200, "a message quotes at most an excerpt of the input"
    assert snapshot(root) == before, "nothing new left behind, every input byte-identical"


def test_there_is_a_case_per_class():
    assert len(CASES) >= 40
