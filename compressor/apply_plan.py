"""Pass 2: apply a plan layer by layer, GPTQ-style. For each decoder layer (in fp32): collect each
expert's statistics on the layer's inputs (which come from the already-quantized layers before
it), quantize every expert and dense FFN linear to its planned format, and swap the packed modules
into the model, so the next layer sees the quantized outputs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .arch.view import MoEBlock, layers_prefix
from .calibration.calls import IN_PROCESS
from .calibration.layerwise import LayerInputs
from .io.report import peak_rss_mb
from .calibration.stats import (ExpertStats, LinearHessian, NonFiniteError, RoutedObserver, WeightedObserver,
                                check_finite_weights)
from .config.schema import Recipe
from .device import HOST, device_of, hessian_device
from .plan import Plan, split_format
from .quantize.formats import QuantSpec
from .quantize.dispatch import NO_HESSIAN_FORMATS, quantize_with
from .quantize.qweight import QuantizedWeight
from .io.journal import Journal
from .runtime.experts import (DenseExperts, PackedExperts, PackedLinear, PackedMatrix, empty_packed_experts,
                              empty_packed_linear)


def quantize_matrices(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, recipe: Recipe, where: str):
    """W [n, out, in] (H [n, in, in] or None) -> (QuantizedWeight [n, out, in], damp_used [n] or None), by the
    recipe's method (quantize/dispatch.py; RTN where H is None)."""
    q = recipe.quantization
    return _named(where, quantize_with, W, spec, H, q.data_method or "rtn", **q.gptq_options)


