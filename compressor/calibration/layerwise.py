"""The layer-by-layer driver (GPTQ's shape): one decoder layer in fp32 at a time, fed the outputs of
the layers before it as they were left by `on_layer` (quantized, in the quantize pass).

Peak memory is one layer in fp32 plus the calibration activations [samples, seq_len, hidden],
whatever the number of layers, on top of the model held in 16 bits; with a streamed model
(io/streaming.py: `resident` reads each layer from disk and releases it after) the model is not held.
The layer and the activations are on the compute `device` (compressor/device.py); the model stays on the host.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.view import decoder_layers
from ..device import HOST, to_device


@dataclass
class LayerInputs:
    """What a pass callback gets as `inputs`: `run(layer)` drives the calibration data through the layer (and so
    through the observers the pass hooked into it). calibration/images.BlockInputs is the same for images."""
    hidden: list[torch.Tensor]  # one [b, L, H] tensor per mini-batch
    kwargs: list[dict[str, Any]]  # the decoder layer's keyword arguments for that mini-batch

    def run(self, layer: nn.Module) -> "LayerInputs":
        return run_layer(layer, self)


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # the first decoder layer's input, one [b, L, H] per mini-batch
    layer_kwargs: list[list[dict[str, Any]]]  # [layer][mini-batch]: each layer's own keyword arguments

    def inputs(self, layer: int, hidden: list[torch.Tensor] | None = None) -> LayerInputs:
        return LayerInputs(self.hidden if hidden is None else hidden, self.layer_kwargs[layer])

    def to(self, device: torch.device) -> "Captured":
        """The same inputs on `device` (shared masks and rotary tables moved once)."""
        memo: dict = {}
        return Captured(to_device(self.hidden, device, memo), to_device(self.layer_kwargs, device, memo))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, batch_size: int) -> Captured:
    """The first layer's input for every mini-batch, and every layer's keyword arguments.

    Layers may differ in their arguments (GPT-OSS alternates sliding and full attention masks), and
    the arguments depend only on the batch shape, never on what a layer computes: for the first
    mini-batch of each shape every layer is called with its forward replaced by the identity, which
    records its arguments; the other mini-batches stop at the first layer. No layer computes, so the
    layers of a streamed model may still be on the meta device (only the embeddings and rotary tables run)."""
    layers = decoder_layers(model)
    by_shape: dict[tuple, list[dict[str, Any]]] = {}
    hidden, shapes, memo = [], [], {}
    for batch in windows.split(batch_size) if len(windows) else ():  # no windows (a rank with none): no batches
        shape = tuple(batch.shape)
        record = shape not in by_shape
        recorded: list[dict[str, Any]] = []

        def grab(module, args, kwargs):
            if module is layers[0]:
                hidden.append((args[0] if args else kwargs["hidden_states"]).float())
            if not record:
                raise _Stop
            recorded.append({k: _to_float(v, memo) for k, v in kwargs.items() if k != "hidden_states"})
            if module is layers[-1]:
                raise _Stop  # nothing after the layers is needed (and a streamed model has no LM head)

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
        try:
            with skipped_layers(layers):
                model(input_ids=batch, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if record:
            by_shape[shape] = recorded
        shapes.append(shape)
    return Captured(hidden, [[by_shape[s][i] for s in shapes] for i in range(len(layers))])


@contextmanager
def skipped_layers(layers: nn.ModuleList, last_output: torch.Tensor | None = None):
    """Each layer's forward returns its input (its hooks still run), the last one `last_output` when given (what
    follows the layers then runs on it: the model's own head); restored on exit."""
    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = identity
    if last_output is not None:
        layers[-1].forward = lambda *args, **kwargs: last_output
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _to_float(v: Any, memo: dict[int, Any]) -> Any:
    """Floating tensors to fp32, each converted once (layers share masks and rotary tables)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        if id(v) not in memo:
            memo[id(v)] = (v, v.float())  # keep v alive so its id is not reused
        return memo[id(v)][1]
    if isinstance(v, tuple):
        return tuple(_to_float(x, memo) for x in v)
    return v


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)


OnLayer = Callable[[int, nn.Module, LayerInputs | None], LayerInputs | None]
# resident(i, layer): holds layer i's weights while it is worked on (StreamedModel.resident reads them from disk)
Resident = Callable[[int, nn.Module], AbstractContextManager]


@contextmanager
def in_memory(_i: int, _layer: nn.Module):
    """The layer's weights are already in memory (a loaded model)."""
    yield


@contextmanager
def in_fp32(layer: nn.Module, device: torch.device = HOST):
    """The layer in fp32 on `device` while it is worked on, then back on the host in its own dtype."""
    dtype = next(layer.parameters()).dtype
    layer.to(device=device, dtype=torch.float32)
    try:
        yield
    finally:
        layer.to(device=HOST, dtype=dtype)


@torch.no_grad()
def layerwise(model: nn.Module, windows: torch.Tensor | None, on_layer: OnLayer, batch_size: int = 8,
              desc: str = "layers", resident: Resident = in_memory, device: torch.device = HOST):
    """Call `on_layer(i, layer, inputs)` for each decoder layer in order, the layer in fp32 on `device`; then
    propagate the inputs through the layer as `on_layer` left it. Returns the final hidden states (on `device`).
    With `windows` None nothing runs through the model: `on_layer` gets inputs None (RTN needs no data).
    `resident` makes each layer's weights present while it is worked on (default: they are)."""
    captured = capture(model, windows, batch_size).to(device) if windows is not None else None
    hidden = captured.hidden if captured else None
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc, unit="layer")):
        with resident(i, layer), in_fp32(layer, device):
            inputs = captured.inputs(i, hidden) if captured else None
            outputs = on_layer(i, layer, inputs)  # a callback that leaves the layer unchanged may return its outputs
            if inputs is not None:
                hidden = (outputs or run_layer(layer, inputs)).hidden
    return hidden
