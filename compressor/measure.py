"""Pass 1: measure every expert on full-precision inputs, before anything is quantized, so the
allocator sees the whole model. Per MoE block: routing statistics, Hessians, and the output error
table eps[e, f] of each candidate format, quantized by RTN (cheap, the default), or with each expert's routed-token
Hessian by GPTQ or imatrix (`quantizer="gptq"|"imatrix"`: one more forward of the layer to collect the Hessians
first, then a run per format batched over the experts; quantize/dispatch.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .analysis.importance import output_error_sq
from .arch.view import MoEBlock
from .device import HOST
from .calibration.calls import IN_PROCESS
from .calibration.layerwise import LayerInputs
from .calibration.stats import ExpertStats, RoutedObserver, check_finite, check_finite_weights
from .quantize.formats import QuantSpec, packable
from .quantize.ggml import GGML_TYPES
from .quantize.dispatch import METHODS, quantize_with
from .quantize.gptq import hessian_error
from .runtime.experts import DenseExperts


@dataclass
class BlockMeasurement:
    name: str
    layer_idx: int
    formats: list[str]
    count: torch.Tensor  # [E] routed tokens
    weight_sum: torch.Tensor  # [E] summed routing weight
    total_tokens: int
    eps_sq: torch.Tensor  # [E, F] squared block-output error with only expert e in format f
    hess_err: torch.Tensor  # [E, F] tr(dW H dW^T), gate_up + down
    out_energy: float  # sum over tokens of ||block output||^2 (normalises eps across layers)
    eps_proj: torch.Tensor | None = None  # [E, F, 2] the same with only e's gate_up (0) or only its down (1) in f
    # (measured for targets that choose per projection, targets.py); inf where a format cannot hold the matrix

    def to(self, device: torch.device) -> "BlockMeasurement":
        move = lambda t: None if t is None else t.to(device)
        return replace(self, count=move(self.count), weight_sum=move(self.weight_sum), eps_sq=move(self.eps_sq),
                       hess_err=move(self.hess_err), eps_proj=move(self.eps_proj))


def candidates(W: torch.Tensor, fmt: str, group_size: int, sym: bool, H: torch.Tensor | None = None,
               scale_dtype: str = "float16", method: str = "gptq", **gptq: float | int | bool) -> torch.Tensor:
    """Dequantized version of W [E, out, in] in format `fmt`: RTN (or absmean ternary), or with the per-expert
    Hessians H [E, in, in] when given, `method` gptq or imatrix (`gptq`: damp, block_size, act_order)."""
    return quantize_with(W, QuantSpec(fmt, group_size, sym, scale_dtype), H, method, **gptq)[0].dequantize()


class ErrorObserver(RoutedObserver):
    """eps[e, f] for every candidate, plus routing statistics and Hessians (as RoutedObserver) unless `stats`
    already holds them (`accumulate=False`: a forward before this one collected them). With `eps_proj` [E, F, 2],
    also the errors of each projection in f alone (the other one left at full precision). The candidates
    [F, n, out, in] are those of the experts in `slot` (expert -> column; default: all, in order)."""

    def __init__(self, stats: ExpertStats, where: str, dense: DenseExperts, cand_gu, cand_d, eps_sq,
                 accumulate: bool = True, eps_proj: torch.Tensor | None = None, slot: dict[int, int] | None = None):
        super().__init__(stats, where)
        self.dense, self.cand_gu, self.cand_d, self.eps_sq = dense, cand_gu, cand_d, eps_sq
        self.accumulate, self.eps_proj = accumulate, eps_proj
        self.slot = slot if slot is not None else {e: e for e in range(dense.num_experts)}

    def __call__(self, e, x, h, tok, weights) -> None:
        if self.accumulate:
            super().__call__(e, x, h, tok, weights)
        else:
            check_finite(x, f"{self.where} expert {e}")
        d = self.dense
        b_gu = None if d.gate_up_bias is None else d.gate_up_bias[e]
        b_d = None if d.down_bias is None else d.down_bias[e]
        x, weights = x.float(), weights.float()
        error = lambda gu, down: output_error_sq(x, weights, d.gate_up[e], d.down[e], gu, down, d.apply_gate, b_gu, b_d)
        c = self.slot[e]
        self.eps_sq[e] += error(self.cand_gu[:, c], self.cand_d[:, c])
        if self.eps_proj is not None:
            self.eps_proj[e, :, 0] += error(self.cand_gu[:, c], d.down[e][None])
            self.eps_proj[e, :, 1] += error(d.gate_up[e][None], self.cand_d[:, c])


class MeasurePass:
    """`on_layer` callback of `layerwise`; leaves the model unchanged."""

    def __init__(self, blocks: list[MoEBlock], formats: list[str], group_size: int, sym: bool,
                 quantizer: str = "rtn", gptq: dict | None = None, journal=None, per_projection: bool = False,
                 scale_dtype: str = "float16", hessian_device: torch.device | None = None, driver=IN_PROCESS):
        """`journal` (io/measure_cache.MeasureJournal, or None): a layer it holds in these formats is taken from it
        and not measured again (an interrupted pass 1 resumes); each layer measured is written to it.
        `per_projection`: measure eps_proj too (targets choosing a format per projection). The work runs on the
        layer's device, the Hessians on `hessian_device` (default: that device); the results come back to the host.
        `driver` (calibration/calls.py) maps the per-expert work over workers (default: all of it, here)."""
        if quantizer not in METHODS:
            raise ValueError(f"eps quantizer must be one of {', '.join(METHODS)}, got {quantizer!r}")
        self.blocks, self.formats, self.group_size, self.sym = blocks, formats, group_size, sym
        self.quantizer, self.gptq = quantizer, gptq or {}
        self.journal, self.per_projection, self.scale_dtype = journal, per_projection, scale_dtype
        self.hessian_device, self.driver = hessian_device, driver
        self.results: list[BlockMeasurement] = []

    def _from_journal(self, i: int, names: list[str]) -> list[BlockMeasurement] | None:
        got = self.journal.load(i) if self.journal is not None else None
        if got is None or [m.name for m in got] != names or any(m.formats != self.formats for m in got):
            return None
        return got

    def _fits(self, W: torch.Tensor) -> torch.Tensor:
        """[F] bool: the formats that can hold W's rows (ggml types need whole blocks)."""
        return torch.tensor([packable(QuantSpec(f, self.group_size, self.sym), W.shape[-1]) for f in self.formats],
                            device=W.device)

    def _candidates(self, W: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:  # [F, E, out, in]
        """Each format's version of W; W itself (an error of 0, set to inf afterwards) where a format cannot hold it."""
        return torch.stack([candidates(W, f, self.group_size, self.sym, H, self.scale_dtype, self.quantizer,
                                       **self.gptq) if ok else W
                            for f, ok in zip(self.formats, self._fits(W).tolist())])

    def __call__(self, i: int, layer: nn.Module, inputs: LayerInputs) -> LayerInputs | None:
        """Measures the layer's MoE block; returns the layer's outputs (the model is unchanged, so they
        are what the next layer sees and need not be computed again)."""
        mine = [b for b in self.blocks if b.layer_idx == i]
        if mine and (kept := self._from_journal(i, [b.name for b in mine])) is not None:
            self.results.extend(kept)
            return None  # layerwise runs the (unchanged) layer for the next one's inputs
        outputs, start = None, len(self.results)
        for b in mine:
            original, dense = b.block.experts, DenseExperts.from_view(b)
            check_finite_weights(b.name, dense.gate_up, dense.down)
            b.block.experts = dense
            try:
                measurement, outputs = self._measure(i, b, layer, inputs, dense)
            finally:
                b.block.experts = original
            self.results.append(measurement)
        if mine and self.journal is not None:
            self.journal.save(i, self.results[start:])
        return outputs

    def _measure(self, i: int, b: MoEBlock, layer: nn.Module, inputs: LayerInputs, dense: DenseExperts
                 ) -> tuple[BlockMeasurement, LayerInputs | None]:
        """Block b's measurement (on the host) and the layer's outputs. With the GPTQ eps quantizer, the routed-token
        Hessians of every expert come first (its candidates need them), from a feed of their own."""
        calls = self.driver.calls(layer, inputs, {b.name: dense})
        own, where, device = calls.owned(b.name), f"layer {i}", dense.gate_up.device
        E, _, H = dense.gate_up.shape
        I, F = dense.down.shape[-1], len(self.formats)
        new_stats = lambda: ExpertStats.zeros(E, H, I, device, self.hessian_device)
        pre = None
        if self.quantizer != "rtn":
            pre = new_stats()
            calls.feed({b.name: RoutedObserver(pre, where)})
        H_gu, H_d = pre.hessians() if pre is not None else (None, None)
        sel = lambda t: None if t is None else own.select(t)
        cand_gu, cand_d = self._candidates(sel(dense.gate_up), sel(H_gu)), self._candidates(sel(dense.down), sel(H_d))
        stats = pre if pre is not None else new_stats()
        eps_sq = torch.zeros(E, F, device=device)
        eps_proj = torch.zeros(E, F, 2, device=device) if self.per_projection else None
        energy = [0.0]

        def on_batch(tokens: int, sum_sq: float) -> None:
            stats.total_tokens += tokens
            energy[0] += sum_sq

        observer = ErrorObserver(stats, where, dense, cand_gu, cand_d, eps_sq, accumulate=pre is None,
                                 eps_proj=eps_proj, slot=own.slot)
        outputs = calls.feed({b.name: observer}, batches={b.name: on_batch})
        H_in, H_mid = (sel(h).to(device) for h in stats.hessians())
        hess = own.place((hessian_error(sel(dense.gate_up)[None], cand_gu, H_in[None]) +
                          hessian_error(sel(dense.down)[None], cand_d, H_mid[None])).T)  # [E, F]
        count, weight_sum, eps_sq, hess, eps_proj = calls.complete_rows(
            b.name, [stats.count, stats.weight_sum, eps_sq, hess, eps_proj])
        fits_gu, fits_d = self._fits(dense.gate_up), self._fits(dense.down)
        for t in (eps_sq, hess):
            t[:, ~(fits_gu & fits_d)] = float("inf")
        if eps_proj is not None:
            eps_proj[:, ~fits_gu, 0], eps_proj[:, ~fits_d, 1] = float("inf"), float("inf")
        measurement = BlockMeasurement(b.name, i, list(self.formats), count, weight_sum, stats.total_tokens, eps_sq,
                                       hess, energy[0], eps_proj)
        return measurement.to(HOST), outputs


FORMAT_BITS = {"keep": 16.0, "int8": 8.0, "int6": 6.0, "int5": 5.0, "int4": 4.0, "int3": 3.0, "int2": 2.0, "ternary": 1.58, "drop": 0.0,
               **{name: t.bits_per_weight for name, t in GGML_TYPES.items()}}


def synthetic_measurements(blocks: list[MoEBlock], formats: list[str], seed: int = 0) -> list[BlockMeasurement]:
    """Plausible statistics for planning checks of models too large to load here (meta device):
    uneven routing (Dirichlet) and output error falling 4x per bit. Never used for a quality claim."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in blocks:
        E, tokens = b.num_experts, 100_000
        share = torch.distributions.Dirichlet(torch.full((E,), 0.7)).sample()
        count = (share * tokens * b.top_k).round().long()
        noise = torch.rand(E, len(formats), generator=g) * 0.5 + 0.75
        bits = torch.tensor([FORMAT_BITS[f] for f in formats])
        eps_sq = share[:, None] * noise * torch.pow(4.0, -bits)[None]
        split = torch.tensor([2 / 3, 1 / 3])  # gate_up holds two thirds of an expert's weights
        out.append(BlockMeasurement(b.name, b.layer_idx, list(formats), count, share * tokens, tokens, eps_sq,
                                    eps_sq.clone(), out_energy=1.0, eps_proj=eps_sq[..., None] * split))
    return out
