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
from compressor.pipeline import pass1
from test_upcycle import saved, tiny_llama
from tiny import save_tiny

CALIB = ["--calib", "{m}/calib.txt", "--samples", "4", "--seq-len", "32", "--group-size", "32"]
OUT = ["--output", "{root}/o"]


@dataclass
class Case:
    argv: list[str]  # {m}: a copy of the model, {c} compressed, {s} sharded, {d} a dense Llama; {root}: the case's dir
    match: str  # a regex the error message must match
    setup: Callable | None = None  # (root, monkeypatch) -> None


# --- setups: (root, monkeypatch) -> None, run before the inputs are snapshotted ------------------------------------

def edit_bytes(f: Callable[[bytes], bytes], name: str = "m/model.safetensors"):
    def setup(root, mp):
        (root / name).write_bytes(f((root / name).read_bytes()))
    return setup


def header_length(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


def with_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:
    n = header_length(raw)
    h = json.loads(raw[8:8 + n])
    edit(h)
    text = json.dumps(h).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def double_first_shape(h: dict) -> None:
    next(v for k, v in h.items() if k != "__metadata__")["shape"][0] *= 2


def edit_tensors(edit: Callable[[dict], None]):
    def setup(root, mp):
        tensors = load_file(root / "m" / "model.safetensors")
        edit(tensors)
        save_file(tensors, root / "m" / "model.safetensors", metadata={"format": "pt"})
    return setup


def key(tensors: dict, *parts: str) -> str:
    return next(k for k in tensors if all(p in k for p in parts))


def nan_expert(t: dict) -> None:
    t[key(t, "layers.1.", "experts.2.w2")][0, 0] = float("nan")


def narrow_expert(t: dict) -> None:
    t[key(t, "experts.1.w2")] = t[key(t, "experts.1.w2")][:, :50].clone()


def edit_json(name: str, edit: Callable[[dict], None]):
    def setup(root, mp):
        data = json.loads((root / name).read_text())
        edit(data)
        (root / name).write_text(json.dumps(data))
    return setup


def config(**values):
    return edit_json("m/config.json", lambda c: c.update(values))


def index_points_elsewhere(index: dict) -> None:
    wmap = index["weight_map"]
    wmap["lm_head.weight"] = next(f for f in wmap.values() if f != wmap["lm_head.weight"])


def write(name: str, text: str | bytes):
    def setup(root, mp):
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def plan(edit: Callable[[dict], None] | None = None, text: str | None = None):
    """root/p.json: the plan a dry run made for this model (PLAN), edited, or `text`."""
    def setup(root, mp):
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
    """A "billion laughs" YAML: 9 levels of 9 aliases of the level below, 9^9 leaves when expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    section, _, leaf = field.rpartition(".")
    body = "\n".join("      " + line for line in lines)
    return f"{section}:\n  {leaf}:\n    - bomb:\n{body}\n" if section else f"{leaf}:\n  - bomb:\n{body}\n"


def mock(target: str, value):
    def setup(root, mp):
        mp.setattr(target, value)
    return setup


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


class NoSpace:
    free = 1000


def existing_output(root, mp):
    (root / "o").mkdir()
    (root / "o" / "plan.json").write_text("{}")


# --- the cases -------------------------------------------------------------------------------------------------------

COMPRESS = ["compress", "{m}", *OUT, *CALIB]
RTN = [*COMPRESS, "--method", "rtn"]
WITH_PLAN = [*COMPRESS, "--plan", "{root}/p.json"]
EVAL = ["eval", "{m}", "--ppl", "{m}/heldout.txt"]
RECIPE = ["compress", "{m}", "--recipe", "{root}/r.yaml", *OUT]
UPCYCLE = ["upcycle", "{d}", *OUT, "--experts", "2"]
HALF = edit_bytes(lambda b: b[: len(b) // 2])

CASES = {
    # damaged weights: found from the safetensors headers, before anything is loaded
    "truncated-weights": Case(COMPRESS, r"model\.safetensors: it is truncated", HALF),
    "garbage-header-length": Case(COMPRESS, r"header length field says",
                                  edit_bytes(lambda b: (10**15).to_bytes(8, "little") + b[8:])),
    "shape-disagrees-with-offsets": Case(COMPRESS, r"but its offsets .* span",
                                         edit_bytes(lambda b: with_header(b, double_first_shape))),
    "header-not-json": Case(["inspect", "{m}"], r"header is not valid JSON",
                            edit_bytes(lambda b: b[:8] + b"!" * header_length(b) + b[8 + header_length(b):])),
    "file-of-five-bytes": Case(["inspect", "{m}"], r"too short for a safetensors file", edit_bytes(lambda b: b[:5])),
    "bytes-after-last-tensor": Case(["inspect", "{m}"], r"bytes follow its last tensor",
                                    edit_bytes(lambda b: b + b"\0" * 64)),
    "shard-missing": Case(["compress", "{s}", *OUT, *CALIB], r"missing weight file model-00002",
                          lambda root, mp: sorted((root / "s").glob("model-*.safetensors"))[1].unlink()),
    "index-not-json": Case(["inspect", "{s}"], r"not a safetensors index", write("s/model.safetensors.index.json", "{")),
    "index-names-the-wrong-shard": Case(["inspect", "{s}"], r"lists tensors its shards do not hold",
                                        edit_json("s/model.safetensors.index.json", index_points_elsewhere)),
    # weights that do not match config.json, before pass 1 (or before from_pretrained initialises them at random)
    "expert-of-wrong-shape": Case(COMPRESS, r"down_proj cannot be built .*\[64, 50\] x1", edit_tensors(narrow_expert)),
    "expert-missing": Case(COMPRESS, r"layers\.1\.mlp\.experts\.gate_up_proj cannot be built .*3 x \S*w1",
                           edit_tensors(lambda t: t.pop(key(t, "layers.1.", "experts.3.w1")))),
    "attention-tensor-missing-eval": Case(EVAL, r"missing model\.layers\.1\.self_attn\.q_proj\.weight",
                                          edit_tensors(lambda t: t.pop(key(t, "layers.1.", "q_proj")))),
    "integer-weights": Case(COMPRESS, r"is torch\.int32 where the model holds floating-point",
                            edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].int()}))),
    "config-sizes-disagree-with-weights": Case(COMPRESS, r"checkpoint \[300, 64\], model \[300, 128\]",
                                               config(hidden_size=128)),
    "config-with-fewer-layers": Case(COMPRESS, r"decoder layer\(s\) \[1\] beyond config\.json's 1",
                                     config(num_hidden_layers=1)),
    # config.json itself
    "model-is-a-file": Case(["compress", "{m}/config.json", *OUT], r"config\.json is a file: pass the model directory"),
    "config-is-a-list": Case(["inspect", "{m}"], r"config\.json holds a JSON list", write("m/config.json", "[]")),
    "config-not-json": Case(["inspect", "{m}"], r"config\.json is not valid JSON", write("m/config.json", "{'a': 1")),
    "architectures-of-another-model": Case(RTN, r"'architectures' names \['BertForMaskedLM'\].*MixtralForCausalLM",
                                           config(architectures=["BertForMaskedLM"])),
    "config-zero-experts": Case(["inspect", "{m}"], r"num_local_experts 0", config(num_local_experts=0)),
    "config-top-k-above-experts": Case(COMPRESS, r"num_experts_per_tok 9 with 4 experts", config(num_experts_per_tok=9)),
    "config-dtype-unknown": Case(["inspect", "{m}"], r"dtype 'float7'", config(dtype="float7")),
    "config-quantization-config-not-an-object": Case(COMPRESS, r"quantization_config 'yes' \(expected an object\)",
                                                     config(quantization_config="yes")),
    "config-another-tools-quantization": Case(EVAL, r"cannot load this model here: .*optimum",
                                              config(quantization_config={"quant_method": "gptq", "bits": 4})),
    "config-rope-type-unknown": Case(COMPRESS, r"cannot build the model its config\.json describes \(KeyError: 'nonsense'\)",
                                     config(rope_parameters={"rope_type": "nonsense"})),
    # NaN experts: pass 2 journals layer 0, then fails at layer 1; pass 1 (budget) likewise, in the measurement cache
    "nan-expert-pass-2": Case(COMPRESS, r"NaN or inf in the weights of model\.layers\.1\.mlp\.experts expert\(s\) \[2\]",
                              edit_tensors(nan_expert)),
    "nan-expert-pass-1": Case([*COMPRESS, "--budget", "4bits", "--budget-scope", "experts"],
                              r"NaN or inf in the weights of model\.layers\.1\.mlp\.experts", edit_tensors(nan_expert)),
    # compressed models
    "eval-truncated-compressed": Case(["eval", "{c}", "--ppl", "{m}/heldout.txt"], r"c/model\.safetensors: it is truncated",
                                      edit_bytes(lambda b: b[:-1000], "c/model.safetensors")),
    "compressed-formats-edited": Case(["eval", "{c}", "--ppl", "{m}/heldout.txt"],
                                      r"qweight: checkpoint \[192, 32\], model \[192, 64\]",
                                      edit_json("c/config.json", lambda c: c["quantization_config"]["experts"][
                                          "model.layers.0.mlp.experts"].__setitem__(0, "int8"))),
    "compressed-config-without-experts": Case(["inspect", "{c}"], r"quantization_config does not describe this model",
                                              edit_json("c/config.json", lambda c: c["quantization_config"].update(experts={}))),
    "compress-a-compressed-model": Case(["compress", "{c}", *OUT], r"already compressed"),
    # texts
    "calibration-text-empty": Case(["compress", "{m}", *OUT, "--calib", "{root}/e.txt"], r"text file is empty",
                                   write("e.txt", "\n \n")),
    "calibration-text-too-short": Case(["compress", "{m}", *OUT, "--calib", "{root}/s.txt", "--seq-len", "32"],
                                       r"\d+ tokens, fewer than one window of --seq-len 32", write("s.txt", "the quick fox")),
    "seq-len-absurd": Case(["compress", "{m}", *OUT, "--calib", "{m}/calib.txt", "--seq-len", "100000000"],
                           r"fewer than one window of --seq-len 100,000,000"),
    "calibration-text-is-a-directory": Case(["compress", "{m}", *OUT, "--calib", "{root}"], r"is a directory; pass a text"),
    "calibration-text-missing": Case(["compress", "{m}", *OUT, "--calib", "{root}/none.txt"], r"text file not found"),
    "eval-text-empty": Case(["eval", "{m}", "--ppl", "{root}/e.txt"], r"text file is empty", write("e.txt", "")),
    "eval-seq-len-0": Case([*EVAL, "--seq-len", "0"], r"--seq-len 0: a window needs"),
    "eval-batch-size-0": Case([*EVAL, "--batch-size", "0"], r"--batch-size 0"),
    "eval-text-shorter-than-a-window": Case([*EVAL, "--seq-len", "100000"], r"fewer than one window of --seq-len 100,000"),
    "eval-limit-0": Case(["eval", "{m}", "--tasks", "local_piqa", "--limit", "0"], r"--limit 0"),
    # --plan
    "plan-not-json": Case(WITH_PLAN, r"p\.json is not JSON", plan(text="{nope")),
    "plan-a-json-list": Case(WITH_PLAN, r"holds a JSON list, not a plan", plan(text="[1, 2]")),
    "plan-format-int7": Case(WITH_PLAN, r"unknown format 'int7'", plan(first_expert("int7"))),
    "plan-for-a-deeper-model": Case(WITH_PLAN, r"made for another model \(2 MoE block\(s\) the model does not have",
                                    plan(more_layers)),
    "plan-for-other-shapes": Case(WITH_PLAN, r"made for another model .*'gate_up': \[256, 64\]", plan(other_width)),
    "plan-ggml-type-on-short-rows": Case(WITH_PLAN, r"format q4_k cannot store rows of 64 weights",
                                         plan(first_expert("q4_k"))),
    "plan-over-its-budget": Case(WITH_PLAN, r"more than the budget of 1,000 bytes",
                                 plan(lambda p: p.update(budget_bytes=1000, scope="experts"))),
    "plan-field-of-wrong-type": Case(WITH_PLAN, r"'group_size' must be a positive integer",
                                     plan(lambda p: p.update(group_size="x"))),
    "plan-unknown-field": Case(WITH_PLAN, r"unexpected keyword argument 'colour'", plan(lambda p: p.update(colour="red"))),
    "plan-missing": Case([*COMPRESS, "--plan", "{root}/none.json"], r"plan file not found"),
    # outputs (dry runs obey the same rules as real runs)
    "dry-run-into-the-model": Case(["compress", "{m}", "--output", "{m}", "--dry-run", *CALIB],
                                   r"it is or contains the input model"),
    "dry-run-into-an-existing-output": Case([*COMPRESS, "--dry-run"], r"o exists; pass --overwrite", existing_output),
    "synthetic-dry-run-beside-its-config": Case(["compress", "{m}/config.json", "--dry-run", "--synthetic-stats",
                                                 "--output", "{m}", "--budget", "4bits"], r"it is or contains the input"),
    "output-under-a-file": Case(["compress", "{m}", "--output", "{root}/f/o", "--method", "rtn", *CALIB],
                                r"f is a file, not a directory", write("f", "x")),
    "output-read-only": Case(RTN, r"Read-only file system; that file system is read-only",
                             mock("compressor.io.outputs.tempfile.mkstemp", read_only)),
    "output-without-space": Case(RTN, r"not enough space for .* has 1,000 free",
                                 mock("compressor.io.outputs.shutil.disk_usage", lambda path: NoSpace())),
    # recipes
    "alias-bomb-in-notes": Case(RECIPE, r"more than 16 YAML aliases", write("r.yaml", alias_bomb("notes"))),
    "alias-bomb-in-calibration-text": Case(RECIPE, r"more than 16 YAML aliases",
                                           write("r.yaml", alias_bomb("calibration.text"))),
    "recipe-nested-too-deep": Case(RECIPE, r"more than 32 levels deep",
                                   write("r.yaml", "notes: " + "[" * 2000 + "]" * 2000)),
    "recipe-too-large": Case(RECIPE, r"a recipe is a few hundred", write("r.yaml", "notes: '" + "x" * 300_000 + "'")),
    "recipe-python-tag": Case(RECIPE, r"not valid YAML",
                              write("r.yaml", "notes: !!python/object/apply:os.system ['echo pwned']")),
    "recipe-long-wrong-value": Case(RECIPE, r"quantization\.bits: .*\(200,002 characters\)",
                                    write("r.yaml", "quantization:\n  bits: '" + "x" * 200_000 + "'")),
    "recipe-not-utf8": Case(RECIPE, r"not UTF-8 text", write("r.yaml", bytes(range(256)))),
    # upcycle (a dense Llama)
    "upcycle-truncated-weights": Case(UPCYCLE, r"d/model\.safetensors: it is truncated",
                                      edit_bytes(lambda b: b[: len(b) // 2], "d/model.safetensors")),
    "upcycle-top-k-0": Case([*UPCYCLE, "--top-k", "0"], r"--top-k 0: out of range"),
    "upcycle-checkpoint-every-0": Case([*UPCYCLE, "--train-text", "{m}/calib.txt", "--steps", "2",
                                        "--checkpoint-every", "0"], r"--checkpoint-every 0: out of range"),
    "upcycle-modules-not-a-regex": Case([*UPCYCLE, "--modules", "("], r"is not a regular expression"),
    "upcycle-train-text-too-short": Case([*UPCYCLE, "--train-text", "{root}/s.txt", "--steps", "2"],
                                         r"fewer than seq_len \+ 2 = 258: use a longer --train-text",
                                         write("s.txt", "the quick brown fox")),
    "upcycle-into-the-model": Case(["upcycle", "{d}", "--output", "{d}", "--experts", "2"],
                                   r"it is or contains the input model"),
    # export (of a compressed model)
    "export-an-original-model": Case(["export", "{m}", "--format", "gguf", *OUT], r"not a model compressed by"),
    "export-truncated-weights": Case(["export", "{c}", "--format", "gguf", *OUT], r"c/model\.safetensors: it is truncated",
                                     edit_bytes(lambda b: b[:-100], "c/model.safetensors")),
    "export-into-the-model": Case(["export", "{c}", "--format", "gguf", "--output", "{c}"],
                                  r"it is or contains the input model"),
    # settings that do not fit the model
    "dynamic-pruning-out-of-reach": Case([*RTN, "--dynamic-pruning", "0.9"],
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
    monkeypatch.setattr(pass1, "MEASUREMENTS_DIR", root / "cache")  # where make_plan reads it
    if case.setup:
        case.setup(root, monkeypatch)
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
