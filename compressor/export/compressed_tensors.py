"""`export --format compressed-tensors`: a transformers model directory that vLLM (and SGLang) load as it is, with
nothing re-quantized. A plan made with `--target vllm` is what it holds: per MoE layer one scheme for every expert and
projection, symmetric int4 or int8 with groups of 128, or the layer kept 16-bit.

  config.json     the model's config with a `quantization_config`: quant_method compressed-tensors, format
                  pack-quantized, one config group per scheme whose `targets` are one regex per layer naming that
                  layer's expert linears; `ignore` lists every 16-bit linear (and the experts of 16-bit layers);
                  quantization_status compressed
  routed experts  under the family's original checkpoint names (checkpoint_names.py), per expert and projection:
                  `<linear>.weight_packed` int32 [out, in * bits / 32], `<linear>.weight_scale` [out, in / 128] in the
                  model's dtype, `<linear>.weight_shape` int64 [out, in]; a 16-bit layer's as `<linear>.weight`
  dense linears   a shared expert in int4 / int8: the same three tensors; every other tensor as the checkpoint holds it
  tokenizer       the compressed model's tokenizer files

Packing: compressed-tensors' pack_to_int32 (compressors/pack_quantized/helpers.py) puts element i of a row at bit
i * bits of the row's stream, LSB first, as signed + 2^(bits-1); this project's int rows (quantize/packing.py) are
that stream in bytes, with codes q = signed + 2^(bits-1) (the symmetric zero point), so their bytes read as
little-endian int32 words *are* `weight_packed` (tested against the library's own decompression).

What vLLM's loader requires (vllm-project/vllm, read in its source; vLLM does not run on this machine):
  compressed_tensors_moe.py, CompressedTensorsMoEMethod.get_moe_method: a fused-MoE layer's scheme is the one found
    for `<experts prefix>.0.gate_proj`, `.0.up_proj` and `.0.down_proj` (these names in every family, even Mixtral's,
    whose checkpoint says w1 / w3 / w2), the three equal; a layer whose names are ignored runs unquantized; WNA16
    needs format pack-quantized, 4 or 8 bits, symmetric, group strategy, no activation quantization
  compressed_tensors.py, get_scheme_dict: a linear that is neither ignored nor matched by a target is an error
    (target_scheme_map[None]), hence `ignore`; utils.py: `re:` targets are tried with re.match, fused linears
    (qkv_proj, gate_up_proj) by their checkpoint shards
  compressed_tensors_moe_wna16_marlin.py, create_weights: hidden and expert widths multiples of the group size;
    scales created in the model's dtype (params_dtype): a bfloat16 model's scales must be bfloat16 values, which
    --target vllm's grid makes them (quantization.scale_dtype); otherwise the export measures what the rounding does
  models/<family>.py: FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name=...) maps `experts.<e>.<proj>.` to the
    fused `experts.w13_` / `experts.w2_` parameters, so `weight_packed`, `weight_scale`, `weight_shape` load as
    w13_weight_packed ...
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.families import MLP_MOE
from ..io.checkpoint import write_tensors
from ..io.models import copy_sidecars
from ..quantize.formats import QuantSpec, group_size_for
from ..quantize.grid import expand_groups
from ..runtime.experts import PackedLinear, PackedMatrix
from .checkpoint_names import CheckpointNames
from .source import CompressedModel, ExportError

WHAT = "export --format compressed-tensors"
FIX = "compress with --target vllm (symmetric int4 / int8, group 128, one scheme per layer)"
VLLM_BITS = {"int4": 4, "int8": 8}      # WNA16_SUPPORTED_BITS of vLLM's fused-MoE kernels
VLLM_LOOKUP = ("gate_proj", "up_proj", "down_proj")  # the names get_moe_method looks a fused layer's scheme up by
MAX_SHARD_BYTES = 4 * 2**30


def int32_words(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 rows of an LSB-first code stream -> the same stream as int32 words (zero-padded to whole words)."""
    return F.pad(qweight, (0, -qweight.shape[-1] % 4)).contiguous().view(torch.int32)


def check_spec(spec: QuantSpec, what: str, widths: tuple[int, ...]) -> None:
    """An int spec vLLM's WNA16 kernels run, on matrices of these input widths; an ExportError naming the fix."""
    if spec.format not in VLLM_BITS:
        raise ExportError(f"{WHAT}: {what} is in {spec.format}, which vLLM's WNA16 kernels do not run (they take "
                          f"symmetric int4 and int8); {FIX}")
    if not spec.sym:
        raise ExportError(f"{WHAT}: {what} is asymmetric (zero points); vLLM's fused-MoE WNA16 kernels take symmetric "
                          f"weights only; {FIX}")
    if any(w % spec.group_size for w in widths):
        raise ExportError(f"{WHAT}: {what} has input widths {widths}, not multiples of its group size "
                          f"{spec.group_size}; vLLM's kernels take whole groups; {FIX}")