def _named(where: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NonFiniteError as err:  # a dense linear's weights (experts are checked whole before)
        raise NonFiniteError(f"{where}: {err}; the checkpoint is damaged: download or save the model again") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@dataclass
class LayerReport:
    layer: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    experts: dict[str, Any] = field(default_factory=dict)  # block name -> counts, formats
    fallbacks: list[str] = field(default_factory=list)
    resumed: bool = False  # loaded from the journal of an interrupted run (io/journal.py), not quantized again


class QuantizePass:
    """The `on_layer` callback of `layerwise` that quantizes a layer per the plan."""

    def __init__(self, model: nn.Module, blocks: list[MoEBlock], dense: dict[str, nn.Linear], plan: Plan, recipe: Recipe,
                 journal: Journal | None = None, driver=IN_PROCESS):
        """`journal`: each quantized layer is written to it, and layers it already holds are loaded, not quantized.
        The work runs on each layer's device; the Hessians on the host when the recipe asks (execution.hessians).
        `driver` (calibration/calls.py) maps the per-expert work over workers (default: all of it, here)."""
        self.model, self.blocks, self.dense, self.plan, self.recipe = model, blocks, dense, plan, recipe
        self.journal, self.driver = journal, driver
        self.hessian_device = hessian_device(recipe.execution.hessians)
        self.reports: list[LayerReport] = []

    def _spec(self, fmt: str) -> QuantSpec:
        return QuantSpec(fmt, group_size=self.plan.group_size, sym=self.plan.sym, scale_dtype=self.plan.scale_dtype)

    def needs_data(self) -> bool:
        """GPTQ and imatrix use calibration statistics (Hessians); RTN, ternary, keep and drop need no forward pass."""
        return self.recipe.quantization.data_method is not None

    def _layer(self, i: int) -> tuple[list[MoEBlock], dict[str, nn.Linear]]:
        prefix = f"{layers_prefix(self.model)}.{i}."
        return [b for b in self.blocks if b.layer_idx == i], {n: m for n, m in self.dense.items() if n.startswith(prefix)}

    def __call__(self, i: int, layer: nn.Module, inputs: LayerInputs | None) -> None:
        if self.journal is not None and self._resume(i):
            return
        t0, rep = time.time(), LayerReport(i)
        blocks, linears = self._layer(i)
        denses = {b.name: self._dense(b) for b in blocks}
        data = self.needs_data()
        calls = self.driver.calls(layer, inputs if data else None, denses, linears if data else {})
        observed = {b.name: self._observe(b, denses[b.name]) for b in blocks}
        hessians = {n: LinearHessian(m, n, self.hessian_device) for n, m in linears.items()
                    if calls.owns(n)} if data else {}
        if inputs is not None:
            calls.feed({name: obs for name, (_, obs, _) in observed.items()},
                       batches={name: partial(_count_tokens, stats) for name, (stats, _, _) in observed.items()},
                       linears=hessians)
        for b in blocks:
            stats, _, handles = observed[b.name]
            for h in handles:
                h.remove()
            self._quantize_block(b, denses[b.name], stats, rep, calls)
        made = {name: self._quantize_linear(name, lin, hessians[name].hessian()[None] if name in hessians else None, rep)
                for name, lin in linears.items() if calls.owns(name)}
        gs, sym = self.plan.group_size, self.plan.sym
        packed = calls.share_linears(made, lambda n: empty_packed_linear(linears[n], self.plan.dense[n], gs, sym,
                                                                         torch.float32))
        for name, lin in linears.items():
            parent, attr = name.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), attr, packed[name].to(device_of(lin)))
        rep.fallbacks = calls.gather_notes(rep.fallbacks)
        rep.seconds, rep.peak_rss_mb = time.time() - t0, peak_rss_mb()
        self.reports.append(rep)
        if self.journal is not None:
            self.journal.save(i, self._packed_tensors(blocks, linears), asdict(rep))

    def _packed_tensors(self, blocks: list[MoEBlock], linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """The layer's packed experts and linears, as their state dicts under their module names."""
        out = {f"{b.name}.{k}": v for b in blocks for k, v in b.block.experts.state_dict().items()}
        out |= {f"{n}.{k}": v for n in linears for k, v in self.model.get_submodule(n).state_dict().items()}
        return {k: v.to(HOST) for k, v in out.items()}

    def _resume(self, i: int) -> bool:
        """Layer i's packed modules from the journal, if it holds them: swapped in (on the device of the modules they
        replace) as pass 2 would have left them."""
        hit = self.journal.load(i)
        if hit is None:
            return False
        tensors, report = hit
        blocks, linears = self._layer(i)
        gs, sym = self.plan.group_size, self.plan.sym

        def own(name: str) -> dict[str, torch.Tensor]:
            return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}

        for b in blocks:
            packed = empty_packed_experts(b, self.plan.experts[b.name], gs, sym, torch.float32)
            packed.load_state_dict(own(b.name), assign=True)
            b.block.experts = b.experts = packed.to(device_of(b.block))
        for name, lin in linears.items():
            packed = empty_packed_linear(lin, self.plan.dense[name], gs, sym, torch.float32)
            packed.load_state_dict(own(name), assign=True)
            parent, attr = name.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), attr, packed.to(device_of(lin)))
        self.reports.append(LayerReport(**{**report, "resumed": True}))
        return True

    def _dense(self, b: MoEBlock) -> DenseExperts:
        """The block's experts in fp32, swapped into the model until their packed replacement is."""
        dense = DenseExperts.from_view(b)
        b.block.experts = b.experts = dense
        return dense

    def _observe(self, b: MoEBlock, dense: DenseExperts):
        """(stats, the observer filling them, hooks to remove): weighted mode hooks the router and the experts."""
        E, _, H = dense.gate_up.shape
        stats = ExpertStats.zeros(E, H, dense.down.shape[-1], dense.gate_up.device, self.hessian_device)
        handles = []
        if self.recipe.calibration.mode == "weighted":
            obs = WeightedObserver(stats, f"layer {b.layer_idx}", dense, b.router_probs)
            handles += [b.router.register_forward_hook(obs.router_hook), dense.register_forward_hook(obs.experts_hook)]
        else:
            obs = RoutedObserver(stats, f"layer {b.layer_idx}")
        return stats, obs, handles

    def _quantize_block(self, b: MoEBlock, dense: DenseExperts, stats: ExpertStats, rep: LayerReport, calls) -> None:
        """The experts this worker owns quantized per the plan; the others' packed tensors come from their owners."""
        check_finite_weights(b.name, dense.gate_up, dense.down)
        own, formats = calls.owned(b.name), self.plan.experts[b.name]
        with_h = self._hessian_experts(b.name, formats, stats, rep, own.experts)
        H_in, H_mid = stats.hessians()
        f_gu, f_d = zip(*map(split_format, formats))
        gate_up = self._quantize_part(f"{b.name}.gate_up", dense.gate_up, H_in, f_gu, with_h, rep, own.experts)
        down = self._quantize_part(f"{b.name}.down", dense.down, H_mid, f_d, with_h, rep, own.experts)
        _, I2, H = dense.gate_up.shape
        O, I = dense.down.shape[-2:]  # O = H, except for an MLPMoE whose output width differs from its input
        made = {e: (PackedMatrix.from_quantized(gate_up[e], I2, H), PackedMatrix.from_quantized(down[e], O, I))
                for e in own.experts}
        gs, sym, device = self.plan.group_size, self.plan.sym, dense.gate_up.device

        def empty(e: int) -> tuple[PackedMatrix, PackedMatrix]:
            return (PackedMatrix.empty(self._spec(f_gu[e]), I2, H).to(device),
                    PackedMatrix.empty(self._spec(f_d[e]), O, I).to(device))

        pairs = calls.share_experts(b.name, made, empty)
        b.block.experts = b.experts = PackedExperts(pairs, dense.apply_gate, (dense.gate_up_bias, dense.down_bias))
        (count,) = calls.complete_rows(b.name, [stats.count])
        rep.experts[b.name] = {"tokens": count.tolist(), "formats": formats}

    def _hessian_experts(self, name: str, formats: list[str], stats: ExpertStats, rep: LayerReport,
                         experts: tuple[int, ...]) -> list[bool]:
        """Which experts are quantized with their Hessian (GPTQ, imatrix); the others (too few tokens) fall back to RTN,
        logged (for `experts`, those this worker quantizes)."""
        if not self.needs_data():
            return [False] * len(formats)
        min_tokens = self.recipe.calibration.min_tokens
        enough = (stats.mass >= max(min_tokens, 1e-6)).tolist()
        for e in experts:
            fmt, ok = formats[e], enough[e]
            if not ok and any(f not in NO_HESSIAN_FORMATS for f in split_format(fmt)):
                rep.fallbacks.append(f"{name}.{e}: {int(stats.count[e])} routed tokens < min_tokens {min_tokens}: RTN")
        return enough

    def _quantize_part(self, where: str, W: torch.Tensor, H: torch.Tensor, formats: list[str], with_h: list[bool],
                       rep: LayerReport, experts: tuple[int, ...]) -> dict[int, QuantizedWeight]:
        """W [E, out, in] -> a QuantizedWeight for each of `experts`, batched over those sharing format and method
        (each expert's result is its own: batching changes none of its bits)."""
        groups: dict[tuple[str, bool], list[int]] = {}
        for e in experts:
            groups.setdefault((formats[e], with_h[e]), []).append(e)
        out: dict[int, QuantizedWeight] = {}
        for (fmt, use_h), sel in groups.items():
            qw, damp = quantize_matrices(W[sel], H[sel] if use_h else None, self._spec(fmt), self.recipe,
                                         f"{where} experts {sel}")
            for k, e in enumerate(sel):
                out[e] = qw.select(k)
                _log_damping(rep, f"{where} expert {e}", damp, k, self.recipe.quantization.damp)
        return out

    def _quantize_linear(self, name: str, lin: nn.Linear, H: torch.Tensor | None, rep: LayerReport) -> PackedLinear:
        spec = self._spec(self.plan.dense[name])
        qw, damp = quantize_matrices(lin.weight.detach().float()[None], H, spec, self.recipe, name)
        _log_damping(rep, name, damp, 0, self.recipe.quantization.damp)
        matrix = PackedMatrix.from_quantized(qw.select(0), lin.out_features, lin.in_features)
        return PackedLinear(matrix, lin.bias)


def _count_tokens(stats: ExpertStats, tokens: int, _sum_sq: float) -> None:
    stats.total_tokens += tokens


def _log_damping(rep: LayerReport, where: str, damp: torch.Tensor | None, k: int, requested: float) -> None:
    if damp is None:
        return
    d = float(damp[k])
    if d == float("inf"):
        rep.fallbacks.append(f"{where}: Cholesky failed at every damping: RTN")
    elif d > requested * (1 + 1e-6):
        rep.fallbacks.append(f"{where}: damping raised to {d:.3g}")
