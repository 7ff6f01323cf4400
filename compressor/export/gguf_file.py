"""`export --format gguf`: one GGUF file llama.cpp opens, written with gguf-py's GGUFWriter.

Every tensor is written as the bytes of its rows with its ggml type, so nothing is re-quantized:
  routed experts   blk.N.ffn_{gate,up,down}_exps  [E, rows, in]: the packed rows of the plan's ggml type
                   (quantize/ggml.py stores them exactly as GGUF does), or F16 for experts kept at 16 bits;
                   a layer whose experts are not all in one such type is refused (llama.cpp runs one type per
                   stacked tensor, PR #4927): compress with --target gguf
  dense linears    the plan's ggml type, or the checkpoint's 16-bit dtype (F16 / BF16)
  router, vectors  F32 (the 16-bit values, exactly)
  family tensors   as the family's TensorRules say (gguf_arch.py): renamed, or split (DeepSeek's kv_b_proj into
                   attn_k_b / attn_v_b); tensors llama.cpp requires and the model lacks are written as zeros
The model's metadata (gguf_arch.py) and tokenizer (gguf_vocab.py) go in the header. A model llama.cpp computes
differently is refused, or exported with a warning naming the difference (gguf_families.Difference).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..quantize.formats import QuantSpec
from .gguf_arch import gguf_family, hparams, rope_pair_order
from .gguf_families import TensorRule
from .gguf_vocab import read_vocab, write_vocab
from .source import CompressedModel, DenseTensor, ExportError

PROJECTIONS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
FLOAT_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
F32_TENSORS = ("ffn_gate_inp",)  # kept in float32 whatever their rank (llama.cpp's converters do the same)
VECTORS = ("ffn_gate_inp_shexp",)  # [1, H] in transformers, {H} in llama.cpp


def ggml_type_of(spec: QuantSpec, what: str):
    """The GGMLQuantizationType of a packed format, or an ExportError naming --target gguf."""
    from gguf import GGMLQuantizationType

    if spec.format == "keep":
        return GGMLQuantizationType.F16
    if spec.ggml is None:
        raise ExportError(f"export --format gguf: {what} is in this project's format {spec.format!r}, which GGUF "
                          "cannot hold; compress with --target gguf (a ggml type per layer and projection)")
    return GGMLQuantizationType[spec.ggml.gguf]


def tensor_name(tensor: str, kind: str, layer: int | None) -> str:
    """gguf-py's name of a gguf.MODEL_TENSOR (e.g. "ATTN_K_B", "weight", 3 -> blk.3.attn_k_b.weight)."""
    import gguf

    return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]].format(bid=layer)}.{kind}"


