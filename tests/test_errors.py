"""Bad input gets a clear error naming the problem and the fix, through the CLI (exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch

import cli
from compressor.config import RecipeError, load_recipe
from tiny import save_tiny


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral"))


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_architecture_lists_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run(capsys, "compress", str(tmp_path), "--output", str(tmp_path / "o"))
    assert code == 2 and "unsupported architecture 'llama'" in err and "mixtral" in err and "gpt_oss" in err


def test_missing_model_dir_and_config(tmp_path, capsys):
    code, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "model directory not found" in err
    code, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "no config.json" in err


def test_pickle_only_weights_are_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "pickle" in err and "safe_serialization" in err


def test_malformed_recipe_suggests_the_key(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("quantization:\n  bitz: 4\n")
    with pytest.raises(RecipeError, match=r"quantization.bitz: unknown key; did you mean 'bits'"):
        load_recipe(bad)
    bad.write_text("quantization:\n  bits: five\n")
    with pytest.raises(RecipeError, match=r"quantization.bits"):
        load_recipe(bad)
    code, err = run(capsys, "compress", "--recipe", str(bad))
    assert code == 2 and "quantization.bits" in err


def test_bad_budget_text_is_a_recipe_error(capsys):
    code, err = run(capsys, "compress", "--budget", "3.4 parsecs", "--dry-run")
    assert code == 2 and "3.4 parsecs" in err and "GiB" in err


def test_infeasible_budget_via_cli(src, tmp_path, capsys):
    code, err = run(capsys, "compress", str(src), "--output", str(tmp_path / "o"), "--budget", "10KB",
                    "--calib", str(src / "calib.txt"), "--samples", "2", "--seq-len", "32")
    assert code == 2 and "smallest size reachable" in err
    assert not (tmp_path / "o").exists()


def test_nan_activations_name_layer(src, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "nan"
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "calib.txt"):
        (bad / f).write_bytes((src / f).read_bytes())
    code, err = run(capsys, "compress", str(bad), "--output", str(tmp_path / "o"), "--calib", str(bad / "calib.txt"),
                    "--samples", "2", "--seq-len", "32")
    assert code == 2 and "NaN or inf" in err and "layer 1" in err


def test_nan_weights_name_the_expert(src, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "nanw"
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[2, 0, 0] = float("inf")
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "calib.txt"):
        (bad / f).write_bytes((src / f).read_bytes())
    code, err = run(capsys, "compress", str(bad), "--output", str(tmp_path / "o"), "--calib", str(bad / "calib.txt"),
                    "--samples", "2", "--seq-len", "32")
    assert code == 2 and "model.layers.0.mlp.experts expert(s) [2] (down)" in err


def test_compressing_a_compressed_model_is_refused(src, tmp_path, capsys):
    out = tmp_path / "once"
    assert cli.main(["compress", str(src), "--output", str(out), "--method", "rtn", "--group-size", "32"]) == 0
    capsys.readouterr()
    code, err = run(capsys, "compress", str(out), "--output", str(tmp_path / "twice"))
    assert code == 2 and "already compressed" in err


def test_unfused_experts_are_named():
    from torch import nn

    from compressor.arch.families import UnsupportedArchitecture
    from compressor.arch.view import find_moe_blocks
    from tiny import tiny_model

    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(UnsupportedArchitecture, match="layer 0 stores its experts as ModuleList"):
        find_moe_blocks(model)