def layer_spec(b) -> QuantSpec | None:
    """The one spec of every expert and projection of a layer; None for a 16-bit layer."""
    pairs = [getattr(b.block.experts, str(e)) for e in range(b.num_experts)]
    specs = {m.spec for p in pairs for m in (p.gate_up, p.down)}
    if len(specs) != 1:
        raise ExportError(f"{WHAT}: {b.name}'s experts and projections are in {len(specs)} formats "
                          f"({', '.join(sorted({s.format for s in specs}))}); vLLM runs one scheme per MoE layer (expert "
                          f"0's gate, up and down projections must agree and stand for all); {FIX}")
    spec = specs.pop()
    if spec.format == "keep":
        return None
    check_spec(spec, f"{b.name} (its experts)", (pairs[0].gate_up.in_features, pairs[0].down.in_features))
    return spec


@dataclass
class ScaleRounding:
    """What casting fp16 scales to the model's dtype (vLLM's load) does to the weights, over the matrices it changes."""
    change_sq: float = 0.0   # sum of ||W' - W||^2
    weight_sq: float = 0.0   # sum of ||W||^2
    worst: float = 0.0       # largest relative change of one scale

    def add(self, W: torch.Tensor, s: torch.Tensor, s_new: torch.Tensor, spec: QuantSpec) -> None:
        """W [out, in] dequantized on scales s [out, G]; W' = W * s_new / s, group by group."""
        n = W.shape[-1]
        self.change_sq += float((W * (expand_groups(s_new / s, group_size_for(spec, n), n) - 1)).pow(2).sum())
        self.weight_sq += float(W.pow(2).sum())
        self.worst = max(self.worst, float((s_new / s - 1).abs().max()))

    def summary(self) -> dict | None:
        if not self.weight_sq:
            return None
        return {"relative_weight_change": (self.change_sq / self.weight_sq) ** 0.5, "max_scale_change": self.worst}


