"""The one settings schema. Recipe files and CLI flags both feed it; every default lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..allocation.budget import parse_budget
from ..prune.calibrate import DEFAULT_RENORMALIZE
from ..prune.rule import DEFAULT_PROTECT
from ..quantize.dispatch import DATA_METHODS, METHODS
from ..quantize.gptq import DEFAULT_DAMP
from ..quantize.formats import ALL_FORMATS, DEFAULT_GROUP_SIZE

FormatName = Literal[ALL_FORMATS]  # this project's formats and the GGUF block types (quantize/formats.py)
from ..targets import BITS_TABLES

BITS_TO_FORMAT = BITS_TABLES["native"]
Bits = Literal[tuple(sorted(BITS_TO_FORMAT))]  # --bits, --dense-bits: the native table holds every target's widths


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Calibration(Section):
    text: Path | None = Field(None, description="calibration text file; default: the shipped calibration corpus")
    images: Path | None = Field(
        None, description="directory of calibration images for MoE blocks on a model's image path (up-cycled vision "
        "tower or projector MLPs); `samples` of them are used. Without it those blocks are compressed from their "
        "weights alone (RTN, ternary, data-free LP)")
    samples: int = Field(128, ge=1, description="number of calibration sequences (or images, with `images`)")
    seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")
    seed: int = Field(0, description="seed for sampling calibration windows")
    mode: Literal["routed", "weighted"] = Field(
        "routed",
        description="routed: each expert's Hessian from the tokens routed to it; weighted: from every token, "
        "weighted by its routing probability (sound statistics for rarely used experts)",
    )
    min_tokens: int = Field(
        16, ge=0, description="experts that see fewer routed tokens fall back to RTN (logged in the report)"
    )


class Quantization(Section):
    method: Literal[(*METHODS, "ternary")] = Field(
        "gptq", description="gptq (calibration Hessians, errors fed back across columns), imatrix (round-to-nearest on "
        "scales searched for the error weighted by the calibration inputs' mean square per column, llama.cpp's "
        "importance matrix: a fraction of GPTQ's time), rtn (no data), ternary (every expert ternary, absmean)")
    bits: Bits = Field(4, description="uniform bits for experts when no budget is given")
    group_size: int = Field(DEFAULT_GROUP_SIZE, ge=1, description="columns per scale group (a narrower matrix uses one group)")
    sym: bool = Field(False, description="symmetric grid (no zero points)")
    scale_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="values the int scales may take (they are stored as float16): float16, or bfloat16 "
        "(values float16 and bfloat16 both hold, for a runtime that loads the scales in a bfloat16 model's dtype; "
        "--target vllm sets it from --dtype)")
    act_order: bool = Field(False, description="GPTQ column order by descending Hessian diagonal, static groups")
    damp: float = Field(DEFAULT_DAMP, gt=0, description="GPTQ damping, a fraction of the mean Hessian diagonal "
                       "(imatrix: the floor of each column's importance, the same fraction)")
    block_size: int = Field(128, ge=1, description="GPTQ lazy-update block width")
    dense_bits: Bits | None = Field(
        None, description="bits for shared experts and dense FFNs; default: same as `bits`"
    )

    @property
    def expert_format(self) -> str:
        return "ternary" if self.method == "ternary" else BITS_TO_FORMAT[self.bits]

    @property
    def dense_bits_or_bits(self) -> int:
        """Bits of shared experts and dense FFNs (in the target's formats: targets.Target.dense_entries)."""
        return self.dense_bits if self.dense_bits is not None else self.bits

    @property
    def data_method(self) -> str | None:
        """The quantizer that uses calibration Hessians (quantize/dispatch.py), or None: quantization needs no data."""
        return self.method if self.method in DATA_METHODS else None

    @property
    def gptq_options(self) -> dict:
        """Keyword arguments of quantize.gptq.gptq_quantize: the same wherever GPTQ runs (pass 1 or pass 2)."""
        return {"damp": self.damp, "block_size": self.block_size, "act_order": self.act_order}


class Allocation(Section):
    budget: str | None = Field(None, description="e.g. 3.4GB, 3.4GiB, 512MB, 2.5bits; None: uniform `bits`")
    scope: Literal["model", "experts"] = Field("model", description="what the budget counts")
    formats: list[FormatName] = Field(["keep", "int8", "int6", "int5", "int4", "int3", "int2"],
                                      description="allowed formats")
    target: Literal["native", "gguf", "vllm"] = Field(
        "native", description="where the model will run (compressor/targets.py): native (this project's runtime, a "
        "format per expert), gguf (llama.cpp: ggml types, one per layer and projection), vllm (vLLM/SGLang fused MoE: "
        "symmetric int4/int8, group 128, one per layer)")
    objective: Literal["global", "per_layer", "frequency"] = Field(
        "global", description="global LP, MC-MoE per-layer LP, or frequency-only importance"
    )
    layer_weights: Literal["sensitivity", "output_energy"] = Field(
        "sensitivity", description="how the global LP compares output errors across layers: sensitivity (each "
        "layer's errors times its measured loss sensitivity, the mean squared loss gradient at its output; one more "
        "forward and backward over `sensitivity_samples` windows) or output_energy (errors relative to the block's "
        "output energy; blind to where an error lands)")
    sensitivity_samples: int = Field(
        8, ge=1, description="calibration windows the layer sensitivity is measured on; it holds every layer's input "
                             "for them in fp32 (layers x samples x seq_len x hidden x 4 bytes: 0.28 GB on the reference "
                             "MoE, 7.2 GB for DeepSeek-V3's 61 x 7168; lower it there)")
    eps_quantizer: Literal[METHODS] = Field(
        "rtn", description="quantizer of the eps[expert][format] table: rtn (cheap), imatrix or gptq (per-expert "
                           "Hessians: one more forward per layer, then RTN on importance-searched scales or a GPTQ "
                           "run per format)")
    solver: Literal["highs", "cbc", "auto"] = "highs"
    rel_gap: float = Field(1e-3, ge=0, description="relative optimality gap at which the solver may stop")
    plan: Path | None = Field(None, description="reuse a plan.json instead of solving")
    reuse_measurements: bool = Field(
        True, description="keep pass 1's measurements in the cache directory ($MOE_COMPRESSOR_CACHE/measurements) and "
                          "reuse them while the model files, calibration, grid and formats are unchanged")

    @field_validator("budget")
    @classmethod
    def _parse(cls, v: str | None) -> str | None:
        if v is not None:
            parse_budget(v)  # raises ValueError naming the text and the accepted units
        return v


class Pruning(Section):
    target: float | None = Field(None, ge=0, lt=1, description="fraction of activated expert parameters to skip")
    protect: float = Field(DEFAULT_PROTECT, ge=0, lt=1, description="share of most important tokens never pruned")
    renormalize: bool = Field(DEFAULT_RENORMALIZE, description="renormalise the kept routing weights (measured better on the default model)")


class Execution(Section):
    """Where and how the work runs; none of it changes what is computed on a given device (so it keys no cache)."""
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="device each decoder layer is worked on (one layer at a time, the rest on the CPU or on "
        "disk): cpu, cuda (under torchrun: the rank's LOCAL_RANK GPU; untested, no GPU was available) or auto (cuda "
        "when torch sees one)")
    hessians: Literal["device", "cpu"] = Field(
        "device", description="where GPTQ's Hessians are accumulated: on the device, or in CPU memory when the device "
        "is short of it (each product is moved there as it is added)")
    timeout: float = Field(
        1800, gt=0, description="torchrun runs: seconds a rank waits for the others in a collective before it stops "
        "with an error naming the rank that did not answer (a rank that dies is named at once)")


class Recipe(Section):
    model: str | None = Field(None, description="model directory; default: the shipped default model")
    output: Path | None = None
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype of every unquantized tensor written")
    calibration: Calibration = Calibration()
    quantization: Quantization = Quantization()
    allocation: Allocation = Allocation()
    pruning: Pruning = Pruning()
    execution: Execution = Execution()
    notes: str | None = Field(None, description="free text: why these settings")

    @field_validator("model")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.strip() if isinstance(v, str) else v


def field_choices(path: str) -> list:
    """The values a Literal field takes, by its dotted path ("quantization.method"): the CLI's choices come from
    here, so a flag and its recipe field cannot disagree."""
    model, *head, last = [Recipe, *path.split(".")]
    for name in head:
        model = model.model_fields[name].annotation
    ann = model.model_fields[last].annotation
    lit = next((a for a in (ann, *get_args(ann)) if get_origin(a) is Literal), None)
    if lit is None:
        raise TypeError(f"recipe field {path} is not a Literal")
    return list(get_args(lit))
