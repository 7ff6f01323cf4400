"""`cli.py export COMPRESSED_DIR --format gguf|compressed-tensors --output PATH`: a compressed model in the
layout another runtime loads as it is, with nothing re-quantized.

  gguf                one .gguf file for llama.cpp (gguf_file.py): ggml block types per (layer, projection)
  compressed-tensors  a transformers directory vLLM / SGLang load (compressed_tensors.py): pack-quantized
                      symmetric int4 / int8 per layer

A format holds only the plans its runtime can run: a layer's experts in one type (--target gguf or vllm at
compress time); anything else is refused with the fix, before anything is written. The output is written beside
its final name and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..io.checkpoint import check_output, commit_output
from .source import CompressedModel, ExportError

EXPORT_FORMATS = ("gguf", "compressed-tensors")


def _writer(fmt: str) -> tuple[Callable, str]:
    """(write(src, path, log) -> summary, default output suffix)."""
    if fmt == "gguf":
        from .gguf_file import write_gguf

        return write_gguf, ".gguf"
    if fmt == "compressed-tensors":
        from .compressed_tensors import write_compressed_tensors

        return write_compressed_tensors, "-compressed-tensors"
    raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")


def export(src_dir: str | Path, fmt: str, output: str | Path | None = None, overwrite: bool = False,
           log=print, **options) -> tuple[Path, dict]:
    """Export a compressed model directory; returns (the output path, a summary of what was written).
    `options` go to the format's writer; gguf: accept_differences (export a model llama.cpp computes differently
    from transformers, with a warning for each difference; refused otherwise), float32 (16-bit tensors as F32)."""
    write, suffix = _writer(fmt)
    options = {k: v for k, v in options.items() if v}
    if options and fmt != "gguf":
        raise ExportError(f"{', '.join(options)}: options of --format gguf only")
    src_dir = Path(src_dir)
    out = Path(output) if output else src_dir.parent / f"{src_dir.name}{suffix}"
    check_output(out, src_dir, overwrite)
    src = CompressedModel(src_dir)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        summary = write(src, tmp, log, **options)
        if tmp.is_dir():
            commit_output(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return out, summary


__all__ = ["EXPORT_FORMATS", "ExportError", "export"]