class CompressedTensorsExport:
    def __init__(self, src: CompressedModel, log=print):
        self.src, self.log, self.dtype = src, log, src.dtype
        if src.model_type == "gpt_oss":
            raise ExportError(f"{WHAT}: GPT-OSS's checkpoint stores each layer's experts fused and transposed "
                              "(gate_up_proj [E, H, 2I], gate and up interleaved, with biases), and vLLM's gpt_oss "
                              "loader reads them only so, in 16 bits or MXFP4 (models/gpt_oss.py); there are no "
                              "per-expert linears for a pack-quantized scheme. Run it with this project's runtime")
        if src.blocks[0].family is MLP_MOE:
            raise ExportError(f"{WHAT}: this model's MoE blocks ({src.blocks[0].name}, ...) are up-cycled MLPs "
                              "(upcycle --modules), which vLLM does not run")
        self.dense = src.dense_tensors()
        self.linears = self._linear_modules()
        names = list(dict.fromkeys([d.name for d in self.dense] + [f"{n}.weight" for n in self.linears]))
        self.names = CheckpointNames(src.model, src.blocks, names, WHAT)  # refuses families with fused experts
        self.specs = {b.name: layer_spec(b) for b in src.blocks}
        for d in self.dense:
            if d.packed is not None and d.packed.spec.format != "keep":
                check_spec(d.packed.spec, d.name.removesuffix(".weight"), (d.packed.in_features,))
        self.rounding = ScaleRounding()

    def _linear_modules(self) -> dict[str, QuantSpec | None]:
        """Every module outside the routed experts that multiplies by a 2-d weight (linears, routers, the LM head),
        with its int spec or None (16-bit)."""
        experts = tuple(b.name for b in self.src.blocks)
        out = {}
        for name, m in self.src.model.named_modules():
            if name.startswith(experts) or isinstance(m, (nn.Embedding, PackedMatrix)):
                continue
            if isinstance(m, PackedLinear):
                out[name] = None if m.packed.spec.format == "keep" else m.packed.spec
            elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:
                out[name] = None
        return out

    def _module(self, name: str) -> str:
        return self.names.rename(f"{name}.weight").removesuffix(".weight")

    def expert_regex(self, b) -> str:
        """`re:` target naming every expert linear of layer `b`: by its checkpoint names and by the names vLLM looks
        the fused layer's scheme up with (VLLM_LOOKUP)."""
        linears = self.names.experts[b.name]
        prefix = {x.module.rsplit(".", 2)[0] for x in linears}
        if len(prefix) != 1:
            raise AssertionError(f"internal error: {b.name}'s expert linears under {sorted(prefix)}")
        projections = sorted({x.projection for x in linears} | set(VLLM_LOOKUP))
        return rf"re:^{re.escape(prefix.pop())}\.\d+\.({'|'.join(projections)})$"

    # tensors

    def _packed(self, module: str, m: PackedMatrix, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if m.spec.format == "keep":
            return {f"{module}.weight": pick(m.weight).to(self.dtype)}
        scales = pick(m.scales)
        stored = scales.to(self.dtype)
        if not torch.equal(stored.float(), scales.float()):
            self.rounding.add(pick(m.dequantized()), scales.float(), stored.float(), m.spec)
        return {f"{module}.weight_packed": int32_words(pick(m.qweight)), f"{module}.weight_scale": stored,
                f"{module}.weight_shape": torch.tensor([scales.shape[0], m.in_features])}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for d in self.dense:
            name = self.names.rename(d.name)
            if d.packed is None:
                out[name] = d.tensor
            else:
                out |= self._packed(name.removesuffix(".weight"), d.packed)
        for b in self.src.blocks:
            for x in self.names.experts[b.name]:
                out |= self._packed(x.module, getattr(getattr(b.block.experts, str(x.expert)), x.part), x.rows)
        return out

    # config

    def quantization_config(self) -> dict:
        import compressed_tensors
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     QuantizationStatus)

        targets: dict[tuple[int, int], list[str]] = {}
        ignore = []
        for b in self.src.blocks:
            spec = self.specs[b.name]
            if spec is None:
                ignore.append(self.expert_regex(b))
            else:
                targets.setdefault((spec.bits, spec.group_size), []).append(self.expert_regex(b))
        for name, spec in self.linears.items():
            if spec is None:
                ignore.append(self._module(name))
            else:
                targets.setdefault((spec.bits, spec.group_size), []).append(self._module(name))
        groups = {f"group_{k}": QuantizationScheme(
            targets=names, format="pack-quantized", weights=QuantizationArgs(
                num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs, dynamic=False))
            for k, ((bits, gs), names) in enumerate(sorted(targets.items()))}
        config = QuantizationConfig(config_groups=groups, ignore=ignore, format="pack-quantized",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        return {**config.model_dump(), "version": compressed_tensors.__version__}

    def write(self, out: Path) -> dict:
        src = self.src
        tensors = self.tensors()
        qconfig = self.quantization_config()
        out.mkdir(parents=True)
        nbytes = write_tensors(tensors, out, MAX_SHARD_BYTES)
        config = {k: v for k, v in src.config.items() if k != "quantization_config"}
        config.update(quantization_config=qconfig, dtype=str(self.dtype).removeprefix("torch."))
        (out / "config.json").write_text(json.dumps(config, indent=2))
        sidecars = copy_sidecars(src.dir, out)
        schemes = [f"int{s.bits}" if s else "16-bit" for s in self.specs.values()]
        summary = {"format": "pack-quantized", "tensors": len(tensors), "tensor_bytes": nbytes,
                   "layers": {s: schemes.count(s) for s in sorted(set(schemes))},
                   "config_groups": len(qconfig["config_groups"]), "tokenizer_files": sidecars,
                   "scale_dtype": config["dtype"]}
        rounding = self.rounding.summary()
        if rounding:
            summary["scale_rounding"] = rounding
            self.log(f"warning: vLLM loads the scales in the model's {config['dtype']}, which does not hold these "
                     f"fp16 scales: the weights it runs differ from the evaluated ones by "
                     f"{rounding['relative_weight_change']:.2e} (relative, Frobenius; scales by up to "
                     f"{rounding['max_scale_change']:.2e}). Compress with --target vllm --dtype {config['dtype']}, whose "
                     f"grid gives the scales values {config['dtype']} holds")
        return summary


def write_compressed_tensors(src: CompressedModel, out: Path, log=print) -> dict:
    if src.pruning:
        log("note: the model's dynamic-pruning rule is not exported (vLLM has no such rule); vLLM runs every routed "
            "expert")
    return CompressedTensorsExport(src, log).write(Path(out))
