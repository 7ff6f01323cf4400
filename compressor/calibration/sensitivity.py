"""Layer sensitivity: how much the calibration loss reacts to an error added to each decoder layer's output.

The budget LP adds up per-expert output errors eps[e, f] (squared block-output error summed over the expert's routed
tokens) across layers, so it needs them in one currency. An error delta_t added to the residual stream after layer
l at token t raises the loss by about delta_t^T F delta_t / 2, F the Fisher (Gauss-Newton) matrix of the loss in that
hidden state. Taking F per layer as s_l * I, with

    s_l = mean over calibration tokens t of || d loss / d h_{l,t} ||^2      (loss: summed next-token cross-entropy)

(the trace of the empirical Fisher per token), the expected cost of expert e in format f is s_l * eps[e, f] / tokens.
The block-output energy that eps was divided by before is blind to where the error lands: on the reference MoE,
layers 11 and 28-29 write massive activations (block output energy ~1000x the other layers), which made their
relative errors look ~100x smaller than elsewhere, while s_l measures them as the most sensitive layers (see the
README's budget section).

Measured without the model whole in memory: a forward layer by layer keeping each layer's input (memory: every
layer's input for the sensitivity windows, [layers, windows, seq_len, hidden] in fp32), the loss gradient at the
last layer's output through the model's own head (final norm, LM head, any logit scaling), then a backward layer by
layer in reverse order, each layer read once more, in fp32, its weights frozen.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch.view import decoder_layers
from .layerwise import Resident, capture, in_fp32, in_memory, run_layer, skipped_layers
from ..device import HOST
from .stats import NonFiniteError


@torch.no_grad()
def layer_sensitivity(model: nn.Module, windows: torch.Tensor, resident: Resident = in_memory,
                      head: Callable[[], AbstractContextManager] = nullcontext, batch_size: int = 1,
                      device: torch.device = HOST) -> torch.Tensor:
    """s [layers]: mean over the tokens of `windows` [n, seq_len] of ||d loss / d (output of layer l)||^2, the loss
    being the summed next-token cross-entropy. `resident(i, layer)` holds layer i's weights while it runs (a
    streamed model reads them), `head()` the LM head while the loss is computed; each layer runs on `device`."""
    return combine_terms(sensitivity_terms(model, windows, resident, head, batch_size, device), windows.numel())


@torch.no_grad()
def sensitivity_terms(model: nn.Module, windows: torch.Tensor, resident: Resident = in_memory,
                      head: Callable[[], AbstractContextManager] = nullcontext, batch_size: int = 1,
                      device: torch.device = HOST) -> torch.Tensor:
    """[batches, layers] float64: each mini-batch's summed squared loss gradient at each layer's output. Batches are
    independent, so the windows may be split over workers and their terms concatenated in window order."""
    layers = decoder_layers(model)
    captured = capture(model, windows, batch_size).to(device)
    hidden, inputs = captured.hidden, []
    for i, layer in enumerate(tqdm(layers, desc="sensitivity: forward", unit="layer")):
        with resident(i, layer), in_fp32(layer, device):
            inputs.append(captured.inputs(i, hidden))
            hidden = run_layer(layer, inputs[-1]).hidden
    with head(), _outside_layers_in_fp32(model):  # the head runs on the host, where the model is held
        grads = [_loss_grad(model, h.to(HOST), ids).to(device) for h, ids in zip(hidden, windows.split(batch_size))]
    terms = torch.zeros(len(grads), len(layers), dtype=torch.float64)
    for i in tqdm(range(len(layers) - 1, -1, -1), desc="sensitivity: backward", unit="layer"):
        terms[:, i] = torch.tensor([float(g.double().pow(2).sum()) for g in grads], dtype=torch.float64)
        if i == 0:
            break
        with resident(i, layers[i]), in_fp32(layers[i], device), _frozen(layers[i]), torch.enable_grad():
            grads = [_input_grad(layers[i], h, kwargs, g)
                     for h, kwargs, g in zip(inputs[i].hidden, inputs[i].kwargs, grads)]
        inputs[i] = None  # released as the backward moves down
    return terms


def combine_terms(terms: torch.Tensor, tokens: int) -> torch.Tensor:
    """s [layers] from the terms of every mini-batch [batches, layers], summed in batch order, over `tokens`."""
    layers = terms.shape[1]
    s = torch.tensor([sum(terms[:, i].tolist()) / tokens for i in range(layers)], dtype=torch.float64)
    if not torch.isfinite(s).all():
        bad = [i for i in range(layers) if not torch.isfinite(s[i])]
        raise NonFiniteError(f"layer sensitivity is not finite at layers {bad}: the model's activations or loss "
                             "overflow on the calibration text; check the model in fp32 on that text, or pass "
                             "--layer-weights output_energy to plan without it")
    return s


def _input_grad(layer: nn.Module, h: torch.Tensor, kwargs: dict, grad_out: torch.Tensor) -> torch.Tensor:
    h = h.detach().requires_grad_(True)
    out = layer(h, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (grad_in,) = torch.autograd.grad(out, h, grad_out)
    return grad_in


def _loss_grad(model: nn.Module, h_last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d (summed next-token cross-entropy of `ids`) / d (output of the last decoder layer) = h_last: the model's own
    forward with every decoder layer skipped and the last one returning h_last, so whatever follows the layers
    (final norm, LM head, logit scaling or soft-capping) is the model's code."""
    leaf = h_last.detach().requires_grad_(True)
    with skipped_layers(decoder_layers(model), leaf), torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad


@contextmanager
def _outside_layers_in_fp32(model: nn.Module):
    """The tensors outside the decoder layers (embeddings, final norm, LM head) in fp32 while the loss is computed on
    the fp32 output of the last layer; restored on exit (tied tensors once)."""
    inside = {id(t) for t in [*decoder_layers(model).parameters(), *decoder_layers(model).buffers()]}
    saved = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside and id(t) not in saved and t.is_floating_point() and not t.is_meta:
            saved[id(t)] = (t, t.data)
            t.data = t.data.float()
    try:
        yield
    finally:
        for t, data in saved.values():
            t.data = data


@contextmanager
def _frozen(module: nn.Module):
    """No weight gradients (only the input's is wanted)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
