"""Drop-in experts modules: the same call as every transformers-5 experts module,
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` (or [T, O]: an MoE in place
of a two-layer MLP whose output width differs from its input, runtime/moe.py).

`DenseExperts` runs canonical fp32 weights (calibration, fake quantization); `PackedExperts` keeps
each expert packed in its own format and dequantizes it when a token is routed to it. Indices
outside [0, E) (e.g. -1 from dynamic pruning) are skipped, so a pruned slot costs no compute.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import join_formats, split_format
from ..quantize.formats import QuantSpec, packed_shapes
from ..quantize.qweight import pack, unpack


class ExpertObserver(Protocol):
    def __call__(self, e: int, x: torch.Tensor, h: torch.Tensor, tok: torch.Tensor, weights: torch.Tensor) -> None:
        """x [n, H] routed inputs, h [n, I] down-proj inputs, tok [n] token ids, weights [n] routing weights."""


class Experts(nn.Module):
    def __init__(self, num_experts: int, apply_gate: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.num_experts = num_experts
        self.apply_gate = apply_gate
        self.observer: ExpertObserver | None = None
        self.register_buffer("gate_up_bias", None)  # [E, 2I] (GPT-OSS)
        self.register_buffer("down_bias", None)  # [E, H]

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:  # [2I, H], [H, I]
        raise NotImplementedError

    def out_features(self) -> int:  # rows of down: H, or the output width of a non-square MLP
        raise NotImplementedError

    def set_biases(self, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None) -> None:
        for name, b in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
            if b is not None:  # a Parameter (a trainable up-cycled MLPMoE) stays one; a tensor becomes a buffer
                setattr(self, name, b if isinstance(b, nn.Parameter) else b.detach().clone())

    def _bias(self, b: torch.Tensor | None, e: int, like: torch.Tensor) -> torch.Tensor | None:
        return None if b is None else _like(b[e], like)

    def _hidden(self, e: int, x: torch.Tensor, w_gu: torch.Tensor) -> torch.Tensor:
        return self.apply_gate(F.linear(x, _like(w_gu, x), self._bias(self.gate_up_bias, e, x)))

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's down-projection input [n, I] for routed inputs x [n, H], as the forward computes it (what an
        observer gets as `h`)."""
        return self._hidden(e, x, self.expert_weights(e)[0])

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = hidden.new_zeros(hidden.shape[0], self.out_features())
        valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
        for e in torch.unique(top_k_index[valid]).tolist():
            tok, pos = torch.where(top_k_index == e)
            x = hidden[tok]  # [n, H]
            w_gu, w_d = self.expert_weights(e)
            h = self._hidden(e, x, w_gu)  # [n, I]
            weights = top_k_weights[tok, pos]
            if self.observer is not None:
                self.observer(e, x, h, tok, weights)
            y = F.linear(h, _like(w_d, x), self._bias(self.down_bias, e, x))  # [n, H]
            out.index_add_(0, tok, (y * weights[:, None].to(y.dtype)).to(out.dtype))
        return out


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t on x's device in x's dtype (itself when it already is): weights meet the activations where they are."""
    return t.to(device=x.device, dtype=x.dtype)


class DenseExperts(Experts):
    """Canonical dense weights, gate_up [E, 2I, H] and down [E, H, I]. Tensors are not registered (calibration
    copies, never saved); nn.Parameters are (the weights of an up-cycled MLPMoE, saved as `gate_up`, `down`)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, apply_gate, biases=(None, None)):
        super().__init__(gate_up.shape[0], apply_gate)
        self.gate_up, self.down = gate_up, down
        self.set_biases(*biases)

    @classmethod
    def from_view(cls, view) -> "DenseExperts":
        """fp32 copy of a block's experts from its canonical view (compressor.arch.view.MoEBlock)."""
        biases = tuple(None if t is None else t.detach().float() for t in view.biases())
        return cls(view.gate_up().detach().float().contiguous(), view.down().detach().float().contiguous(),
                   view.apply_gate, biases)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[e], self.down[e]

    def out_features(self) -> int:
        return self.down.shape[-2]


