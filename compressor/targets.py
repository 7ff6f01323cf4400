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

TARGETS = ("native", "gguf", "vllm")

# llama-quantize's own substitution for rows that are not whole 256-weight blocks (llama.cpp, llama-quant.cpp),
# with q4_0 standing in for IQ4_NL (4.5 bits per weight both), which this project does not implement
GGUF_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
                 "tq1_0": "q4_0", "tq2_0": "q4_0"}
# --bits in each target's formats
BITS_TABLES = {
    "native": {16: "keep", 8: "int8", 4: "int4", 3: "int3", 2: "int2"},
    "gguf": {2: "q2_k", 3: "q3_k", 4: "q4_k", 8: "q8_0", 16: "keep"},
    "vllm": {4: "int4", 8: "int8", 16: "keep"},
}


class TargetError(UnsupportedArchitecture):
    """A plan or model the chosen target cannot hold; the message names the target and what it supports."""


@dataclass(frozen=True)
class Target:
    name: str
    unit: str                   # the plan's granularity: "expert", "projection" or "layer"
    formats: tuple[str, ...]    # every format the target can hold
    default_formats: tuple[str, ...]  # candidates when the recipe names none of `formats`
    sym: bool | None = None     # the grid the target imposes (None: the recipe's)
    group_size: int | None = None  # and, when set, int formats hold whole groups only
    scales_in_model_dtype: bool = False  # the runtime loads the int scales in the model's dtype (vLLM)

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
            gu, d = self.format_for(bits, b.gate_up().shape[-1]), self.format_for(bits, b.down().shape[-1])
            if self.unit == "layer" and gu != d:
                gu = d = "keep"
            out[b.name] = [join_formats(gu, d)] * b.num_experts
        return out

    def dense_entries(self, dense: dict, bits: int) -> dict[str, str]:
        """Each dense FFN linear's (shared experts, dense layers; `dense`: name -> nn.Linear) format of `bits`."""
        return {name: self.format_for(bits, lin.in_features) for name, lin in dense.items()}

    def check_blocks(self, blocks) -> None:
        """MoE blocks the target cannot express are refused before any work."""
        if self.name == "native" or not blocks:
            return
        if blocks[0].family is MLP_MOE:
            raise TargetError(f"--target {self.name}: this model's MoE blocks ({blocks[0].name}, ...) are up-cycled MLPs "
                              f"(upcycle --modules), which {'llama.cpp' if self.name == 'gguf' else 'vLLM'} does not "
                              "run; use --target native")


TARGET_TABLE = {
    "native": Target("native", "expert", FORMATS + GGML_FORMATS, FORMATS),
    "gguf": Target("gguf", "projection", ("keep",) + GGML_FORMATS,
                   ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q5_1")),
    "vllm": Target("vllm", "layer", ("keep", "int8", "int4"), ("int4", "int8"), sym=True, group_size=128,
                   scales_in_model_dtype=True),
}


def target(name: str) -> Target:
    if name not in TARGET_TABLE:
        raise TargetError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGET_TABLE[name]
