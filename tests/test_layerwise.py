"""The layer-by-layer driver reproduces the model's own forward: every layer gets its own arguments
(GPT-OSS alternates sliding-window and full attention masks), in fp32, one layer at a time."""

from __future__ import annotations

import pytest
import torch

from compressor.calibration.layerwise import layerwise
from tiny import tiny_model


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_layerwise_matches_full_forward(model_type):
    model = tiny_model(model_type)
    windows = torch.randint(0, 300, (5, 48))  # 48 > GPT-OSS's sliding window of 32; batches of 2, 2, 1
    final_in = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: final_in.append(args[0]))
    with torch.no_grad():
        for batch in windows.split(2):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    seen = []
    hidden = layerwise(model, windows, lambda i, layer, inputs: seen.append(i), batch_size=2)
    assert seen == list(range(len(model.model.layers)))
    for got, want in zip(hidden, final_in):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
