"""Up-cycling (CuMo plain / MoTE ternary + shared expert) on a tiny random Llama."""
from __future__ import annotations

import json

import pytest
import torch

from compressor.quantize import QuantSpec, quantize_ternary
from compressor.upcycle import (is_ternary, shared_output, ternarize, train, upcycle,
                                upcycle_cli)
from compressor.upcycle.build import ternary_experts
from compressor.upcycle.train import latest_checkpoint

H, I, V = 64, 96, 300


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def repeated_ids(n: int = 2000, period: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (period,), generator=g).repeat(n // period + 1)[:n]


def saved(dense, directory):
    """`dense` with a tokenizer, as a model directory for upcycle_cli."""
    from tiny import tiny_tokenizer

    dense.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


# ------------------------------------------------------------------------------------------- ternary core

@pytest.mark.parametrize("shape,gs", [((3, 10, 256), 128), ((3, 10, 200), 128), ((2, 5, 70), 32), ((2, 5, 64), 128)])
def test_ternarize_matches_quantize_ternary_and_is_detected(shape, gs):
    torch.manual_seed(0)
    W = torch.randn(shape)
    T = ternarize(W, gs)
    assert torch.equal(T, quantize_ternary(W, QuantSpec("ternary", gs)).dequantize())
    assert is_ternary(T, gs).all() and not is_ternary(W, gs).any()
    assert torch.equal(quantize_ternary(T, QuantSpec("ternary", gs)).dequantize(), T)  # lossless re-packing


def test_is_ternary_per_expert_and_group():
    torch.manual_seed(0)
    W = ternarize(torch.randn(4, 8, 256), 128)
    W[2, 3, 5] = 1.5 * W[2, 3].abs().max()  # a fourth value in one (row, group) of expert 2
    assert is_ternary(W, 128).tolist() == [True, True, False, True]
    assert is_ternary(W[:, :, :128], 64).tolist() == [True, True, False, True]  # subgroups of a ternary group
    assert not is_ternary(ternarize(torch.randn(2, 8, 256), 64), 128).any()  # coarser groups: different scales
    W[0] = 0.1 + 2 ** -20  # one value per row, but its scale is not fp16-exact: packing would lose it
    assert not bool(is_ternary(W, 128)[0])


# ------------------------------------------------------------------------------------------- up-cycling

def test_plain_upcycling_step0_logits_equal_dense(dense):
    ids = torch.randint(0, V, (2, 24))
    moe = upcycle(dense, experts=4, top_k=2)
    assert moe.config.model_type == "mixtral"
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=2e-6, rtol=1e-5)
    part = upcycle(dense, experts=4, top_k=2, modules=r"layers\.1\.mlp")  # --modules: layer 0 stays dense
    assert part.config.model_type == "qwen2_moe" and part.config.mlp_only_layers == [0]
    assert not hasattr(part.model.layers[0].mlp, "experts") and hasattr(part.model.layers[1].mlp, "experts")
    with torch.no_grad():
        torch.testing.assert_close(part(ids).logits, dense(ids).logits, atol=2e-6, rtol=1e-5)


def test_drop_upcycling_reinitialises_its_share_of_each_experts_neurons(dense):
    moe = upcycle(dense, experts=4, top_k=2, drop_ratio=0.25, seed=3)
    n = round(0.25 * I)
    for dl, ml in zip(dense.model.layers, moe.model.layers):
        wg, wu, wd = (m.weight for m in (dl.mlp.gate_proj, dl.mlp.up_proj, dl.mlp.down_proj))
        gu, down = ml.mlp.experts.gate_up_proj, ml.mlp.experts.down_proj
        dropped = []
        for e in range(4):
            kept = (gu[e, :I] == wg).all(1) & (gu[e, I:] == wu).all(1) & (down[e] == wd).all(0)
            gone = ~kept
            assert int(gone.sum()) == n  # exactly the share, and every other neuron is the FFN's, bit for bit
            assert (down[e][:, gone] == 0).all() and not (gu[e, :I][gone] == wg[gone]).any(1).all()
            dropped.append(frozenset(gone.nonzero().flatten().tolist()))
        assert len(set(dropped)) == 4  # independent draws per expert: the experts differ
    again = upcycle(dense, experts=4, top_k=2, drop_ratio=0.25, seed=3)
    assert torch.equal(again.model.layers[1].mlp.experts.gate_up_proj, moe.model.layers[1].mlp.experts.gate_up_proj)
    with pytest.raises(ValueError, match="drop ratio"):
        upcycle(dense, experts=4, drop_ratio=1.5)


def test_mote_shared_expert_equals_dense_ffn_and_ste_gradients(dense):
    moe = upcycle(dense, experts=4, ternary=True, shared_expert=True)
    assert moe.config.model_type == "qwen2_moe" and moe.config.num_experts_per_tok == 1
    x = torch.randn(7, H)
    for i in range(2):
        block = moe.model.layers[i].mlp
        assert torch.equal(shared_output(block, x), dense.model.layers[i].mlp(x))
        latent = block.experts.parametrizations.gate_up_proj.original
        assert torch.equal(latent[1], torch.cat([dense.model.layers[i].mlp.gate_proj.weight,
                                                 dense.model.layers[i].mlp.up_proj.weight]))
        assert is_ternary(block.experts.gate_up_proj.detach(), 128).all()  # the forward sees ternary weights
    ids = torch.randint(0, V, (2, 16))
    loss = moe(ids, labels=ids).loss
    loss.backward()
    for m in ternary_experts(moe):
        for name in ("gate_up_proj", "down_proj"):
            g = m.parametrizations[name].original.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert moe.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # top-1 router learns (p, not renormalised)


