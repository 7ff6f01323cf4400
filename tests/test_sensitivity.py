"""Layer sensitivity (calibration/sensitivity.py): the layer-by-layer backward gives exactly the gradients of a
full-model backward, on every supported architecture, loaded or streamed, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.arch.view import decoder_layers
from compressor.calibration.sensitivity import layer_sensitivity
from compressor.io.streaming import StreamedModel
from tiny import CONFIGS, save_tiny, tiny_model


def windows(n: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(1))


def full_backward(model, ids: torch.Tensor) -> torch.Tensor:
    """Brute force: one autograd pass through the whole model per window, the gradient kept at every layer's output."""
    layers = decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    for w in ids.split(1):
        outs = {}

        def keep(i):
            def hook(_m, _a, out):
                h = out[0] if isinstance(out, tuple) else out
                h.retain_grad()
                outs[i] = h
            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
        try:
            logits = model(input_ids=w, use_cache=False).logits.float()
            F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum").backward()
        finally:
            for h in handles:
                h.remove()
        total += torch.stack([outs[i].grad.double().pow(2).sum() for i in range(len(layers))])
        model.zero_grad(set_to_none=True)
    return total / ids.numel()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layerwise_backward_equals_full_backward(model_type):
    model = tiny_model(model_type).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = windows()
    s = layer_sensitivity(model, ids, batch_size=2)
    assert s.shape == (len(decoder_layers(model)),) and (s > 0).all()
    torch.testing.assert_close(s, full_backward(model, ids), rtol=2e-4, atol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed, no gradient left behind
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_equals_loaded(tmp_path, tied):
    """A streamed 16-bit checkpoint gives the sensitivity of the same checkpoint loaded (the layers run in fp32 either
    way), and its layers and head are back on the meta device afterwards."""
    src = save_tiny("mixtral", tmp_path / "m", dtype=torch.bfloat16, tie_word_embeddings=tied)
    from compressor.io.models import load_model

    ids = windows()
    loaded = load_model(src, dtype=torch.bfloat16)
    stream = StreamedModel(src, torch.bfloat16)
    stem = stream.resident_bytes()
    s_stream = layer_sensitivity(stream.model, ids, stream.resident, stream.head)
    torch.testing.assert_close(s_stream, layer_sensitivity(loaded, ids), rtol=1e-5, atol=0)
    assert stream.resident_bytes() == stem


def test_sensitivity_moves_bits_to_the_sensitive_layer():
    """Two layers with identical error tables: with output-energy weighting the LP treats them alike; when layer 0
    is measured 100x more sensitive, the global objective gives it the larger formats at the same bytes."""
    import numpy as np

    from compressor.allocation.lp import solve_allocation
    from compressor.measure import BlockMeasurement
    from compressor.planning import costs

    formats = ["int4", "int2"]
    eps = torch.tensor([[1.0, 16.0]] * 4)  # [E, F]: int2 costs 16x int4's error
    ms = [BlockMeasurement(f"layers.{i}.experts", i, formats, torch.full((4,), 10), torch.ones(4), 20, eps.clone(),
                           eps.clone(), out_energy=100.0) for i in range(2)]
    nbytes = np.array([[4, 2]] * 8)
    capacity = 8 * 2 + 4 * 2  # room for int4 on half of the experts

    def int4_per_layer(cost):
        choice = solve_allocation(cost, nbytes, capacity).choice
        return [int((choice[4 * i:4 * i + 4] == 0).sum()) for i in range(2)]

    energy = costs(ms, "global")
    np.testing.assert_allclose(energy[:4], energy[4:])
    weighted = costs(ms, "global", torch.tensor([100.0, 1.0]))
    np.testing.assert_allclose(weighted[:4], 100 * weighted[4:])
    np.testing.assert_allclose(weighted[4:], eps.double().numpy() / 20)  # eps x s_l / tokens
    assert int4_per_layer(weighted) == [4, 0]


def test_nan_weights_give_a_clear_error():
    from compressor.calibration.stats import NonFiniteError

    model = tiny_model("mixtral").float()
    with torch.no_grad():
        decoder_layers(model)[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer sensitivity is not finite.*--layer-weights output_energy"):
        layer_sensitivity(model, windows())
