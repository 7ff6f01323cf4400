"""`export --format gguf`: one GGUF file llama.cpp opens, written with gguf-py's GGUFWriter.

Every tensor is written as the bytes of its rows with its ggml type, so nothing is re-quantized:
  routed experts   blk.N.ffn_{gate,up,down}_exps  [E, rows, in]: the packed rows of the plan's ggml type
                   (quantize/ggml.py stores them exactly as GGUF does), or F16 for experts kept at 16 bits;
                   a layer whose experts are not all in one such type is refused (llama.cpp runs one type per
                   stacked tensor, PR #4927): compress with --target gguf
  dense linears    the plan's ggml type, or the checkpoint's 16-bit dtype (F16 / BF16)
  router, vectors  F32 (the 16-bit values, exactly)
The model's metadata (gguf_arch.py) and tokenizer (gguf_vocab.py) go in the header.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..quantize.formats import QuantSpec
from .gguf_arch import GGUFFamily, gguf_family, rope_pair_order, write_hparams
from .gguf_vocab import read_vocab, write_vocab
from .source import CompressedModel, ExportError

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


def row_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor [..., n] as the bytes of its rows, uint8 [..., n * itemsize] (ggml's little-endian layout)."""
    return t.contiguous().view(torch.uint8).numpy()


class GGUFExport:
    """Collects (GGUF name, row bytes, ggml type) for every tensor, then writes header and data in one pass."""

    def __init__(self, src: CompressedModel, log=print):
        import gguf

        self.src, self.log = src, log
        self.fam: GGUFFamily = gguf_family(src.model_type, src.config)
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
        from gguf import GGMLQuantizationType as T

        cfg = self.src.config
        heads = {"attn_q": cfg["num_attention_heads"],
                 "attn_k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
        for d in self.src.dense_tensors():
            name = self._gguf_name(d.name)
            kind = name.split(".")[-2]
            if d.packed is not None:  # a dense linear in the plan's format: its packed rows
                qtype = ggml_type_of(d.packed.spec, d.name)
                rows = next(getattr(d.packed, n) for n in d.packed.names)
            elif d.tensor.dim() == 1 or kind in F32_TENSORS + VECTORS:
                rows, qtype = d.tensor.float(), T.F32
            else:
                rows, qtype = d.tensor, T[FLOAT_TYPES[d.tensor.dtype]]
            if kind in VECTORS:
                rows = rows.reshape(-1)
            if self.fam.rope_pairs and kind in heads:
                rows = rope_pair_order(rows, heads[kind])
            self._add(name, row_bytes(rows), qtype)

    def add_experts(self) -> None:
        from gguf import GGMLQuantizationType as T

        for b in self.src.blocks:
            for proj, gguf_name in PROJECTIONS.items():
                stack = self.src.expert_stack(b, proj)
                qtype = ggml_type_of(stack.spec, stack.name)
                data = stack.tensors["weight" if stack.format == "keep" else "qweight"]
                self._add(f"blk.{b.layer_idx}.{gguf_name}.weight", row_bytes(data), qtype)
                bias = self.src.expert_bias(b, proj)
                if bias is not None:
                    self._add(f"blk.{b.layer_idx}.{gguf_name}.bias", row_bytes(bias.float()), T.F32)

    def write(self, path: Path) -> dict:
        import gguf

        src = self.src
        self.add_dense()
        self.add_experts()
        n_vocab = src.config["vocab_size"]
        vocab = read_vocab(src.tokenizer_json(), src.dir, n_vocab)
        w = gguf.GGUFWriter(str(path), self.fam.arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.dir.name)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, self.fam, src.config, n_vocab)
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


def write_gguf(src: CompressedModel, path: Path, log=print) -> dict:
    if src.pruning:
        log("note: the model's dynamic-pruning rule is not exported (llama.cpp has no such rule); "
            "the GGUF runs every routed expert")
    return GGUFExport(src, log).write(path)