def test_training_lowers_loss_on_repeated_text(dense):
    moe = upcycle(dense, experts=4, ternary=True, shared_expert=True)
    r = train(moe, repeated_ids(), steps=12, lr=3e-3, batch_size=4, seq_len=32, progress=False)
    assert r.steps == 12 and r.tokens == 12 * 4 * 32
    assert sum(r.losses[-3:]) / 3 < r.losses[0] - 0.5, r.losses
    assert all(b >= 0.99 for b in r.balance)  # Switch loss is >= 1 up to routing-vs-probability mismatch


def test_resume_after_interruption_continues_from_checkpoint(dense, tmp_path):
    ids, kw = repeated_ids(), dict(steps=4, lr=3e-3, batch_size=2, seq_len=16, checkpoint_every=2, progress=False)
    full = upcycle(dense, experts=4, ternary=True, shared_expert=True)
    ref = train(full, ids, **kw)

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    first = upcycle(dense, experts=4, ternary=True, shared_expert=True)
    with pytest.raises(Killed):
        train(first, ids, checkpoint_dir=tmp_path, on_step=kill_at_3, **kw)
    assert latest_checkpoint(tmp_path).name == "step-2"
    again = upcycle(dense, experts=4, ternary=True, shared_expert=True)  # a fresh process: weights from step 0
    r = train(again, ids, checkpoint_dir=tmp_path, **kw)
    assert r.start_step == 2 and r.steps == 4 and r.tokens == ref.tokens
    assert r.losses[:2] == ref.losses[:2]
    torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(ref.losses), atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(again.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_upcycle_cli_saves_a_ternary_mote_model_that_reloads(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    src = saved(dense, tmp_path / "dense")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    out = upcycle_cli(src, tmp_path / "mote", experts=4, ternary=True, shared_expert=True, train_text=text,
                      steps=3, lr=1e-3, batch_size=2, seq_len=32, log=lambda *_: None)
    with pytest.raises(FileExistsError):
        upcycle_cli(src, src / "inside", experts=4, log=lambda *_: None)
    info = json.loads((out / "upcycle.json").read_text())
    assert info["steps"] == 3 and info["train_tokens"] == 3 * 2 * 32
    assert not any(tmp_path.glob(".mote*"))  # no temporary or checkpoint directory left behind
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.model_type == "qwen2_moe"
    for layer in moe.model.layers:
        assert is_ternary(layer.mlp.experts.gate_up_proj.detach(), 128).all()
        assert is_ternary(layer.mlp.experts.down_proj.detach(), 128).all()
        assert not is_ternary(layer.mlp.shared_expert.down_proj.weight.detach()[None], 128).any()
    from compressor.arch.view import find_moe_blocks

    assert len(find_moe_blocks(moe)) == 2  # the compressor sees the up-cycled experts


# ------------------------------------------------------------------------------------ compressing the result

@pytest.fixture(scope="module")
def upcycled(dense, tmp_path_factory):
    from tiny import tiny_text

    root = tmp_path_factory.mktemp("upcycled")
    saved(dense, root / "dense")
    (root / "text.txt").write_text(tiny_text(3000))
    out = {}
    for name, kw in (("mote", dict(ternary=True, shared_expert=True)), ("plain", {})):
        out[name] = upcycle_cli(root / "dense", root / name, experts=4, train_text=root / "text.txt", steps=2,
                                batch_size=2, seq_len=32, log=lambda *_: None, **kw)
    return root, out


def compress_budget(root, model_dir, name):
    from compressor import api
    from compressor.config import Recipe, apply_overrides

    recipe = apply_overrides(Recipe(), {
        "model": str(model_dir), "output": str(root / name), "allocation.budget": "2.5bits",
        "allocation.scope": "experts", "allocation.formats": ["keep", "int8", "int4", "int3", "int2", "ternary"],
        "calibration.text": str(root / "text.txt"), "calibration.samples": 4, "calibration.seq_len": 64})
    return api.compress(recipe, log=lambda *_: None)


@pytest.mark.parametrize("mode", ["mote", "plain"])
def test_compress_upcycled_with_expert_budget(upcycled, mode):
    from compressor.io.models import load_model

    root, dirs = upcycled
    out = compress_budget(root, dirs[mode], f"{mode}-2.5bits")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget_bytes"] is not None
    model = load_model(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, V, (1, 16))).logits).all()


def test_compress_keeps_mote_ternary_experts_exact(upcycled):
    from transformers import AutoModelForCausalLM

    from compressor.io.models import load_model

    root, dirs = upcycled
    out = compress_budget(root, dirs["mote"], "mote-kept")
    src, packed = AutoModelForCausalLM.from_pretrained(dirs["mote"]), load_model(out)
    for layer_src, layer in zip(src.model.layers, packed.model.layers):
        experts = layer.mlp.experts
        assert experts.formats() == ["ternary"] * experts.num_experts
        for e in range(experts.num_experts):
            gu, d = experts.expert_weights(e)
            assert torch.equal(gu, layer_src.mlp.experts.gate_up_proj[e].float())
            assert torch.equal(d, layer_src.mlp.experts.down_proj[e].float())


def test_upcycle_cli_drop_ratio_is_recorded_and_warns_without_training(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    src = saved(dense, tmp_path / "dense")
    said = []
    out = upcycle_cli(src, tmp_path / "drop", experts=4, drop_ratio=0.25, log=said.append)
    assert any("never trained" in s for s in said)
    assert json.loads((out / "upcycle.json").read_text())["drop_ratio"] == 0.25
    gu = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(gu[0], gu[1])  # the experts differ once saved and reloaded
