"""The layer-by-layer driver (GPTQ's shape): one decoder layer in fp32 at a time, fed the outputs of
the layers before it as they were left by `on_layer` (quantized, in the quantize pass).

Peak memory is one layer in fp32 plus the calibration activations [samples, seq_len, hidden],
whatever the number of layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.view import decoder_layers


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one [b, L, H] tensor per mini-batch
    kwargs: list[dict[str, Any]]  # the decoder layer's keyword arguments for that mini-batch


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_first_layer(model: nn.Module, windows: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the embeddings on every mini-batch and stop at the first decoder layer's input."""
    first = decoder_layers(model)[0]
    got = LayerInputs([], [])

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.hidden.append(hidden.float())
        got.kwargs.append({k: _to_float(v) for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return got


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, tuple):
        return tuple(_to_float(x) for x in v)
    return v


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)


OnLayer = Callable[[int, nn.Module, LayerInputs], None]


@torch.no_grad()
def layerwise(model: nn.Module, windows: torch.Tensor, on_layer: OnLayer, batch_size: int = 8, desc: str = "layers"):
    """Call `on_layer(i, layer, inputs)` for each decoder layer in order, the layer in fp32; then
    propagate the inputs through the layer as `on_layer` left it. Returns the final hidden states."""
    inputs = capture_first_layer(model, windows, batch_size)
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc, unit="layer")):
        dtype = next(layer.parameters()).dtype
        layer.float()
        on_layer(i, layer, inputs)
        inputs = run_layer(layer, inputs)
        layer.to(dtype)
    return inputs
