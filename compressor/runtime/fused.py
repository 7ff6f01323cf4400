"""Decode-sized calls of a packed experts module in one compiled call (kernels/packed.cpp, mc_experts): grouping,
both products of every routed expert, the activation and the weighted sum, without a Python round trip per expert.
For a token or a few, the per-expert Python path costs more than its products on a small model.

Used when every expert is on the compiled path, the module has no biases, and its activation is one the compiled
code knows: each module's `apply_gate` is probed once against silu(gate) * up on [gate; up] rows (Mixtral, Qwen-MoE,
DeepSeek, OLMoE), so a family whose activation differs (GPT-OSS's clamped, interleaved one) keeps the generic path.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .kernels import NativeKernel, native

FUSED_SLOTS = 16  # tokens x top-k up to which one compiled call serves the whole module
SILU_GLU = 0


def activation_code(apply_gate, width: int) -> int | None:
    """The compiled activation equal to `apply_gate` on [n, 2 * width] inputs, or None."""
    x = torch.randn(4, 2 * width, generator=torch.Generator().manual_seed(0))
    want = F.silu(x[:, :width]) * x[:, width:]
    try:
        got = apply_gate(x)
    except Exception:  # noqa: BLE001 - an activation that cannot take the probe is simply not fused
        return None
    return SILU_GLU if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6) else None


class FusedExperts:
    def __init__(self, lib, matrices: list[tuple], act: int):
        self.lib, self.act = lib, act
        self.kernels = [(gu.kernel(), d.kernel()) for gu, d in matrices]
        self.matrices = matrices
        E = len(matrices)
        self.gate_up = (native.Mat * E)(*[k[0].mat for k in self.kernels])
        self.down = (native.Mat * E)(*[k[1].mat for k in self.kernels])
        self.out_features = matrices[0][1].out_features
        self.tensors = self._tensors()

    def _tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.matrices for m in pair for t in m._buffers.values()]

    @classmethod
    def build(cls, experts) -> "FusedExperts | None":
        lib = native.library()
        if lib is None or experts.gate_up_bias is not None or experts.down_bias is not None:
            return None
        pairs = [(getattr(experts, str(e)).gate_up, getattr(experts, str(e)).down) for e in range(experts.num_experts)]
        if not all(isinstance(m.kernel(), NativeKernel) for pair in pairs for m in pair):
            return None
        act = activation_code(experts.apply_gate, pairs[0][1].in_features)
        return None if act is None else cls(lib, pairs, act)

    def current(self) -> bool:
        """Built on the matrices' present tensors (the compiled kernels read them in place, so in-place changes are
        seen; a replaced tensor is not)."""
        return all(map(operator.is_, self._tensors(), self.tensors))

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        T, k = top_k_index.shape
        x = hidden.float().contiguous()
        idx = top_k_index.to(torch.int64).contiguous()
        w = top_k_weights.float().contiguous()
        out = torch.empty(T, self.out_features, dtype=torch.float32)
        self.lib.mc_experts(T, k, x.data_ptr(), idx.data_ptr(), w.data_ptr(), len(self.matrices), self.gate_up,
                            self.down, self.act, out.data_ptr(), torch.get_num_threads())
        return out.to(hidden.dtype)