class PackedMatrix(nn.Module):
    """One [out, in] matrix in one format; its buffers are exactly the tensors the checkpoint holds."""

    def __init__(self, spec: QuantSpec, out_features: int, in_features: int, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.spec, self.out_features, self.in_features = spec, out_features, in_features
        self.names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)

    @classmethod
    def from_quantized(cls, qw, out_features: int, in_features: int) -> "PackedMatrix":
        return cls(qw.spec, out_features, in_features, pack(qw))

    @classmethod
    def empty(cls, spec: QuantSpec, out_features: int, in_features: int) -> "PackedMatrix":
        """Right shapes and dtypes, zero contents: a skeleton for load_state_dict."""
        return cls(spec, out_features, in_features, packed_layout(spec, out_features, in_features))

    def _apply(self, fn, recurse=True):
        """Device moves only: `.float()` or `.half()` on the model must not change packed bytes."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)

        return super()._apply(move, recurse)

    def dequantized(self) -> torch.Tensor:  # [out, in] float32 (not `weight`: the "keep" format stores a buffer of that name)
        tensors = {n: getattr(self, n) for n in self.names}
        return unpack(tensors, self.spec, self.out_features, self.in_features)


def packed_layout(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """Zero tensors with the shapes and dtypes `pack` writes for this spec and shape."""
    return {n: torch.zeros(shape, dtype=dt) for n, (shape, dt) in packed_shapes(spec, out_features, in_features).items()}


class PackedExperts(Experts):
    """Each expert's gate_up and down as PackedMatrix children: `<name>.<e>.gate_up.qweight` etc."""

    def __init__(self, pairs: list[tuple[PackedMatrix, PackedMatrix]], apply_gate, biases=(None, None)):
        super().__init__(len(pairs), apply_gate)
        for e, (gu, d) in enumerate(pairs):
            pair = nn.Module()
            pair.gate_up, pair.down = gu, d
            self.add_module(str(e), pair)
        self.set_biases(*biases)

    @classmethod
    def rtn(cls, view, spec: QuantSpec) -> "PackedExperts":
        """Every expert of a block (a compressor.arch.view.MoEBlock) packed round-to-nearest in one format:
        baselines and tests of the packed forward."""
        from ..quantize.rtn import quantize_rtn

        dense = DenseExperts.from_view(view)
        (E, I2, H), (O, I) = dense.gate_up.shape, dense.down.shape[-2:]
        gu, d = quantize_rtn(dense.gate_up, spec), quantize_rtn(dense.down, spec)
        pairs = [(PackedMatrix.from_quantized(gu.select(e), I2, H), PackedMatrix.from_quantized(d.select(e), O, I))
                 for e in range(E)]
        return cls(pairs, dense.apply_gate, (dense.gate_up_bias, dense.down_bias))

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = getattr(self, str(e))
        return pair.gate_up.dequantized(), pair.down.dequantized()

    def out_features(self) -> int:
        return getattr(self, "0").down.out_features

    def formats(self) -> list[str]:
        """Each expert's plan entry: its format, or "gate_up+down" when its two matrices differ (plan.split_format)."""
        pairs = (getattr(self, str(e)) for e in range(self.num_experts))
        return [join_formats(p.gate_up.spec.format, p.down.spec.format) for p in pairs]


class PackedLinear(nn.Module):
    """Replaces an nn.Linear of a dense FFN (shared experts, dense layers)."""

    def __init__(self, matrix: PackedMatrix, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.packed = matrix
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else _like(self.bias, x)
        return F.linear(x, _like(self.packed.dequantized(), x), b)


def empty_packed_experts(view, formats: list[str], group_size: int, sym: bool, dtype: torch.dtype) -> PackedExperts:
    """Packed experts of a block (a compressor.arch.view.MoEBlock) in the given formats, their tensors uninitialised:
    the module a saved state dict is loaded into (a compressed checkpoint, a resumed pass 2)."""
    _, I2, H = view.gate_up().shape
    O, I = view.down().shape[-2:]
    pairs = [(PackedMatrix.empty(QuantSpec(gu, group_size, sym), I2, H), PackedMatrix.empty(QuantSpec(d, group_size, sym), O, I))
             for gu, d in map(split_format, formats)]
    biases = tuple(None if t is None else torch.zeros(t.shape, dtype=dtype) for t in view.biases())
    return PackedExperts(pairs, view.apply_gate, biases)


def empty_packed_linear(lin: nn.Linear, fmt: str, group_size: int, sym: bool, dtype: torch.dtype) -> PackedLinear:
    """A packed replacement of `lin` in format `fmt`, tensors uninitialised (see empty_packed_experts)."""
    bias = None if lin.bias is None else torch.zeros(lin.out_features, dtype=dtype)
    return PackedLinear(PackedMatrix.empty(QuantSpec(fmt, group_size, sym), lin.out_features, lin.in_features), bias)
