"""Where the compressed model will run, and what that allows its plan to be (`--target`, recipe allocation.target).

  native  this project's runtime: every format, one per routed expert (the finest the budget LP can choose).
  gguf    llama.cpp: each layer's experts are stacked into one tensor per projection with one ggml type each
          (blk.N.ffn_{gate,up,down}_exps), so the plan holds one type per (layer, projection); a projection can
          take the types whose blocks divide its row width (k-quants and TQ: 256; q4_0, q5_0, q8_0...: 32).
          Gate and up share one type here (they are one fused matrix in this project).
  vllm    vLLM / SGLang fused-MoE kernels (compressed-tensors pack-quantized, WNA16): symmetric int4 or int8 with
          group 128, one scheme for all experts and projections of a layer (or the layer kept 16-bit). The kernels
          take whole groups only (vLLM's WNA16 Marlin MoE refuses a hidden or expert width that is not a multiple of
          the group), and vLLM loads the scales in the model's dtype: in a bfloat16 model they are rounded to values
          bfloat16 holds (quantization.scale_dtype), so what vLLM runs is what was measured.

A target narrows the candidate formats and the grid of the recipe (`resolve`), says how the plan's entries are
grouped for the LP (`unit`), and makes the uniform plan of `--bits` for each matrix width (`uniform_entry`). The
LP itself (planning.py) is the same multiple-choice knapsack, over groups instead of experts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .arch.families import MLP_MOE, UnsupportedArchitecture
from .plan import join_formats
from .quantize.formats import FORMATS, GGML_FORMATS, INT_BITS
from .quantize.ggml import GGML_TYPES
from .quantize.ternary import ternary_grid

TARGETS = ("native", "gguf", "vllm")

# llama-quantize's own substitution for rows that are not whole 256-weight blocks (llama.cpp, llama-quant.cpp),
# with q4_0 standing in for IQ4_NL (4.5 bits per weight both), which this project does not implement
GGUF_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
                 "tq1_0": "q4_0", "tq2_0": "q4_0"}
# --bits in each target's formats
BITS_TABLES = {
    "native": {16: "keep", 8: "int8", 6: "int6", 5: "int5", 4: "int4", 3: "int3", 2: "int2"},
    "gguf": {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0", 16: "keep"},
    "vllm": {4: "int4", 8: "int8", 16: "keep"},
}


class TargetError(UnsupportedArchitecture):
    """A plan or model the chosen target cannot hold; the message names the target and what it supports."""


def row_widths(block) -> tuple[int, int]:
    """The row widths (input features) of a block's expert gate_up and down matrices: what a target's formats must
    fit (Target.fits)."""
    return block.gate_up().shape[-1], block.down().shape[-1]


@dataclass(frozen=True)
class Target:
    name: str
    unit: str                   # the plan's granularity: "expert", "projection" or "layer"
    formats: tuple[str, ...]    # every format the target can hold
    default_formats: tuple[str, ...]  # candidates when the recipe names none of `formats`
    sym: bool | None = None     # the grid the target imposes (None: the recipe's)
    group_size: int | None = None  # and, when set, int formats hold whole groups only
    scales_in_model_dtype: bool = False  # the runtime loads the int scales in the model's dtype (vLLM)
    ternary_format: str | None = None  # the format already-ternary (MoTE) experts keep, losslessly (None: none)

    def resolve(self, recipe, log=print):
        """The recipe with the target's candidate formats and grid: formats it cannot hold are left out (said so),
        and its default candidates used when none is left."""
        a, q = recipe.allocation, recipe.quantization
        if self.name == "native":
            return recipe
        keep = [f for f in a.formats if f in self.formats]
        if all(f == "keep" for f in keep):  # none of the target's quantized formats named: its defaults
            keep = list(self.default_formats) + keep
        if keep != list(a.formats):
            log(f"--target {self.name}: candidate formats {', '.join(keep)} (it holds {', '.join(self.formats)})")
        update = {"allocation": a.model_copy(update={"formats": keep})}
        grid = {k: v for k, v in (("sym", self.sym), ("group_size", self.group_size)) if v is not None}
        if self.scales_in_model_dtype:
            grid["scale_dtype"] = recipe.dtype
        if any(getattr(q, k) != v for k, v in grid.items()):
            log(f"--target {self.name}: grid " + ", ".join(f"{k} {v}" for k, v in grid.items()))
            update["quantization"] = q.model_copy(update=grid)
        if a.objective != "global":
            raise TargetError(f"--target {self.name} plans with the global objective only (got --objective {a.objective})")
        if q.method == "ternary":
            raise TargetError(f"--method ternary writes this project's ternary format, which --target {self.name} "
                              f"cannot hold; its formats are {', '.join(self.formats)}")
        return recipe.model_copy(update=update)

    @property
    def per_projection(self) -> bool:
        """Does pass 1 measure each projection's errors alone (measure.BlockMeasurement.eps_proj)?"""
        return self.unit == "projection"

    def fits(self, fmt: str, width: int) -> bool:
        """Can a matrix whose rows are `width` long take `fmt`? (ggml types: whole blocks; int formats under a target
        with its own group size: whole groups)"""
        t = GGML_TYPES.get(fmt)
        if t is not None:
            return width % t.block == 0
        return self.group_size is None or fmt not in INT_BITS or width % self.group_size == 0

    def misfits(self, formats, blocks) -> str:
        """Which of `formats` the routed experts' row widths cannot take under this target, as a clause for an
        infeasible budget's error ('' when every format fits every width)."""
        counts: dict[tuple[str, int], int] = {}
        for b in blocks:
            for proj, width in zip(("gate/up", "down"), row_widths(b)):
                counts[proj, width] = counts.get((proj, width), 0) + 1
        notes = [f"{proj} rows {width} wide ({n} MoE layer{'s' * (n > 1)}) cannot take {', '.join(bad)}"
                 for (proj, width), n in counts.items()
                 if (bad := [f for f in formats if not self.fits(f, width)])]
        if not notes:
            return ""
        need = (f"whole groups of {self.group_size}" if self.group_size else
                "whole blocks (256 weights for k-quants and TQ types, 32 for q4_0, q5_0, q8_0 ...)")
        return f"under --target {self.name} a row must hold {need}: {'; '.join(notes)}"

    def format_for(self, bits: int, width: int) -> str:
        """The target's format of `bits` (--bits, --dense-bits) for a matrix whose rows are `width` long."""
        table = BITS_TABLES[self.name]
        if bits not in table:
            raise TargetError(f"--target {self.name} has no {bits}-bit format; --bits may be {sorted(table)}")
        return self.fallback(table[bits], width)

    def fallback(self, fmt: str, width: int) -> str:
        """`fmt`, or what llama-quantize substitutes for it when rows of `width` are not whole blocks: a 32-weight
        block type, and the 16-bit weight where not even those fit."""
        while not self.fits(fmt, width):
            fmt = GGUF_FALLBACK.get(fmt, "keep")
        return fmt

    def uniform_entries(self, blocks, bits: int) -> dict[str, list[str]]:
        """A uniform `--bits` plan's entries for every block (gate_up and down each in the format its width takes;
        a layer-unit target's layer in one format, 16-bit where its projections would differ)."""
        out = {}
        for b in blocks:
            gu, d = (self.format_for(bits, w) for w in row_widths(b))
            if self.unit == "layer" and gu != d:
                gu = d = "keep"
            out[b.name] = [join_formats(gu, d)] * b.num_experts
        return out

    def dense_entries(self, dense: dict, bits: int) -> dict[str, str]:
        """Each dense FFN linear's (shared experts, dense layers; `dense`: name -> nn.Linear) format of `bits`."""
        return {name: self.format_for(bits, lin.in_features) for name, lin in dense.items()}

    def check_ternary(self, block, values: list[bool], scales: list[bool]) -> None:
        """Already-ternary experts keep their values exactly, or the target refuses them. `values` / `scales`: per
        expert of `block`, are both projections' weights on a ternary grid in the recipe's groups / are those scales
        fp16 values (quantize.ternary.ternary_grid); an expert with both is pinned to `ternary_format` by the plan.
        gguf: TQ1_0 / TQ2_0 store a row as blocks of 256 weights, {-1, 0, 1} times one fp16 scale d per block, and a
        layer's experts share one type per projection: exact when every expert of the layer is ternary with one fp16
        scale per 256-weight block of every row."""
        if self.name == "native" or not any(values):
            return
        where = f"--target {self.name}: the experts of {block.name} (layer {block.layer_idx})"
        pinned = [v and s for v, s in zip(values, scales)]
        if not any(pinned):  # ternary values, scales no fp16 holds: nothing stores them exactly
            raise TargetError(f"{where} hold ternary values whose scales are not fp16 values, which "
                              f"{self._ternary_names()} store; no exact conversion exists. Round the scales to fp16 "
                              "(upcycle --ternary writes fp16 scales) or use --target native, where they are quantized "
                              "as ordinary weights")
        if self.ternary_format is None:
            raise TargetError(f"{where} are already ternary (a MoTE checkpoint), and --target {self.name} has no "
                              f"ternary format (its formats: {', '.join(self.formats)}); use --target native, or "
                              "--target gguf for a model ternarized in groups of 256 (upcycle --ternary --group-size 256)")
        if not all(pinned):
            raise TargetError(f"{where}: {sum(pinned)} of {len(pinned)} are already ternary (a MoTE checkpoint), and "
                              f"{self._runtime()} holds one type per layer and projection, so the others would be "
                              "ternarized too; use --target native")
        t = GGML_TYPES[self.ternary_format]
        for proj, W in (("gate/up", block.gate_up()), ("down", block.down())):
            why = None
            if W.shape[-1] % t.block:
                why = f"rows of {W.shape[-1]} weights, not a whole number of blocks"
            else:
                on_grid, fp16 = ternary_grid(W, t.block)
                if not bool(on_grid.all()):
                    why = "scales that change within a block (the model was ternarized in smaller groups)"
                elif not bool(fp16.all()):
                    why = "block scales that are not fp16 values"
            if why is not None:
                raise TargetError(f"{where} are already ternary (a MoTE checkpoint), but their {proj} projection has "
                                  f"{why}: {self._ternary_names()} hold one fp16 scale per {t.block} weights of a row, "
                                  f"so the conversion would not be exact. Up-cycle with `upcycle --ternary --group-size "
                                  f"{t.block}` (rows of whole {t.block}-blocks), or use --target native")

    def _ternary_names(self) -> str:
        return "TQ1_0/TQ2_0" if self.name == "gguf" else "this project's ternary format"

    def _runtime(self) -> str:
        return "llama.cpp" if self.name == "gguf" else "vLLM"

    def check_blocks(self, blocks) -> None:
        """MoE blocks the target cannot express are refused before any work."""
        if self.name == "native" or not blocks:
            return
        if blocks[0].family is MLP_MOE:
            raise TargetError(f"--target {self.name}: this model's MoE blocks ({blocks[0].name}, ...) are up-cycled MLPs "
                              f"(upcycle --modules), which {self._runtime()} does not "
                              "run; use --target native")


TARGET_TABLE = {
    "native": Target("native", "expert", FORMATS + GGML_FORMATS, FORMATS, ternary_format="ternary"),
    # tq1_0 and tq2_0 hold the same values; tq1_0 in fewer bytes (1.6875 against 2.0625 bits per weight)
    "gguf": Target("gguf", "projection", ("keep",) + GGML_FORMATS,
                   ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q5_1"), ternary_format="tq1_0"),
    "vllm": Target("vllm", "layer", ("keep", "int8", "int4"), ("int4", "int8"), sym=True, group_size=128,
                   scales_in_model_dtype=True),
}


def target(name: str) -> Target:
    if name not in TARGET_TABLE:
        raise TargetError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGET_TABLE[name]
