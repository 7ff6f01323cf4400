"""Experts computed from their packed form: grouped dispatch equals the per-token loop (pruned and masked slots
included), and a loaded compressed model holds the packed tensors, not dense copies."""

import pytest
import torch
import torch.nn.functional as F

from compressor import api
from compressor.arch.view import find_moe_blocks
from compressor.config import Recipe, apply_overrides
from compressor.io.checkpoint import tensor_nbytes
from compressor.io.models import load_model
from compressor.quantize import QuantSpec
from compressor.runtime.dispatch import HOST_SLOTS, group_by_expert
from compressor.runtime.experts import DenseExperts, PackedExperts, PackedMatrix
from compressor.runtime.kernels import WORKSPACE, report
from tiny import save_tiny, tiny_model

E = 4


def indices(T: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[torch.rand(T, k, generator=g) < 0.25] = -1  # slots dynamic pruning skipped
    idx[torch.rand(T, k, generator=g) < 0.05] = E  # out of range: belongs to no expert
    return idx


@pytest.mark.parametrize("T", [1, 3, HOST_SLOTS // 2 + 5, 300])  # host grouping and the sorted path
def test_group_by_expert_is_the_brute_force_grouping(T):
    idx = indices(T, 2, T)
    groups = list(group_by_expert(idx, E))
    want = {e: [s for s in range(idx.numel()) if idx.reshape(-1)[s] == e] for e in range(E)}
    assert [g[0] for g in groups] == [e for e in range(E) if want[e]]  # experts with tokens, in order, nothing else
    for e, tok, slots in groups:
        assert slots.tolist() == want[e] and tok.tolist() == [s // 2 for s in want[e]]


def per_token_reference(experts, hidden, idx, weights):
    """The definition: for every token and selected slot, weight x expert(token), in float64."""
    out = torch.zeros(hidden.shape[0], experts.out_features(), dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < experts.num_experts:
                continue
            w_gu, w_d = (w.double() for w in experts.expert_weights(e))
            h = experts.apply_gate(hidden[t].double() @ w_gu.T)
            out[t] += float(weights[t, j]) * (h @ w_d.T)
    return out


@pytest.fixture(scope="module")
def block():
    model = tiny_model("mixtral", num_local_experts=E)
    return find_moe_blocks(model)[0]


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2", "ternary", "int8", "q4_0"])
@pytest.mark.parametrize("T", [1, 2, 40])
def test_packed_experts_equal_the_per_token_reference(block, fmt, T):
    experts = PackedExperts.rtn(block, QuantSpec(fmt, group_size=32))
    hidden = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
    idx = indices(T, 2, seed=T + 1)
    weights = torch.rand(T, 2, generator=torch.Generator().manual_seed(T + 2))
    got = experts(hidden, idx, weights)
    ref = per_token_reference(experts, hidden, idx, weights)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    none = ((idx < 0) | (idx >= E)).all(-1)
    assert (got[none] == 0).all()  # a token with every slot pruned gets nothing


def test_dense_experts_follow_the_same_dispatch(block):
    dense = DenseExperts.from_view(block)
    hidden, idx = torch.randn(30, 64), indices(30, 2, seed=7)
    weights = torch.rand(30, 2)
    torch.testing.assert_close(dense(hidden, idx, weights).double(), per_token_reference(dense, hidden, idx, weights),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    src = save_tiny("mixtral", root / "src", dtype=torch.bfloat16)
    recipe = apply_overrides(Recipe(), {"model": str(src), "output": str(root / "out"), "quantization.method": "rtn",
                                        "quantization.bits": 4, "quantization.group_size": 32})
    return api.compress(recipe, log=lambda *_: None)


def test_loaded_model_holds_the_packed_tensors(compressed):
    model = load_model(compressed)
    on_disk = tensor_nbytes(compressed)
    state = model.state_dict()
    # every tensor the model holds is one the checkpoint holds, at its size: packed experts as written, the rest in
    # the checkpoint's 16-bit dtype; nothing else (no dense or fp32 expert copies)
    held = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n in state}
    assert {n: t.nbytes for n, t in held.items() if n in on_disk} == on_disk
    assert all(t.dtype != torch.float32 for n, t in held.items() if n in on_disk)
    for b in find_moe_blocks(model):
        for m in b.block.experts.modules():
            if isinstance(m, PackedMatrix):
                assert {n: t.dtype for n, t in m.tensors().items()} == {"qweight": torch.uint8, "scales": torch.float16,
                                                                         "zeros": torch.float16}
    r = report(model)
    assert r["extra_bytes"] == 0 or r["paths"].get("native") is None  # compiled kernels read the packed bytes as is
    ids = torch.randint(0, 300, (2, 40))
    WORKSPACE.buffers.clear()  # shared by the process: only this model's use
    with torch.no_grad():
        model(input_ids=ids)
    largest = max(m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedMatrix))
    assert report(model)["workspace_bytes"] <= 4 * largest  # one matrix at a time, never the model


def test_loaded_model_matches_its_dense_equivalent(compressed):
    """The model in 16-bit with packed experts equals the same weights dequantized to dense (in float32)."""
    packed = load_model(compressed, torch.float32)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        logits = packed(input_ids=ids).logits
        for b in find_moe_blocks(packed):
            ex = b.block.experts
            pairs = [ex.expert_weights(e) for e in range(ex.num_experts)]
            b.block.experts = DenseExperts(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                                           ex.apply_gate)
        torch.testing.assert_close(packed(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert F.cosine_similarity(load_model(compressed)(input_ids=ids).logits.float().flatten(), logits.flatten(),
                               dim=0) > 0.999  # the 16-bit load: the same model up to bfloat16 rounding


def test_decode_calls_take_one_compiled_call_when_they_can(block):
    from compressor.runtime.fused import FusedExperts, activation_code
    from compressor.runtime.kernels import native

    if native.library() is None:
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    experts = PackedExperts.rtn(block, QuantSpec("int4", group_size=32))
    experts(torch.randn(1, 64), torch.tensor([[1, 3]]), torch.tensor([[0.6, 0.4]]))
    assert isinstance(experts.__dict__["_fused"], FusedExperts)
    getattr(experts, "1").gate_up.qweight = getattr(experts, "1").gate_up.qweight.clone()  # a replaced tensor
    assert not experts.__dict__["_fused"].current()
    assert activation_code(experts.apply_gate, 48) == 0
    assert activation_code(lambda x: F.gelu(x[:, :48]) * x[:, 48:], 48) is None  # another activation: generic path
