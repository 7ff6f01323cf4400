"""Already-ternary (MoTE) experts under --target gguf: kept as TQ1_0 where that is exact (ternarized in groups of
256 along rows of whole 256-blocks), read back by gguf-py's own dequantizer bit for bit equal to the checkpoint's
ternary weights; refused, naming the layer, the projection, why and the fix, where it is not."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compressor import api  # noqa: E402
from compressor.arch.view import find_moe_blocks  # noqa: E402
from compressor.export import export  # noqa: E402
from compressor.io.models import load_model  # noqa: E402
from compressor.planning import ternary_experts  # noqa: E402
from compressor.quantize.ternary import is_ternary  # noqa: E402
from compressor.targets import TargetError, target  # noqa: E402
from compressor.upcycle import ternarize, upcycle_cli  # noqa: E402
from tiny import budget_recipe, tiny_model, tiny_text, tiny_tokenizer  # noqa: E402

QUIET = dict(log=lambda *_: None)
WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of whole 256-weight blocks


def dense_llama(directory, hidden: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    (directory / "calib.txt").write_text(tiny_text(6000, seed=1))
    return directory


def mote(root, name: str, group_size: int, hidden: int = 256, intermediate: int = 512):
    """upcycle --ternary --group-size G (MoTE: ternary routed experts), trained two steps so that the experts differ."""
    dense = dense_llama(root / f"dense-{hidden}", hidden, intermediate)
    out = upcycle_cli(dense, root / name, experts=4, ternary=True, group_size=group_size,
                      train_text=dense / "calib.txt", steps=2, batch_size=2, seq_len=32, **QUIET)
    (out / "calib.txt").write_text(tiny_text(6000, seed=1))
    return out


def gguf_recipe(src, out, **over):
    return budget_recipe(src, out, **{"allocation.target": "gguf", "allocation.formats": ["keep"],
                                      "allocation.scope": "experts", **over})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tq")


@pytest.fixture(scope="module")
def mote256(root):
    return mote(root, "mote256", 256)


@pytest.mark.parametrize("budget", ["3bits", None])  # the budget LP (GPTQ, pass 1) and a uniform --bits plan
def test_ternary_experts_export_as_tq1_0_exactly(mote256, root, budget):
    from transformers import AutoModelForCausalLM

    name = f"out-{budget}"
    out = api.compress(gguf_recipe(mote256, root / name, **{"allocation.budget": budget}), **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    assert all(f == "tq1_0" for fmts in plan["experts"].values() for f in fmts)
    path, _ = export(out, "gguf", root / f"{name}.gguf", **QUIET)
    found = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    source = AutoModelForCausalLM.from_pretrained(mote256)
    ours = load_model(out)
    for b in find_moe_blocks(ours):
        src = source.model.layers[b.layer_idx].mlp.experts
        half = src.gate_up_proj.shape[1] // 2
        want = {"gate": src.gate_up_proj[:, :half], "up": src.gate_up_proj[:, half:], "down": src.down_proj}
        for proj in ("gate", "up", "down"):
            t = found[f"blk.{b.layer_idx}.ffn_{proj}_exps.weight"]
            assert t.tensor_type.name == "TQ1_0"
            theirs = gguf.quants.dequantize(t.data, t.tensor_type)
            pairs = [getattr(b.block.experts, str(e)) for e in range(b.num_experts)]
            mine = torch.stack([(p.down if proj == "down" else p.gate_up).dequantized() for p in pairs])
            mine = mine if proj == "down" else (mine[:, :half] if proj == "gate" else mine[:, half:])
            assert np.array_equal(theirs, mine.numpy())  # gguf-py reads our weights bit for bit
            assert np.array_equal(theirs, want[proj].float().detach().numpy())  # and they are the MoTE checkpoint's
    exps = sum(int(t.n_bytes) for n, t in found.items() if "_exps." in n)
    assert exps * 8 / sum(p.numel() for b in find_moe_blocks(source) for p in (b.gate_up(), b.down())) == 1.6875


def refusal(src, out, **over) -> str:
    with pytest.raises(TargetError) as e:
        api.compress(gguf_recipe(src, out, **over), **QUIET)
    assert not out.exists()
    return str(e.value)


def test_ternary_in_smaller_groups_is_refused_with_the_fix(root):
    src = mote(root, "mote128", 128)
    said = refusal(src, root / "out128", **{"allocation.budget": "3bits"})
    assert re.search(r"--target gguf: the experts of model\.layers\.0\.mlp\.experts \(layer 0\) .* gate/up .*"
                     r"within a block .*TQ1_0/TQ2_0 .*`upcycle --ternary --group-size 256`.*--target native", said), said


def test_rows_not_whole_blocks_are_refused(root):
    src = mote(root, "mote-narrow", 256, hidden=64, intermediate=96)  # group 256 on rows of 64: one group per row
    said = refusal(src, root / "out-narrow")  # the uniform plan refuses them too
    assert "gate/up projection has rows of 64 weights, not a whole number of blocks" in said
    assert "--group-size 256" in said and "--target native" in said


def wide_blocks():
    """A tiny wide Mixtral in memory: the checks read the blocks' weights, no file is needed."""
    m = tiny_model("mixtral", **WIDE).float()
    return m, find_moe_blocks(m)


def test_scales_fp16_cannot_hold_are_refused():
    m, blocks = wide_blocks()
    experts = m.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            p.copy_(torch.sign(p) * (0.1 + 2 ** -20))  # ternary values, a scale fp16 rounds
    assert not is_ternary(experts.down_proj, 256).any()
    with pytest.raises(TargetError, match=r"(?s)layer 0.*scales are not fp16 values.*TQ1_0/TQ2_0.*--target native"):
        ternary_experts(blocks, 128, target("gguf"))
    assert not any(ternary_experts(blocks, 128, target("native"))[blocks[0].name])  # native: ordinary weights


def test_mixed_layers_and_vllm_are_refused():
    m, blocks = wide_blocks()
    experts = m.model.layers[1].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[:2] = ternarize(experts.gate_up_proj[:2], 256)
        experts.down_proj[:2] = ternarize(experts.down_proj[:2], 256)
    assert ternary_experts(blocks, 128, target("native"))[blocks[1].name] == [True, True, False, False]
    with pytest.raises(TargetError, match=r"layer 1.*2 of 4 are already ternary.*one type per layer and projection"):
        ternary_experts(blocks, 128, target("gguf"))
    with pytest.raises(TargetError, match=r"--target vllm .*no ternary format.*--group-size 256"):
        ternary_experts(blocks, 128, target("vllm"))
    with torch.no_grad():
        experts.gate_up_proj.copy_(ternarize(experts.gate_up_proj, 256))
        experts.down_proj.copy_(ternarize(experts.down_proj, 256))
    assert ternary_experts(blocks, 128, target("gguf"))[blocks[1].name] == [True] * 4  # whole layer: TQ1_0, exact