def row_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor [..., n] as the bytes of its rows, uint8 [..., n * itemsize] (ggml's little-endian layout)."""
    return t.contiguous().view(torch.uint8).numpy()


class GGUFExport:
    """Collects (GGUF name, row bytes, ggml type) for every tensor, then writes header and data in one pass."""

    def __init__(self, src: CompressedModel, log=print, accept_differences: bool = False, float32: bool = False):
        import gguf

        self.src, self.log, self.float32 = src, log, float32
        self.fam, diffs = gguf_family(src.model_type, src.config)
        refused = [d.what for d in diffs if d.refuse]
        if refused and not accept_differences:
            raise ExportError(f"export --format gguf: llama.cpp's {self.fam.arch} would compute a different model: "
                              + "; ".join(refused) + ". Pass --accept-differences to export it anyway")
        for d in diffs:
            log(f"warning: llama.cpp's {self.fam.arch} computes this model differently: {d.what}")
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.fam.arch)
        self.names = gguf.get_tensor_name_map(arch, src.config["num_hidden_layers"])
        self.tensors: list[tuple[str, np.ndarray, object]] = []

    def _add(self, name: str, data: np.ndarray, qtype) -> None:
        self.tensors.append((name, data, qtype))

    def _gguf_name(self, hf_name: str) -> str:
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"export --format gguf: no GGUF name for tensor {hf_name!r} of {self.fam.arch} "
                              "(gguf-py's tensor map does not know it); this model's layout is not one llama.cpp runs")
        return name

    def add_dense(self) -> None:
        for d in self.src.dense_tensors():
            for name, part in self._placed(d):
                self._add_dense(name, part)

    def _placed(self, d: DenseTensor) -> list[tuple[str, DenseTensor]]:
        """(GGUF name, tensor) of a transformers tensor: gguf-py's name, or the family's TensorRule (a new name, or
        several tensors split from it)."""
        rule = next((r for r in self.fam.tensors if d.name.endswith("." + r.suffix)), None)
        if rule is None:
            return [(self._gguf_name(d.name), d)]
        if d.packed is not None:
            raise ExportError(f"export --format gguf: {d.name} is quantized, but llama.cpp's {self.fam.arch} needs it "
                              "rearranged; keep it 16-bit")
        parts = rule.split(d.tensor, self.src.config) if rule.split else (d.tensor,)
        layer = re.search(r"\.layers\.(\d+)\.", d.name)
        bid = int(layer.group(1)) if layer else None
        return [(tensor_name(tensor, kind, bid), DenseTensor(d.name, t))
                for (tensor, kind), t in zip(rule.outputs, parts)]

    def _add_dense(self, name: str, d: DenseTensor) -> None:
        from gguf import GGMLQuantizationType as T

        cfg = self.src.config
        heads = {"attn_q": cfg["num_attention_heads"],
                 "attn_k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
        kind = name.split(".")[-2]
        if d.packed is not None:  # a dense linear in the plan's format: its packed rows
            qtype = ggml_type_of(d.packed.spec, d.name)
            rows = next(getattr(d.packed, n) for n in d.packed.names)
            if d.packed.spec.format == "keep" and self.float32:
                rows, qtype = self._float(rows)
        elif d.tensor.dim() == 1 or kind in F32_TENSORS + VECTORS:
            rows, qtype = d.tensor.float(), T.F32
        else:
            rows, qtype = self._float(d.tensor)
        if kind in VECTORS:
            rows = rows.reshape(-1)
        if self.fam.rope_pairs and kind in heads:
            rows = rope_pair_order(rows, heads[kind])
        self._add(name, row_bytes(rows), qtype)

    def _float(self, t: torch.Tensor):
        """A 16-bit tensor as written: its own dtype, or F32 (the same values) when asked."""
        from gguf import GGMLQuantizationType as T

        return (t.float(), T.F32) if self.float32 else (t, T[FLOAT_TYPES[t.dtype]])

    def add_required(self) -> None:
        """Zeros for the tensors llama.cpp requires and this model does not have (a bias its config turned off)."""
        have = {name for name, _, _ in self.tensors}
        layers = range(self.src.config["num_hidden_layers"])
        for r in self.fam.required:
            for i in layers if r.per_layer else (None,):
                name = tensor_name(r.tensor, r.kind, i)
                if name not in have:
                    self._add_dense(name, DenseTensor(name, torch.zeros(self.src.config[r.size])))

    def add_experts(self) -> None:
        from gguf import GGMLQuantizationType as T

        for b in self.src.blocks:
            for proj, gguf_name in PROJECTIONS.items():
                stack = self.src.expert_stack(b, proj)
                qtype = ggml_type_of(stack.spec, stack.name)
                data = stack.tensors["weight" if stack.format == "keep" else "qweight"]
                if stack.format == "keep" and self.float32:
                    data, qtype = self._float(data)
                self._add(f"blk.{b.layer_idx}.{gguf_name}.weight", row_bytes(data), qtype)
                bias = self.src.expert_bias(b, proj)
                if bias is not None:
                    self._add(f"blk.{b.layer_idx}.{gguf_name}.bias", row_bytes(bias.float()), T.F32)

    def write(self, path: Path) -> dict:
        import gguf

        src = self.src
        self.add_dense()
        self.add_required()
        self.add_experts()
        n_vocab = src.config["vocab_size"]
        vocab = read_vocab(src.tokenizer_json(), src.dir, n_vocab)
        w = gguf.GGUFWriter(str(path), self.fam.arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.dir.name)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for method, value in hparams(self.fam, src.config, n_vocab).items():
            getattr(w, method)(value)
        write_vocab(w, vocab)
        for name, data, qtype in self.tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=len(self.tensors) >= 100)
        w.close()
        by_type: dict[str, int] = {}
        for _, data, qtype in self.tensors:
            by_type[qtype.name] = by_type.get(qtype.name, 0) + data.nbytes
        return {"architecture": self.fam.arch, "tensors": len(self.tensors), "tokenizer_pre": vocab.pre,
                "bytes_by_type": by_type, "tensor_bytes": sum(by_type.values())}


def write_gguf(src: CompressedModel, path: Path, log=print, accept_differences: bool = False,
               float32: bool = False) -> dict:
    """`float32`: 16-bit tensors written as F32, the same values, so that llama.cpp computes in float32 (how
    evals/gguf_check.py --exact tells a different model from rounding)."""
    if src.pruning:
        log("note: the model's dynamic-pruning rule is not exported (llama.cpp has no such rule); "
            "the GGUF runs every routed expert")
    return GGUFExport(src, log, accept_differences, float32).write(path)
